"""The evaluation runner: batched left-padded decoding, sharding across ranks, outputs, the eval CLI and the
in-training test stage, on a tiny Llama trained with task=sft on a GSM8K-format file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_ralora.cli.eval import main as eval_main
from lightning_ralora.data.tokenizer import byte_tokenizer
from lightning_ralora.evaluation.generate import make_generate, truncate_at_stop
from lightning_ralora.evaluation.runner import shard_indices
from lightning_ralora.run.job import train
from tests.conftest import make_cfg

N_EVAL = 5  # odd: the 2-rank shards differ in size


def _gsm8k_rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    rows = []
    for i in range(offset, offset + n):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append(
            {"question": f"Tom has {a} apples and buys {b}. How many?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
        )
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_lm():
    tok = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=320, max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), tok


def test_left_padding_gives_the_same_greedy_completion_and_order_is_restored(tiny_lm) -> None:
    model, tok = tiny_lm
    generate = make_generate(model, tok, batch_size=4, progress=False)
    prompts = ["a much longer prompt than the others", "ab", "a medium prompt"]
    alone = [generate([p], max_new_tokens=10)[0] for p in prompts]
    assert generate(prompts, max_new_tokens=10) == alone  # batched with longer prompts, left-padded, same order
    assert make_generate(model, tok, batch_size=2, progress=False)(prompts[::-1], max_new_tokens=10) == alone[::-1]
    assert model.training is False


def test_stop_strings_cut_the_completion(tiny_lm) -> None:
    assert truncate_at_stop("answer 42\n\nQuestion: next", ["\n\n", "Question:"]) == "answer 42"
    assert truncate_at_stop("no stop here", ["###"]) == "no stop here"
    model, tok = tiny_lm
    generate = make_generate(model, tok, batch_size=2, progress=False)
    full = generate(["ab"], max_new_tokens=12)[0]
    stop = full[4:6]
    assert generate(["ab"], stop=[stop], max_new_tokens=12)[0] == full[: full.find(stop)]


def _hf_beams(model, tok, prompt: str, n: int = 1, **kwargs) -> list[str]:
    """transformers' own beam search on one unpadded prompt (no batching, no wrapper): the reference."""
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=3, num_return_sequences=n, do_sample=False,
        max_new_tokens=12, pad_token_id=tok.pad_token_id, **kwargs,
    )  # fmt: skip
    texts = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return [truncate_at_stop(t, kwargs.get("stop_strings", ())) for t in texts]


def test_batched_beam_search_equals_one_prompt_at_a_time(tiny_lm) -> None:
    """Left-padded batches of beam search give each prompt what transformers' beam search gives it alone: the best
    beam, the n best (prompt-major), and with stop strings (transformers' own `stop_strings` criterion as the
    reference: a beam that reaches one is finished)."""
    model, tok = tiny_lm
    prompts = ["The answer is 42 because", "ab", "a medium prompt", "xyz"]
    generate = make_generate(model, tok, batch_size=4, progress=False)
    beams = generate(prompts, max_new_tokens=12, num_beams=3)
    assert beams == [_hf_beams(model, tok, p)[0] for p in prompts]
    assert beams != generate(prompts, max_new_tokens=12)  # beam search is not greedy search on this model
    top3 = generate(prompts, max_new_tokens=12, num_beams=3, num_return_sequences=3)
    assert top3 == [t for p in prompts for t in _hf_beams(model, tok, p, n=3)]
    stops = sorted({c for t in beams for c in t if c.isascii() and c.isprintable() and not c.isspace()})[:3]
    cut = generate(prompts, stop=stops, max_new_tokens=12, num_beams=3)
    assert cut == [_hf_beams(model, tok, p, stop_strings=stops, tokenizer=tok)[0] for p in prompts]
    alone = make_generate(model, tok, batch_size=1, progress=False)
    assert cut == [alone([p], stop=stops, max_new_tokens=12, num_beams=3)[0] for p in prompts]
    assert cut != beams and not any(s in t for t in cut for s in stops)  # the stops took effect
    with pytest.raises(ValueError, match="at most num_beams"):
        generate(prompts, max_new_tokens=4, num_beams=2, num_return_sequences=3)


