"""MT-Bench against FastChat's llm_judge (github.com/lm-sys/FastChat, fastchat/llm_judge/): judge prompts,
reference answers, per-category decoding, rating parsing and the score, each checked against a re-derivation of
the reference's rule or its data files, with the judge served by a local stub of the OpenAI chat-completions API.

Fixtures (FastChat @ 0e6d3e4b): mt_bench_fastchat_judge_prompts.jsonl is data/judge_prompts.jsonl verbatim below a
source line; mt_bench_questions.jsonl holds 8 rows of data/mt_bench/question.jsonl verbatim (one per category) and
mt_bench_reference_gpt4.jsonl the 3 rows of data/mt_bench/reference_answer/gpt-4.jsonl for its questions that need a
reference (101 reasoning, 111 math, 123 coding)."""

from __future__ import annotations

import ast
import json
import math
import re
import socket
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from omegaconf import OmegaConf

from lightning_ralora.data.templates import render_prompt
from lightning_ralora.evaluation.base import SUITES, EvalConfigError, EvalDataError, Example, read_rows
from lightning_ralora.evaluation.mt_bench import (
    JUDGE_PROMPTS,
    JUDGE_PROMPTS_FILE,
    NEED_REF_CATS,
    TEMPERATURES,
    MTBench,
    MTBenchJudgeError,
    parse_rating,
    render_two_turn,
)
from lightning_ralora.evaluation.runner import build_suite
from tests.helpers import StubJudge, serve_judge

FIXTURES = Path(__file__).parent / "fixtures"
QUESTIONS = FIXTURES / "mt_bench_questions.jsonl"
REFERENCES = FIXTURES / "mt_bench_reference_gpt4.jsonl"
FASTCHAT_PROMPTS = FIXTURES / "mt_bench_fastchat_judge_prompts.jsonl"
CONF = Path(__file__).parents[1] / "conf" / "eval"
KEY = "sk-test-SECRET-4242"

# FastChat common.py, written out from reading it: NEED_REF_CATS and temperature_config; gen_model_answer.py uses
# 0.7 for a category missing from the table and do_sample=False below 1e-4
FASTCHAT_NEED_REF = {"math", "reasoning", "coding", "arena-hard-200"}
FASTCHAT_TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}


def fastchat_prompts() -> dict[str, dict[str, Any]]:
    """The reference judge_prompts.jsonl by name (the fixture's first line names its source)."""
    lines = FASTCHAT_PROMPTS.read_text(encoding="utf-8").splitlines()
    return {row["name"]: row for row in (json.loads(x) for x in lines if x.strip() and not x.startswith("#"))}


def fastchat_rating(judgment: str) -> float:
    """common.py run_judge_single, output_format "[[rating]]": one_score_pattern, else one_score_pattern_backup,
    `ast.literal_eval` of the group; -1 without a match."""
    match = re.search(r"\[\[(\d+\.?\d*)\]\]", judgment) or re.search(r"\[(\d+\.?\d*)\]", judgment)
    return ast.literal_eval(match.groups()[0]) if match else -1


def fastchat_user_prompt(prompt: dict[str, Any], turns: list[str], answers: list[str], ref: list[str] | None) -> str:
    """common.py run_judge_single: the user prompt (ref_answer_2 only for the multi-turn judge)."""
    kwargs = {}
    multi_turn = "{question_1}" in prompt["prompt_template"]
    if ref is not None:
        kwargs["ref_answer_1"] = ref[0]
        if multi_turn:
            kwargs["ref_answer_2"] = ref[1]
    if multi_turn:
        return prompt["prompt_template"].format(
            question_1=turns[0], question_2=turns[1], answer_1=answers[0], answer_2=answers[1], **kwargs
        )
    return prompt["prompt_template"].format(question=turns[0], answer=answers[0], **kwargs)


def fastchat_references() -> dict[int, list[str]]:
    """gen_judgment.py: ref_answers[judge][question_id]["choices"][0]["turns"]."""
    rows = [json.loads(x) for x in REFERENCES.read_text(encoding="utf-8").splitlines() if x.strip()]
    return {r["question_id"]: r["choices"][0]["turns"] for r in rows}


