"""Bad input exits non-zero with one clear message naming the field, before any compute, and leaves no
results.json behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from lightning_ralora.core.errors import ConfigError
from lightning_ralora.run.validate import validate_config
from tests.conftest import make_cfg, run_cli


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_cli(tmp_path, *overrides, env={"HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["adapter.r=0"], "adapter.r must be a positive integer, got 0"),
        (
            ["adapter.target_modules=[nonexistent_proj]"],
            "matches no linear layer. Linear layer names in this model end in: ",
        ),
        (["task=sft", "task.data_files=/no/such/file.jsonl"], "task.data_files=/no/such/file.jsonl: file not found"),
        (["model.pretrained=/missing/dir"], "model.pretrained=/missing/dir: path not found"),
        (["model.tokenizer=./no/such/tokenizer"], "model.tokenizer=./no/such/tokenizer: path not found"),
        (["trainer.devices=0"], "trainer.devices=0 is not accepted; allowed: a positive integer, -1 (all), 'auto'"),
        (["trainer.precision=bogus"], "trainer.precision='bogus' is unknown; allowed: ["),
        (["trainer.num_nodes=0"], "trainer.num_nodes must be a positive integer, got 0"),
        (["trainer.strategy=bogus"], "trainer.strategy='bogus' is unknown; allowed: ['auto', 'ddp'"),
        (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be a positive integer, got 0"),
        (["trainer.val_check_interval=0"], "trainer.val_check_interval must be a positive integer (batches)"),
        (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val must be a number >= 0, got -1"),
        (["+adapter.rnak=4"], "adapter.rnak is not a field of adapter.kind='lora'"),
    ],
    ids=[
        "r0",
        "targets",
        "data_file",
        "pretrained_path",
        "tokenizer_path",
        "devices0",
        "precision",
        "num_nodes",
        "strategy",
        "accumulate",
        "val_check",
        "clip",
        "unknown_key",
    ],
)
def test_bad_input_is_one_line_naming_the_field(tmp_path: Path, overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(tmp_path, overrides))
    assert len(err.value.problems) == 1, err.value.problems
    assert expected in err.value.problems[0]


def test_model_hub_name_that_cannot_load_is_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(tmp_path, ["model=llama3_8b", "model.pretrained=no-such-org/no-such-model-xyz"]))
    assert "model.pretrained='no-such-org/no-such-model-xyz' could not be loaded" in str(err.value)


@pytest.mark.parametrize("devices", ["1", "-1", "auto", "[0,1]", "'0,1'"])
def test_lightning_device_forms_are_accepted(tmp_path: Path, devices: str) -> None:
    validate_config(make_cfg(tmp_path, [f"trainer.devices={devices}"]), check_model=False)


def test_precision_list_is_lightnings_own() -> None:
    from lightning.fabric.connector import _PRECISION_INPUT_STR

    from lightning_ralora.run.validate import lightning_precisions

    assert set(typing.get_args(_PRECISION_INPUT_STR)) <= set(lightning_precisions())
    assert {"bf16-mixed", "32-true", 32, "16"} <= set(lightning_precisions())


@pytest.mark.parametrize(
    ("task", "content", "suffix", "expected"),
    [
        ("sft", '{"prompt": "a", "response": "b"}\n{"prompt": "a",\n', ".jsonl", "line 2 is not valid JSON"),
        ("sft", '{"prompt": "a", "answer": "b"}\n', ".jsonl", "line 1 has no column 'response' (task.response_key)"),
        ("classification", "text,lbl\nhi,1\n", ".csv", "CSV header has no column 'label' (task.label_key)"),
        ("classification", "", ".csv", "empty CSV file"),
    ],
    ids=["jsonl_syntax", "jsonl_key", "csv_column", "csv_empty"],
)
def test_malformed_data_file_is_one_line(tmp_path: Path, task: str, content: str, suffix: str, expected: str) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    overrides = [f"task={task}", f"task.data_files={path}"]
    if task == "classification":
        overrides += ["model=roberta_base"]  # a seq_classification family; no weights are loaded here
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(tmp_path, overrides), check_model=False)
    lines = [p for p in err.value.problems if "task.data_files" in p]
    assert len(lines) == 1 and f"task.data_files={path}: " in lines[0] and expected in lines[0], err.value.problems


@pytest.mark.slow
def test_cli_exits_2_with_one_message_and_no_traceback(tmp_path: Path) -> None:
    res = _cli(tmp_path, "trainer.devices=0")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "trainer.devices=0" in res.stderr
    assert res.stderr.count("invalid config") == 1
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "results.json").exists()
    assert not list(tmp_path.rglob("*.ckpt"))


def test_target_error_lists_existing_linear_layers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(tmp_path, ["adapter.target_modules=[nope]"]))
    for suffix in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert suffix in str(err.value)


@pytest.mark.slow
def test_unknown_adapter_name_lists_the_options(tmp_path: Path) -> None:
    res = _cli(tmp_path, "adapter=no_such_variant")
    assert res.returncode != 0
    assert "no_such_variant" in res.stderr and "adapter" in res.stderr
    for option in ("lora", "rslora", "lora_plus", "full", "dora", "pissa"):
        assert option in res.stderr
    assert not (tmp_path / "results.json").exists()


def test_all_problems_are_collected_into_one_error(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path, ["adapter.r=-1", "adapter.alpha=0", "optim.lr=0", "trainer.max_steps=0", "task.batch_size=0"]
    )
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    fields = ["adapter.r", "adapter.alpha", "optim.lr", "trainer.max_steps", "task.batch_size"]
    assert [f for f in fields if f in str(err.value)] == fields
    assert len(err.value.problems) == len(fields)


def test_task_and_model_family_must_fit(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.family='causal_lm' does not fit task='classification'"):
        validate_config(make_cfg(tmp_path, ["task=classification", "task.data_files=/x.csv"]))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["adapter=ralora", "adapter.n_max=6"], "adapter.n_max"),
        (["adapter=ralora_pro", "adapter.r_min=16", "adapter.r_max=4"], "adapter.r_min"),
        (["adapter=ralora", "adapter.gid_batches=0"], "adapter.gid_batches"),
        (["adapter=ralora_pro", "adapter.smoothing=cube"], "adapter.smoothing"),
        (["adapter=gralora", "adapter.k=3"], "adapter.k=3 must divide adapter.r=32"),
        (["adapter=gralora", "adapter.r=12", "adapter.k=3"], "adapter.k=3 must divide in_features=64 of the target"),
        (["adapter=sds_lora", "adapter.K=0"], "adapter.K"),
    ],
    ids=["n_max", "r_min_gt_r_max", "gid_batches", "smoothing", "gralora_k_r", "gralora_k_shape", "sds_K"],
)
def test_variant_specific_bad_input_is_named_before_any_compute(
    tmp_path: Path, overrides: list[str], field: str
) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(tmp_path, overrides))
    assert field in str(err.value)


# --------------------------------------------------------------------------------------------------------------
# one line per problem, exit 2 before any weights load, nothing written
# --------------------------------------------------------------------------------------------------------------
def _refused_in_one_line(res: subprocess.CompletedProcess, run_dir: Path, prog: str, *needles: str) -> str:
    """The CLI exited 2 with exactly one non-blank stderr line `<prog>: ...` holding every needle, and left no
    record, checkpoint, eval output or W&B folder in `run_dir`. Returns the line."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    for left in ("results.json", "checkpoints", "eval.json", "eval", "wandb", "gid.json"):
        assert not (run_dir / left).exists(), f"{left} written: {sorted(p.name for p in run_dir.iterdir())}"
    return lines[0]


