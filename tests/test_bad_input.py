"""Bad input exits non-zero with one clear message naming the field, before any compute, and leaves no
results.json behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lightning_ralora.config import ConfigError, validate_config
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
        (["task=sft", "task.data_files=/no/such/file.jsonl"], "task.data_files: file not found: /no/such/file.jsonl"),
        (
            ["model=llama3_8b", "model.pretrained=no-such-org/no-such-model-xyz"],
            "model.pretrained='no-such-org/no-such-model-xyz' could not be loaded",
        ),
    ],
    ids=["r0", "targets", "data_file", "model_name"],
)
def test_cli_rejects_bad_input_with_one_message(tmp_path: Path, overrides: list[str], expected: str) -> None:
    res = _cli(tmp_path, *overrides)
    assert res.returncode == 2, res.stderr[-2000:]
    assert expected in res.stderr
    assert res.stderr.count("invalid config") == 1
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "results.json").exists()
    assert not list(tmp_path.rglob("*.ckpt"))


def test_target_error_lists_existing_linear_layers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(tmp_path, ["adapter.target_modules=[nope]"]))
    for suffix in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert suffix in str(err.value)


def test_unknown_adapter_name_lists_the_options(tmp_path: Path) -> None:
    res = _cli(tmp_path, "adapter=no_such_variant")
    assert res.returncode != 0
    assert "adapter/no_such_variant" in res.stderr and "Available options" in res.stderr
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
        (["adapter=gralora", "adapter.r=12", "adapter.k=3"], "adapter.k=3 must divide in and out features"),
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