def test_sampling_is_reproducible_with_a_seed_and_gives_n_per_prompt(tiny_lm) -> None:
    model, tok = tiny_lm
    prompts = ["The answer is 42 because", "ab", "a medium prompt"]
    generate = make_generate(model, tok, batch_size=2, progress=False, seed=7)
    state = torch.get_rng_state()
    samples = generate(prompts, max_new_tokens=8, num_return_sequences=4, temperature=1.0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    assert len(samples) == 4 * len(prompts)
    assert samples == generate(prompts, max_new_tokens=8, num_return_sequences=4, temperature=1.0)
    other = make_generate(model, tok, batch_size=2, progress=False, seed=8)
    assert samples != other(prompts, max_new_tokens=8, num_return_sequences=4, temperature=1.0)
    assert all(len(set(samples[4 * i : 4 * i + 4])) > 1 for i in range(len(prompts)))  # 4 different draws each
    # top_k=1 sampling draws the greedy token: each prompt's 3 samples are its greedy completion (prompt-major)
    greedy = generate(prompts, max_new_tokens=8)
    assert generate(prompts, max_new_tokens=8, num_return_sequences=3, top_k=1) == [g for g in greedy for _ in "abc"]


def test_shards_are_disjoint_and_cover_every_example() -> None:
    shards = [shard_indices(N_EVAL, r, 2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(N_EVAL)) and not set(shards[0]) & set(shards[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama trained by task=sft on GSM8K-format rows, with eval=gsm8k in the training config (the
    in-training test stage), plus an odd-length evaluation file."""
    tmp = tmp_path_factory.mktemp("eval_run")
    train_file = _write(tmp / "train.jsonl", _gsm8k_rows(24))
    eval_file = _write(tmp / "gsm8k_test.jsonl", _gsm8k_rows(N_EVAL, offset=100))
    run = tmp / "run"
    overrides = [
        "task=sft", f"task.data_files={train_file}", "task.prompt_key=question", "task.response_key=answer",
        "task.template=alpaca", "trainer.max_steps=4", "trainer.val_check_interval=4",
        "callbacks.checkpoint.every_n_train_steps=4", "eval=gsm8k", f"eval.data_files={eval_file}",
        "eval.max_new_tokens=8",
    ]  # fmt: skip
    train(make_cfg(run, overrides))
    return {"run": run, "eval_file": eval_file, "tmp": tmp}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "eval" / "gsm8k.jsonl").read_text().splitlines()]


def test_in_training_test_stage_writes_eval_json_and_results(trained) -> None:
    run = trained["run"]
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["gsm8k"]["n"] == N_EVAL and 0.0 <= metrics["gsm8k"]["accuracy"] <= 1.0
    assert json.loads((run / "results.json").read_text())["eval"] == metrics
    records = _records(run)
    assert [r["index"] for r in records] == list(range(N_EVAL))
    assert records[0]["prompt"].startswith("Below is an instruction")  # the run's task.template (alpaca)


def test_cli_one_process_matches_the_training_stage(trained, capsys) -> None:
    run = trained["run"]
    before = json.loads((run / "eval.json").read_text())
    completions = [r["completion"] for r in _records(run)]
    (run / "eval.json").unlink()
    eval_main([f"run_dir={run}", "eval=gsm8k", f"eval.data_files={trained['eval_file']}", "eval.max_new_tokens=8"])
    assert json.loads((run / "eval.json").read_text()) == before
    assert json.loads((run / "results.json").read_text())["eval"] == before
    assert [r["completion"] for r in _records(run)] == completions
    assert "gsm8k: accuracy" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_cli_two_ranks_shard_an_odd_file_and_match_one_process(trained) -> None:
    run = trained["run"]
    before = json.loads((run / "eval.json").read_text())
    completions = [r["completion"] for r in _records(run)]
    (run / "eval.json").unlink()
    res = subprocess.run(
        [sys.executable, "-m", "lightning_ralora.cli.eval", f"run_dir={run}", "eval=gsm8k",
         f"eval.data_files={trained['eval_file']}", "eval.max_new_tokens=8", "trainer=ddp", "trainer.devices=2",
         "trainer.accelerator=cpu"],
        capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    after = json.loads((run / "eval.json").read_text())
    assert after == before and after["gsm8k"]["n"] == N_EVAL
    assert json.loads((run / "results.json").read_text())["eval"] == before
    records = _records(run)
    assert [r["index"] for r in records] == list(range(N_EVAL))  # every example exactly once, in order
    assert [r["completion"] for r in records] == completions


def _snapshot(path: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in path.rglob("*")} if path.exists() else {}


@pytest.mark.parametrize(
    "case",
    ["unknown_group", "unknown_suite", "missing_file", "bad_format", "no_checkpoint", "code_execution", "no_run_dir"],
)
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(trained, capsys, case: str) -> None:
    run, tmp = trained["run"], trained["tmp"]
    bad = tmp / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    empty = tmp / "empty_run"
    empty.mkdir(exist_ok=True)
    args = {
        "unknown_group": [f"run_dir={run}", "eval=gsm9k"],
        "unknown_suite": [f"run_dir={run}", "eval.suites=[gsm9k]"],
        "missing_file": [f"run_dir={run}", "eval=gsm8k", f"eval.data_files={tmp / 'nope.jsonl'}"],
        "bad_format": [f"run_dir={run}", "eval=gsm8k", f"eval.data_files={bad}"],
        "no_checkpoint": [f"run_dir={empty}", "eval=gsm8k", f"eval.data_files={trained['eval_file']}"],
        "code_execution": [f"run_dir={run}", "eval=humaneval", f"eval.data_files={trained['eval_file']}"],
        "no_run_dir": ["eval=gsm8k"],
    }[case]
    expect = {
        "unknown_group": "allowed:", "unknown_suite": "allowed:", "missing_file": "not found",
        "bad_format": "line 2", "no_checkpoint": "no intact checkpoint", "code_execution": "allow_code_execution",
        "no_run_dir": "run_dir=RUN",
    }[case]  # fmt: skip
    before = _snapshot(run), _snapshot(empty)
    with pytest.raises(SystemExit) as exc:
        eval_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert (_snapshot(run), _snapshot(empty)) == before


def test_bad_input_exits_2_from_the_command_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "lightning_ralora.cli.eval", f"run_dir={tmp_path / 'missing'}", "eval=gsm8k"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "not found" in res.stderr, res.stderr