TRAIN = "lightning-ralora-train"


def test_config_error_message_is_one_line_per_problem() -> None:
    one = ConfigError(["adapter.r must be a positive integer, got 0"])
    assert str(one) == "invalid config: adapter.r must be a positive integer, got 0"
    several = ConfigError(["first problem", "second\n  problem"])
    assert str(several).splitlines() == ["invalid config (2 problems):", "  - first problem", "  - second problem"]
    assert several.problems == ["first problem", "second problem"]


# tiny_llama (conf/model/tiny_llama.yaml): hidden 64, 2 of 4 heads for k/v (out 32), intermediate 128, 2 layers, so
# min(in, out) per target: q 64, k 32, v 32, o 64, gate 64, up 64, down 64 -> 14 targets, 4 of them (k, v) at 32
@pytest.mark.parametrize(
    ("overrides", "field", "value", "over"),
    [
        (["adapter.r=512"], "r", 512, 14),
        (["adapter.r=48"], "r", 48, 4),
        (["adapter=rslora", "adapter.r=48"], "r", 48, 4),
        (["adapter=peft_lora", "adapter.r=48"], "r", 48, 4),
        (["adapter=gralora", "adapter.r=96", "adapter.k=2"], "r", 96, 14),
        (["adapter=hybrid_gralora", "adapter.hybrid_r=40"], "hybrid_r", 40, 4),
        (["adapter=ralora", "adapter.r=48"], "r", 48, 4),
        (["adapter=ralora_pro", "adapter.r_ref=48"], "r_ref", 48, 4),
        (["adapter=ralora_pro", "adapter.r_min=40"], "r_min", 40, 4),
        (["adapter=sds_lora", "adapter.r=48"], "r", 48, 4),
    ],
    ids=["lora512", "lora48", "rslora", "peft", "gralora", "hybrid_r", "ralora", "ralora_pro_r_ref", "r_min", "sds"],
)
def test_rank_above_the_layer_width_is_refused(
    tmp_path: Path, overrides: list[str], field: str, value: int, over: int
) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(tmp_path, overrides))
    assert len(err.value.problems) == 1, err.value.problems
    line = err.value.problems[0]
    assert line.startswith(f"adapter.{field}={value} is above min(in_features, out_features) of {over} target layer(s)")
    assert line.endswith(f"allowed: {field} <= 32 for these targets"), line
    if over == 4:
        assert "model.layers.0.self_attn.k_proj" in line and "q_proj" not in line, line