class _Judge(StubJudge):
    """Rates by content: turn 1 of Q81 [[8]], its turn 2 "7/10" (unparsable: -1); Q111 turn 1 "[[3]]", turn 2
    "[4]" (the backup pattern); everything else [[6.5]]."""

    def rating(self, user: str) -> str:
        """Turn-2 prompts carry the conversation markers."""
        turn2 = "### Assistant A:" in user
        if "travel blog post" in user:
            return "7/10" if turn2 else "[[8]]"
        if "vertices of a triangle" in user:
            return "I would give it [4]" if turn2 else "[[3]]"
        return "[[6.5]]"


@pytest.fixture
def judge_server() -> Iterator[ThreadingHTTPServer]:
    with serve_judge(_Judge) as server:
        yield server


def _cfg(port: int, references: Path | None = REFERENCES, **judge: Any) -> dict[str, Any]:
    return {
        "judge": {
            "base_url": f"http://127.0.0.1:{port}/v1",
            "model": "judge-model",
            "api_key_env": "MT_JUDGE_KEY",
            "reference_answers": str(references) if references else None,
            **judge,
        }
    }


class RecordingGenerate:
    """Records every call (prompts and sampling arguments); answers with padded text so stripping shows."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, prompts: list[str], stop: Any = None, max_new_tokens: int = 0, **sampling: Any) -> list[str]:
        self.calls.append({"prompts": list(prompts), "stop": stop, "max_new_tokens": max_new_tokens, **sampling})
        return [f"  \nanswer{len(self.calls)}.{i}\n\n" for i in range(len(prompts))]


def _rows() -> list[dict[str, Any]]:
    return read_rows(QUESTIONS)


# --- data: questions and reference answers ------------------------------------------------------------------------
def test_registered_and_references_from_the_reference_file() -> None:
    """NEED_REF_CATS questions get GPT-4's answers from the reference file (choices[0].turns), never question.jsonl's
    `reference` field; Q123 (coding, no `reference` in question.jsonl) gets its reference too."""
    assert SUITES["mt_bench"] is MTBench
    rows = _rows()
    suite = MTBench(_cfg(1))
    suite.check_rows(rows, str(QUESTIONS))
    exs = {e.id: e for e in suite.examples(rows, "alpaca")}
    refs = fastchat_references()
    q123 = next(r for r in rows if r["question_id"] == 123)
    assert q123["category"] == "coding" and "reference" not in q123  # why it used to be judged without one
    for row in rows:
        ex = exs[str(row["question_id"])]
        if row["category"] in FASTCHAT_NEED_REF:
            assert ex.reference == refs[row["question_id"]]
            assert ex.reference != row.get("reference")  # e.g. Q111: ["Area is 3", "5pi"] in question.jsonl
        else:
            assert ex.reference is None
        assert ex.prompt == render_prompt("alpaca", row["turns"][0], stage="eval")
    assert sorted(int(i) for i, e in exs.items() if e.reference) == [101, 111, 123]
    with pytest.raises(EvalDataError, match="turns"):
        suite.examples([{"question_id": 1, "category": "writing", "turns": ["only one"]}], None)


def test_need_ref_cats_and_temperatures_are_fastchats() -> None:
    assert set(NEED_REF_CATS) == FASTCHAT_NEED_REF
    assert TEMPERATURES == FASTCHAT_TEMPERATURE


def test_missing_reference_answers_fail_before_generation(judge_server: ThreadingHTTPServer, tmp_path: Path) -> None:
    """No reference file: one error naming eval.judge.reference_answers when the examples are built (and in `run`,
    before the judge probe and any generation); writing-only questions need none."""
    rows = _rows()
    suite = MTBench(_cfg(judge_server.server_address[1], references=None))
    with pytest.raises(EvalDataError, match=r"eval\.judge\.reference_answers") as err:
        suite.examples(rows, "alpaca")
    assert "101" in str(err.value) and "gpt-4.jsonl" in str(err.value)
    assert [e.id for e in suite.examples([r for r in rows if r["category"] == "writing"], "alpaca")] == ["81"]

    gen = RecordingGenerate()
    bare = [Example(id="111", prompt="p", reference=None, meta={"category": "math", "turns": ["a", "b"]})]
    with pytest.raises(EvalDataError, match=r"eval\.judge\.reference_answers"):
        suite.run(gen, bare)
    assert gen.calls == [] and judge_server.requests == []

    partial = tmp_path / "gpt-4.jsonl"
    partial.write_text(REFERENCES.read_text().splitlines()[0] + "\n")  # Q101 only
    with pytest.raises(EvalDataError, match=r"no reference answer for question\(s\) 111, 123"):
        MTBench(_cfg(1, references=partial)).examples(rows, "alpaca")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": 101, "turns": ["a", "b"]}\n')  # question.jsonl's shape, not an answer file
    with pytest.raises(EvalDataError, match=r"eval\.judge\.reference_answers=.*broken\.jsonl line 1"):
        MTBench(_cfg(1, references=broken)).examples(rows, "alpaca")


# --- judge prompts -----------------------------------------------------------------------------------------------
def test_judge_prompts_are_fastchats_verbatim() -> None:
    reference = fastchat_prompts()
    names = ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn")
    assert set(JUDGE_PROMPTS) == set(names)
    for name in names:
        ours, ref = JUDGE_PROMPTS[name], reference[name]
        assert (ours.system, ours.template, ours.output_format) == (
            ref["system_prompt"],
            ref["prompt_template"],
            ref["output_format"],
        )
        assert ours.output_format == "[[rating]]"
    # the shipped file is the reference's lines, byte for byte
    ref_lines = set(FASTCHAT_PROMPTS.read_text(encoding="utf-8").splitlines())
    assert set(JUDGE_PROMPTS_FILE.read_text(encoding="utf-8").splitlines()) <= ref_lines


def test_run_sends_fastchats_judge_messages(judge_server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every judge request is common.py's: [system, user] with the judge gen_judgment.py picks for the category,
    the user prompt formatted from the reference template with the model's stripped answers (and GPT-4's reference
    answers for NEED_REF_CATS), temperature 0, max_tokens 2048."""
    monkeypatch.setenv("MT_JUDGE_KEY", KEY)
    rows = _rows()
    suite = MTBench(_cfg(judge_server.server_address[1], parallel=3))
    exs = suite.examples(rows, "alpaca")
    records = suite.run(RecordingGenerate(), exs)

    assert judge_server.requests[0]["method"] == "GET" and judge_server.requests[0]["path"] == "/v1/models"
    posts = [r for r in judge_server.requests if r["method"] == "POST"]
    assert len(posts) == 2 * len(rows)
    sent = sorted((r["body"]["messages"][0]["content"], r["body"]["messages"][1]["content"]) for r in posts)
    for r in posts:
        body = r["body"]
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert body["temperature"] == 0 and body["max_tokens"] == 2048 and body["model"] == "judge-model"
        assert r["headers"]["Authorization"] == f"Bearer {KEY}"

    prompts, refs = fastchat_prompts(), fastchat_references()
    expected = []
    by_id = {r["id"]: r for r in records}
    for row in rows:
        rec = by_id[str(row["question_id"])]
        answers = [rec["completion"], rec["completion_turn2"]]
        assert answers == [a.strip() for a in answers] and all(answers)
        ref = refs[row["question_id"]] if row["category"] in FASTCHAT_NEED_REF else None
        for name in ("single-math-v1", "single-math-v1-multi-turn") if ref else ("single-v1", "single-v1-multi-turn"):
            p = prompts[name]
            expected.append((p["system_prompt"], fastchat_user_prompt(p, row["turns"], answers, ref)))
        assert [t["judge_prompt"] for t in rec["judge"]] == (
            ["single-math-v1", "single-math-v1-multi-turn"] if ref else ["single-v1", "single-v1-multi-turn"]
        )
    assert sent == sorted(expected)
    q123 = next(u for _, u in sent if "random joke" in u and "### Assistant A:" not in u)
    assert "[The Start of Reference Answer]\n<!DOCTYPE html>" in q123

    assert by_id["81"]["score_turn1"] == 8 and by_id["81"]["score_turn2"] == -1
    assert by_id["111"]["score_turn1"] == 3 and by_id["111"]["score_turn2"] == 4
    assert by_id["141"]["score_turn1"] == 6.5
    assert KEY not in json.dumps(records) + json.dumps(suite.aggregate(records))