@pytest.mark.parametrize(
    "overrides",
    [
        ["adapter.r=32"],
        ["adapter=gralora", "adapter.r=32", "adapter.k=2"],
        ["adapter=ralora_pro", "adapter.r_ref=32", "adapter.r_min=32"],
        ["adapter=sds_lora", "adapter.r=32"],
    ],
    ids=["lora", "gralora", "ralora_pro", "sds"],
)
def test_rank_at_the_smallest_width_is_accepted(tmp_path: Path, overrides: list[str]) -> None:
    validate_config(make_cfg(tmp_path, overrides))


def test_rehearsal_keeps_an_over_wide_rank_but_not_one_that_cannot_be_built(tmp_path: Path) -> None:
    """debug=rehearsal stands a width-64 model in for the real one and keeps the adapter: a wasteful r passes (the
    real model is wide enough), an SDS r the layers cannot build does not."""
    base = ["debug=rehearsal", "experiment=gralora_code_llama", "eval.allow_code_execution=true"]
    validate_config(make_cfg(tmp_path, [*base, "adapter=gralora", "adapter.r=128"], fast=False))
    with pytest.raises(ConfigError, match=r"adapter\.r=128 is above min\(in_features, out_features\) of 14 target"):
        validate_config(make_cfg(tmp_path, [*base, "adapter=sds_lora", "adapter.r=128"], fast=False))


@pytest.mark.slow
def test_cli_refuses_a_rank_above_the_width_before_any_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _refused_in_one_line(
        _cli(run, "adapter.r=512"),
        run,
        TRAIN,
        "invalid config: adapter.r=512 is above min(in_features, out_features) of 14 target layer(s)",
        "allowed: r <= 32",
    )


@pytest.mark.slow
def test_cli_refuses_a_numeric_ralora_scale_up_front(tmp_path: Path) -> None:
    """adapter=ralora adapter.scale=2.0 used to pass the config check and crash in the GID warm-up."""
    run = tmp_path / "run"
    _refused_in_one_line(
        _cli(run, "adapter=ralora", "adapter.scale=2.0"),
        run,
        TRAIN,
        "invalid config: adapter.scale=2.0 is not a GID plan's scale rule (needs_gid: true); "
        "allowed: ['alpha/r_ref', 'alpha/r_l']",
    )


@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "mps", "tpu"])
def test_an_accelerator_without_a_device_is_refused(tmp_path: Path, accelerator: str) -> None:
    from lightning_ralora.run.validate import visible_accelerators

    if visible_accelerators()[accelerator]:
        pytest.skip(f"a {accelerator} device is visible here")
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(tmp_path, [f"trainer.accelerator={accelerator}"]))
    assert err.value.problems == [
        f"trainer.accelerator={accelerator!r}: no such device is visible on this machine; allowed here: "
        f"{[n for n, ok in visible_accelerators().items() if ok]}"
    ]
    assert "'cpu'" in err.value.problems[0] and "'auto'" in err.value.problems[0]


def test_planning_without_a_model_does_not_need_the_device(tmp_path: Path) -> None:
    """plan-memory (check_model=False) plans a GPU run on a machine without one."""
    validate_config(make_cfg(tmp_path, ["trainer=gpu"]), check_model=False)


@pytest.mark.slow
def test_cli_refuses_a_gpu_run_on_a_machine_without_one(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    run = tmp_path / "run"
    _refused_in_one_line(
        _cli(run, "trainer.accelerator=gpu"),
        run,
        TRAIN,
        "invalid config: trainer.accelerator='gpu': no such device is visible on this machine; allowed here: ",
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["adapter.target_modules=[q_proj,embed_tokens]"],
            "adapter.target_modules entry 'embed_tokens' matches no linear layer, only model.embed_tokens (Embedding)",
        ),
        (["adapter.target_modules='(['"], "adapter.target_modules='([' is not a valid regular expression"),
        (["optim.weight_decay=-1"], "optim.weight_decay must be a number >= 0, got -1"),
        (["optim.betas=[0.9,1.5]"], "optim.betas must be two numbers in [0, 1), got [0.9, 1.5]"),
        (["optim.warmup_ratio=1.5"], "optim.warmup_ratio must be in [0, 1), got 1.5"),
        (["model.dtype=bogus"], "model.dtype='bogus' is unknown; allowed: null, auto (the checkpoint's), float32"),
        (
            ["callbacks.checkpoint.every_n_train_steps=-1"],
            "callbacks.checkpoint.every_n_train_steps must be a non-negative integer, got -1",
        ),
        (["adapter.dropout=-0.1"], "adapter.dropout must be in [0, 1), got -0.1"),
    ],
    ids=["non_linear_target", "bad_regex", "weight_decay", "betas", "warmup", "model_dtype", "ckpt_every", "dropout"],
)
def test_other_bad_input_is_one_line(tmp_path: Path, overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(tmp_path, overrides))
    assert len(err.value.problems) == 1 and expected in err.value.problems[0], err.value.problems


# --------------------------------------------------------------------------------------------------------------
# data read in full before any weights load
# --------------------------------------------------------------------------------------------------------------
def _sft_rows(n: int) -> list[str]:
    return [json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) for i in range(n)]


def _data_problem(tmp_path: Path, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(tmp_path, overrides), check_model=False)
    lines = [p for p in err.value.problems if p.startswith("task.")]
    assert len(lines) == 1, err.value.problems
    return lines[0]


def test_malformed_json_after_the_first_thousand_lines_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = _sft_rows(1500)
    rows[1399] = '{"prompt": "x", "response": '  # line 1400
    path.write_text("\n".join(rows) + "\n")
    problem = _data_problem(tmp_path, ["task=sft", f"task.data_files={path}"])
    assert problem.startswith(f"task.data_files={path}: line 1400 is not valid JSON"), problem