# --- decoding ----------------------------------------------------------------------------------------------------
def _question_of(prompt: str, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The row a prompt belongs to and its turn (turn 2 prompts carry the second question)."""
    for row in rows:
        if row["turns"][1] in prompt:
            return row, 2
    return next(r for r in rows if r["turns"][0] in prompt), 1


def test_per_category_temperatures_reach_generate(
    judge_server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each question's two turns are generated at FastChat's temperature for its category (0.7 for an unknown one),
    greedy below 1e-4, 1024 new tokens; turn 2's prompt holds turn 1's stripped answer; records keep the
    temperature."""
    monkeypatch.setenv("MT_JUDGE_KEY", KEY)
    rows = [*_rows(), {"question_id": 999, "category": "chit-chat", "turns": ["Say hi to me.", "Now say bye."]}]
    suite = MTBench(_cfg(judge_server.server_address[1]))
    gen = RecordingGenerate()
    records = suite.run(gen, suite.examples(rows, "alpaca"))

    seen: dict[tuple[int, int], dict[str, Any]] = {}
    for call in gen.calls:
        assert call["max_new_tokens"] == 1024 and call["stop"] == ["\n### Instruction:"]
        for prompt in call["prompts"]:
            row, turn = _question_of(prompt, rows)
            seen[row["question_id"], turn] = call
    assert len(seen) == 2 * len(rows)
    for (qid, _), call in seen.items():
        category = next(r["category"] for r in rows if r["question_id"] == qid)
        t = FASTCHAT_TEMPERATURE.get(category, 0.7)
        if t < 1e-4:
            assert call.get("do_sample", False) is False and "temperature" not in call
        else:
            assert call["temperature"] == t and call["do_sample"] is True
    by_id = {r["id"]: r for r in records}
    assert {r["id"]: r["temperature"] for r in records} == {
        str(r["question_id"]): FASTCHAT_TEMPERATURE.get(r["category"], 0.7) for r in rows
    }
    assert by_id["999"]["do_sample"] is True and by_id["111"]["do_sample"] is False
    turn2 = by_id["81"]["prompt_turn2"]
    assert f"### Response:\n{by_id['81']['completion']}\n\n### Instruction:\n{rows[0]['turns'][1]}" in turn2


def test_generate_calls_do_not_depend_on_the_shard(
    judge_server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One call per temperature and turn whatever the shard holds (empty included): ranks stay in step."""
    monkeypatch.setenv("MT_JUDGE_KEY", KEY)
    suite = MTBench(_cfg(judge_server.server_address[1]))
    exs = suite.examples(_rows(), "alpaca")
    counts = []
    for shard in ([], exs[:1], exs[3:5], exs):
        gen = RecordingGenerate()
        suite.run(gen, shard)
        counts.append(len(gen.calls))
        assert sum(len(c["prompts"]) for c in gen.calls) == 2 * len(shard)
    assert counts == [2 * len(set(FASTCHAT_TEMPERATURE.values()) | {0.7})] * 4


def test_temperature_overrides(judge_server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """`category_temperatures` replaces some categories, `greedy` decodes all greedily; both reach generate, both
    come from the eval config through the runner's build_suite; bad values name the key."""
    monkeypatch.setenv("MT_JUDGE_KEY", KEY)
    base = _cfg(judge_server.server_address[1])
    suite = build_suite(MTBench, {**base, "category_temperatures": {"math": 0.5, "writing": 0}})
    gen = RecordingGenerate()
    records = {r["id"]: r for r in suite.run(gen, suite.examples(_rows(), "alpaca"))}
    assert records["111"]["temperature"] == 0.5 and records["81"]["temperature"] == 0.0
    assert records["91"]["temperature"] == 0.7  # roleplay keeps FastChat's
    math_calls = [c for c in gen.calls if any("vertices of a triangle" in p for p in c["prompts"])]
    assert len(math_calls) == 2 and all(c["temperature"] == 0.5 and c["do_sample"] for c in math_calls)

    greedy = build_suite(MTBench, {**base, "greedy": True})
    gen = RecordingGenerate()
    records = {r["id"]: r for r in greedy.run(gen, greedy.examples(_rows(), "alpaca"))}
    assert len(gen.calls) == 2 and all("temperature" not in c and "do_sample" not in c for c in gen.calls)
    assert {r["temperature"] for r in records.values()} == {0.0}

    for bad in ({"math": -1}, {"math": "hot"}, [0.7]):
        with pytest.raises(EvalConfigError, match=r"eval\.category_temperatures"):
            build_suite(MTBench, {**base, "category_temperatures": bad})
    with pytest.raises(EvalConfigError, match=r"eval\.greedy"):
        build_suite(MTBench, {**base, "greedy": "yes"})


def test_config_defaults_are_fastchats() -> None:
    """eval=mt_bench (none.yaml + mt_bench.yaml) builds the FastChat protocol: no override, references from
    eval.judge.reference_answers."""
    cfg = OmegaConf.to_container(
        OmegaConf.merge(OmegaConf.load(CONF / "none.yaml"), OmegaConf.load(CONF / "mt_bench.yaml"))
    )
    assert cfg["judge"]["reference_answers"] is None and cfg["suites"] == ["mt_bench"]
    cfg["judge"]["reference_answers"] = str(REFERENCES)
    suite = build_suite(MTBench, cfg)
    assert not suite.greedy and suite.reference_answers == str(REFERENCES)
    assert {c: suite.temperature(c) for c in [*FASTCHAT_TEMPERATURE, "other"]} == {**FASTCHAT_TEMPERATURE, "other": 0.7}


# --- prompts for turn 2 --------------------------------------------------------------------------------------------
def test_two_turn_prompt_follows_the_template() -> None:
    """Turn 2 = turn-1 prompt + stripped answer + the template's own turn block for question 2, all evaluation
    prompts (`stage="eval"`: metamath's "Let's think step by step." comes from the template, not from mt_bench)."""
    p = render_two_turn("alpaca", "Q1?", "  A1.\n", "Q2?")
    assert p == render_prompt("alpaca", "Q1?") + "A1.\n\n### Instruction:\nQ2?\n\n### Response:\n"
    m = render_two_turn("metamath", "Q1?", "A1.", "Q2?")
    single = render_prompt("metamath", "Q2?", stage="eval")
    assert m == render_prompt("metamath", "Q1?", stage="eval") + "A1.\n\n" + single[single.index("### Instruction:") :]
    assert m.endswith("### Instruction:\nQ2?\n\n### Response: Let's think step by step.")  # MetaMath's eval prompt
    first = MTBench(_cfg(1)).examples([{"question_id": 81, "category": "writing", "turns": ["Q1?", "Q2?"]}], "metamath")
    assert first[0].prompt == render_prompt("metamath", "Q1?", stage="eval")
    assert render_two_turn("none", "Q1?", " A1. ", "Q2?") == "Q1?A1.\n\nQ2?"

    class ChatTok:
        chat_template = "x"

        def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool):
            assert add_generation_prompt and not tokenize
            return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"

    assert render_two_turn("chat", "Q1?", " A1.\n", "Q2?", ChatTok()) == "user:Q1?|assistant:A1.|user:Q2?|assistant:"


# --- ratings and the score ------------------------------------------------------------------------------------------
JUDGE_REPLIES = [  # (judgment as a judge model writes it, rating worked out by hand from common.py's rule)
    ("The response is accurate, well organised and covers the key sights of Hawaii.\n\nRating: [[7]]", 7),
    ("The assistant explains superposition clearly but skips the math. Rating: [[8.5]]", 8.5),
    ("The answer is mostly correct, though it misses one edge case. I would rate it [7].", 7),
    ("A solid answer with minor inaccuracies. Rating: 7/10", -1),
    ("", -1),
    ("I cannot evaluate this response because it is empty.", -1),
    ("Turn 1 earned [[9]], but this second answer is weaker. Rating: [[6]]", 9),
    ("The reference says the area is 3 [1], the assistant says 0, which is wrong. Rating: [[2]]", 2),
    ("[1] The assistant's answer contradicts the reference.\n\nRating: 3", 1),
    ("The code returns arr[0] instead of arr[-1]; otherwise fine. 5 out of 10.", 0),
    ("The code indexes arr[0] correctly.\n\nRating: [[9]]", 9),
    ("**Rating: [[10]]**", 10),
    ("Rating: [[ 8 ]]", -1),
    ("Rating: [[8/10]]", -1),
    ("Rating: [[7.]]", 7.0),
    ("Rating: [[6.75]]", 6.75),
    ("Rating: [[0]]", 0),
    ("Rating: [[11]]", 11),
    ("Rating: [[-2]]", -1),
    ('As instructed, I will use the format "[[rating]]", for example: "Rating: [[5]]". Rating: [[3]]', 5),
    ("Rating: [[rating]]", -1),
    ("The score is [8.5] out of 10.", 8.5),
    ("Rating:[[10.0]]", 10.0),
    ("Rating: [[4]]\n\nNote: the points [[0, 0], [3, 3]] are collinear.", 4),
    ("Rating: [[7]] [[8]]", 7),
    ("The answer lists [a, b] pairs but never sorts them; Rating: [[5]].", 5),
]


@pytest.mark.parametrize(("judgment", "expected"), JUDGE_REPLIES)
def test_parse_rating_as_fastchat(judgment: str, expected: float) -> None:
    assert fastchat_rating(judgment) == expected
    assert parse_rating(judgment) == expected


def test_aggregate_as_show_result() -> None:
    """show_result.py (single): drop score -1, mean per turn and over every remaining judgment. Hand-computed:
    turn 1 (8, 3, 10, 0) -> 21/4; turn 2 (6, 7.5, 9) -> 22.5/3; all seven -> 43.5/7 (not the mean of the turn
    means); a 0 counts, a -1 does not."""
    scores = {"81": ("writing", 8, 6), "111": ("math", 3, -1), "123": ("coding", 10, 7.5)}
    scores |= {"91": ("roleplay", -1, -1), "141": ("stem", 0, 9)}
    records = [{"id": k, "category": c, "score_turn1": s1, "score_turn2": s2} for k, (c, s1, s2) in scores.items()]
    metrics = MTBench().aggregate(records)
    assert metrics["turn1"] == pytest.approx(21 / 4) and metrics["turn2"] == pytest.approx(22.5 / 3)
    assert metrics["score"] == pytest.approx(43.5 / 7)
    assert metrics["category/math"] == 3 and metrics["category/writing"] == 7 and "category/roleplay" not in metrics
    assert metrics["n"] == 5 and metrics["n_unparsed"] == 3

    # the same through show_result.py's pandas steps on FastChat-shaped judgment rows
    rows = [{"model": "m", "score": s, "turn": t} for _, s1, s2 in scores.values() for t, s in ((1, s1), (2, s2))]
    df = pd.DataFrame(rows)
    df = df[df["score"] != -1]
    assert metrics["turn1"] == pytest.approx(df[df["turn"] == 1].groupby(["model", "turn"]).mean()["score"].iloc[0])
    assert metrics["turn2"] == pytest.approx(df[df["turn"] == 2].groupby(["model", "turn"]).mean()["score"].iloc[0])
    assert metrics["score"] == pytest.approx(df[["model", "score"]].groupby(["model"]).mean()["score"].iloc[0])
    assert math.isnan(
        MTBench().aggregate([{"id": "1", "category": "x", "score_turn1": -1, "score_turn2": -1}])["score"]
    )


# --- the judge endpoint ----------------------------------------------------------------------------------------------
def test_unreachable_judge_fails_fast_before_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MT_JUDGE_KEY", KEY)
    with socket.socket() as s:  # a free port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    suite = MTBench(_cfg(port))
    gen = RecordingGenerate()
    t0 = time.perf_counter()
    with pytest.raises(MTBenchJudgeError, match=rf"eval.judge.base_url=http://127.0.0.1:{port}/v1 unreachable") as err:
        suite.run(gen, suite.examples(_rows(), None))
    assert time.perf_counter() - t0 < 5
    assert gen.calls == [] and KEY not in str(err.value)


def test_missing_judge_config_is_clear() -> None:
    with pytest.raises(MTBenchJudgeError, match="eval.judge.base_url is not set"):
        MTBench({}).check_judge()


def test_replayed_answers_keep_their_questions(
    judge_server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`eval.completions` (FastChat model answers replayed through ReplayGenerate): grouping the questions by
    temperature keeps each question's two answers together, and the judge sees them as given."""
    from lightning_ralora.evaluation.generate import ReplayGenerate

    monkeypatch.setenv("MT_JUDGE_KEY", KEY)
    suite = MTBench(_cfg(judge_server.server_address[1]))
    exs = suite.examples(_rows(), "alpaca")
    answers = [[[f"first answer to {ex.id}", f"second answer to {ex.id}"]] for ex in exs]
    records = suite.run(ReplayGenerate([ex.prompt for ex in exs], answers), exs)
    for rec in records:
        assert (rec["completion"], rec["completion_turn2"]) == (
            f"first answer to {rec['id']}",
            f"second answer to {rec['id']}",
        )
        assert f"### Assistant A:\nsecond answer to {rec['id']}" in rec["judge"][1]["judge_input"]