def test_a_row_missing_its_key_after_the_first_thousand_lines_is_named(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = _sft_rows(1200)
    rows[1099] = json.dumps({"prompt": "x", "answer": "y"})  # line 1100
    path.write_text("\n".join(rows) + "\n")
    problem = _data_problem(tmp_path, ["task=sft", f"task.data_files={path}"])
    assert problem == (
        f"task.data_files={path}: line 1100 has no column 'response' (task.response_key); it has ['answer', 'prompt']"
    )


@pytest.mark.parametrize(
    ("task", "suffix", "content"),
    [("sft", ".jsonl", ""), ("sft", ".jsonl", "\n\n"), ("classification", ".csv", "text,label\n")],
    ids=["empty_jsonl", "blank_jsonl", "header_only_csv"],
)
def test_a_data_file_without_rows_is_refused(tmp_path: Path, task: str, suffix: str, content: str) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    extra = ["model=tiny_llama_cls"] if task == "classification" else []
    problem = _data_problem(tmp_path, [f"task={task}", f"task.data_files={path}", *extra])
    assert problem.startswith(f"task.data_files={path}: no data rows (an empty file)"), problem


@pytest.mark.parametrize(
    ("lines", "num_labels", "bad_line", "value", "allowed"),
    [
        (["text,label", "a,0", "b,1", "c,2"], 2, 4, "'2'", "the integers 0..1 (task.num_labels=2)"),
        (["text,label", "a,0", "b,-1", "c,1"], 2, 3, "'-1'", "the integers 0..1 (task.num_labels=2)"),
        (["text,label", "a,0", "b,pos", "c,1"], 3, 3, "'pos'", "the integers 0..2 (task.num_labels=3)"),
        (["text,label", "a,0.5", "b,high"], 1, 3, "'high'", "a finite number (task.num_labels=1: regression)"),
    ],
    ids=["above", "negative", "word", "regression"],
)
def test_a_label_outside_the_classes_is_named_with_the_allowed_labels(
    tmp_path: Path, lines: list[str], num_labels: int, bad_line: int, value: str, allowed: str
) -> None:
    path = tmp_path / "cls.csv"
    path.write_text("\n".join(lines) + "\n")
    overrides = [
        "task=classification",
        "model=tiny_llama_cls",
        f"task.data_files={path}",
        f"task.num_labels={num_labels}",
    ]
    problem = _data_problem(tmp_path, overrides)
    where = f"task.data_files={path}: line {bad_line}"
    assert problem == f"{where} has label {value} (column 'label', task.label_key); allowed: {allowed}"


def test_a_jsonl_label_outside_the_classes_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cls.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3}) + "\n" for i in range(6)))
    problem = _data_problem(tmp_path, ["task=classification", "model=tiny_llama_cls", f"task.data_files={path}"])
    assert problem == (
        f"task.data_files={path}: line 3 has label 2 (column 'label', task.label_key); allowed: the integers 0..1 "
        "(task.num_labels=2)"
    )


def test_too_few_rows_for_the_validation_hold_out_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(_sft_rows(1)[0] + "\n")
    problem = _data_problem(tmp_path, ["task=sft", f"task.data_files={path}"])
    assert problem.startswith("task.val_fraction=0.1 of 1 data rows leaves 0 for training and 1 for validation")


def test_an_image_folder_with_more_classes_than_labels_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name in ("cat", "dog", "eel"):
        (root / "train" / name).mkdir(parents=True)
    overrides = ["task=image_classification", "model=vit_base", f"task.data_dir={root}", "task.num_labels=2"]
    problem = _data_problem(tmp_path, overrides)
    assert problem == (
        f"task.data_dir={root}: 3 class folders ['cat', 'dog', 'eel'] give labels 0..2, but task.num_labels=2; "
        "allowed: task.num_labels >= 3"
    )


@pytest.mark.slow
def test_cli_refuses_a_malformed_line_and_a_bad_label_before_compute(tmp_path: Path) -> None:
    data = tmp_path / "sft.jsonl"
    rows = _sft_rows(1100)
    rows[1049] = "not json"
    data.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    _refused_in_one_line(
        _cli(run, "task=sft", f"task.data_files={data}"),
        run,
        TRAIN,
        f"invalid config: task.data_files={data}: line 1050 is not valid JSON",
    )
    labels = tmp_path / "cls.csv"
    labels.write_text("text,label\na,0\nb,1\nc,7\n")
    _refused_in_one_line(
        _cli(run, "task=classification", "model=tiny_llama_cls", f"task.data_files={labels}"),
        run,
        TRAIN,
        f"invalid config: task.data_files={labels}: line 4 has label '7' (column 'label', task.label_key); "
        "allowed: the integers 0..1 (task.num_labels=2)",
    )


# --------------------------------------------------------------------------------------------------------------
# evaluation: data and suites checked before any model loads; eval.json only after a completed evaluation
# --------------------------------------------------------------------------------------------------------------
EVAL = "lightning-ralora-eval"


def _eval_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_ralora.cli.eval", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )


def _finished_run(root: Path, task: str = "sft") -> Path:
    """A run dir as training leaves it (results.json with its config, a checkpoint file) and an earlier eval.json;
    every refusal below happens before the checkpoint's weights are read, so it only needs to be an intact torch
    archive (a truncated one is refused as such)."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 12}, run / "checkpoints" / "last.ckpt")
    config = {"model": {"family": "causal_lm", "tokenizer": "bytes"}, "task": {"name": task, "template": "none"}}
    (run / "results.json").write_text(json.dumps({"status": "completed", "config": config}))
    (run / "eval.json").write_text('{"gsm8k": {"accuracy": 0.5, "n": 2}}\n')
    return run


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "no data rows for eval=gsm8k (an empty file); a row needs ['question', 'answer']"),
        ('{"question": "1+1?", "answer": "#### 2"}\n{"question": \n', "line 2 is not valid JSON"),
    ],
    ids=["empty", "malformed"],
)
def test_eval_cli_refuses_bad_data_and_keeps_the_earlier_eval_json(tmp_path: Path, content: str, expected: str) -> None:
    run = _finished_run(tmp_path)
    before = (run / "eval.json").read_bytes()
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(content)
    res = _eval_cli(f"run_dir={run}", "eval=gsm8k", f"eval.data_files={data}")
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"{EVAL}: eval.data_files={data}: {expected}"), lines[0]
    assert (run / "eval.json").read_bytes() == before
    assert not (run / "eval").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["eval.batch_size=0"], "eval.batch_size must be a positive integer or null (8 per call), got 0"),
        (["eval.max_samples=0"], "eval.max_samples must be a positive integer or null (every example), got 0"),
        (["eval.suites=[gsm8k,bogus]"], "eval.suites: 'bogus' is unknown; allowed: ['commonsense', 'glue', 'gsm8k'"),
    ],
    ids=["batch_size", "max_samples", "unknown_suite"],
)
def test_eval_cli_refuses_bad_eval_keys(tmp_path: Path, overrides: list[str], expected: str) -> None:
    run = _finished_run(tmp_path)
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    res = _eval_cli(f"run_dir={run}", "eval=gsm8k", f"eval.data_files={data}", *overrides)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and expected in lines[0], res.stderr[-3000:]


def test_eval_cli_refuses_generation_on_a_run_without_a_tokenizer(tmp_path: Path) -> None:
    run = _finished_run(tmp_path, task="planted")
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    res = _eval_cli(f"run_dir={run}", "eval=gsm8k", f"eval.data_files={data}")
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0] == (
        f"{EVAL}: eval=gsm8k generates text with the run's tokenizer (model.tokenizer), but task=planted loads none; "
        "allowed: a run of task classification or sft (model.tokenizer: bytes, a hub name or a local path)"
    )


def test_an_interrupted_evaluation_leaves_the_earlier_eval_json(tmp_path: Path, monkeypatch) -> None:
    """eval.completions (no model): the scoring is interrupted half-way; eval.json keeps its bytes, no eval/ folder."""
    from lightning_ralora.cli.eval import main as eval_main
    from lightning_ralora.evaluation.gsm8k import GSM8KSuite

    run = _finished_run(tmp_path)
    before = (run / "eval.json").read_bytes()
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(4)))
    completions = tmp_path / "completions.jsonl"
    completions.write_text("".join(json.dumps({"completion": f"The answer is: {i + 1}"}) + "\n" for i in range(4)))
    scored: list[str] = []

    def score(self, completion: str, example):  # noqa: ANN001, ANN202 - the suite's own signature
        scored.append(completion)
        if len(scored) == 3:
            raise KeyboardInterrupt
        return {"correct": True, "extracted": completion}

    monkeypatch.setattr(GSM8KSuite, "score", score)
    with pytest.raises(KeyboardInterrupt):
        eval_main([f"run_dir={run}", "eval=gsm8k", f"eval.data_files={data}", f"eval.completions={completions}"])
    assert len(scored) == 3
    assert (run / "eval.json").read_bytes() == before
    assert not (run / "eval").exists()


@pytest.mark.slow
def test_training_refuses_empty_eval_data_and_a_task_without_a_tokenizer(tmp_path: Path) -> None:
    empty = tmp_path / "gsm8k.jsonl"
    empty.write_text("")
    run = tmp_path / "run"
    _refused_in_one_line(
        _cli(run, "task=sft", f"task.data_files={_write_sft(tmp_path)}", "eval=gsm8k", f"eval.data_files={empty}"),
        run,
        TRAIN,
        f"invalid config: eval.data_files={empty}: no data rows for eval=gsm8k (an empty file)",
    )
    data = tmp_path / "gsm8k_ok.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    _refused_in_one_line(
        _cli(run, "eval=gsm8k", f"eval.data_files={data}"),  # the default task=planted loads no tokenizer
        run,
        TRAIN,
        "invalid config: eval=gsm8k generates text with the run's tokenizer (model.tokenizer), but task=planted "
        "loads none",
    )


def _write_sft(root: Path) -> Path:
    path = root / "sft.jsonl"
    path.write_text("\n".join(_sft_rows(16)) + "\n")
    return path


# --------------------------------------------------------------------------------------------------------------
# consolidate
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["missing", "empty_dir", "file"])
def test_consolidate_refuses_a_path_that_is_no_sharded_checkpoint(tmp_path: Path, kind: str) -> None:
    ckpt = tmp_path / "last.ckpt"
    if kind == "empty_dir":
        ckpt.mkdir()
    elif kind == "file":
        ckpt.write_bytes(b"x")
    out = tmp_path / "one.ckpt"
    res = subprocess.run(
        [sys.executable, "-m", "lightning_ralora.cli.consolidate", str(ckpt), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    expected = {
        "missing": f"CKPT_DIR={ckpt}: not found",
        "empty_dir": f"CKPT_DIR={ckpt}: no .metadata and no meta.pt; allowed: a sharded (FSDP2) checkpoint directory",
        "file": f"CKPT_DIR={ckpt}: a file, not a sharded checkpoint directory",
    }[kind]
    assert lines[0].startswith(f"lightning-ralora-consolidate: {expected}"), lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["task.max_length=0"], "task.max_length must be a positive integer, got 0"),
        (
            ["task.val_fraction=0"],
            "task.val_fraction must be a number in (0, 1) (the held-out share of the rows), got 0",
        ),
        (["eval=gsm8k", "eval.num_beams=0"], "eval.num_beams must be a positive integer or null"),
        (["eval=gsm8k", "eval.temperature=-1"], "eval.temperature must be a number >= 0 or null"),
        (["eval=gsm8k", "eval.batch_size=0"], "eval.batch_size must be a positive integer or null (8 per call), got 0"),
        (
            ["eval=glue"],
            "eval=glue scores a classifier's logits; this run's model.family=causal_lm, allowed: ['seq_classification'",
        ),
    ],
    ids=["max_length", "val_fraction", "num_beams", "temperature", "eval_batch_size", "glue_on_causal_lm"],
)
def test_training_task_and_eval_keys_are_one_line(tmp_path: Path, overrides: list[str], expected: str) -> None:
    """Checked by `train` before any weights load: the task by validate_config, the eval suites by
    prepare_training_eval (both raise ConfigError)."""
    from lightning_ralora.evaluation.runner import prepare_training_eval

    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    cfg = make_cfg(tmp_path, ["task=sft", f"task.data_files={_write_sft(tmp_path)}", *overrides])
    if any(o.startswith("eval=") for o in overrides):
        cfg.eval.data_files = str(gsm8k)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, check_model=False)
        prepare_training_eval(cfg)
    assert len(err.value.problems) == 1 and expected in err.value.problems[0], err.value.problems


@pytest.mark.parametrize(
    ("suite", "name", "content", "expected"),
    [
        ("glue", "mrpc.jsonl", "", "no data rows (an empty file)"),
        ("glue", "mrpc.csv", "sentence1,sentence2,label\n", "no data rows (an empty file)"),
        ("commonsense", "boolq.json", "[]", "no data rows for commonsense subset boolq (empty)"),
    ],
    ids=["glue_jsonl", "glue_csv_header_only", "commonsense_subset"],
)
def test_empty_eval_data_of_every_suite_kind_is_refused_before_a_model(
    tmp_path: Path, suite: str, name: str, content: str, expected: str
) -> None:
    from lightning_ralora.evaluation.base import EvalDataError
    from lightning_ralora.evaluation.runner import prepare

    path = tmp_path / name
    path.write_text(content)
    cfg = {"suites": [suite], "data_files": {"boolq": str(path)} if suite == "commonsense" else str(path)}
    if suite == "commonsense":
        cfg["subsets"] = ["boolq"]
    with pytest.raises(EvalDataError) as err:
        prepare(cfg, None, None)
    assert str(err.value) == f"eval.data_files={path}: {expected}"
