"""SDS-LoRA and gradient alignment end to end: the schedule on the planted task, resume, and DDP agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_ralora.adapters.sds import refresh_due
from lightning_ralora.run.job import train
from tests.conftest import make_cfg, run_cli
from tests.helpers import csv_rows


def _scheduled(total: int, K: int, warmup: int) -> list[int]:
    """Refresh steps by the docs/maths.md §6 formula, computed here independently (after the switch, before the end)."""
    return [t for t in range(warmup + 1, total) if t % (int(K * t / total) + 1) == 0]


def test_sds_run_refreshes_on_the_scheduled_steps(tmp_path: Path) -> None:
    results = train(make_cfg(tmp_path, ["adapter=sds_lora", "trainer.max_steps=40", "trainer.log_every_n_steps=1"]))
    sds = results["callbacks"]["SDSSchedule"]
    expected = _scheduled(40, 5, 10)
    assert sds["switch_step"] == 10
    assert sds["refresh_log"] == expected
    assert expected == [t for t in range(11, 40) if refresh_due(t, 40, 5)]
    # every refresh is logged at its step (Lightning labels optimizer step t's metrics t - 1)
    logged = [int(r["step"]) + 1 for r in csv_rows(tmp_path) if r.get("sds/refresh_jump")]
    assert logged == expected
    assert sds["mean_jump"] > 0
    layers = results["structure"]["layers"].values()
    assert {layer["kind"] for layer in layers} == {"sds"}
    assert results["final_metrics"]["val/gap_closed"] > 0


def test_sds_resume_refreshes_on_the_same_steps_with_the_same_weights(tmp_path: Path) -> None:
    # 64 sequences / batch 8 = 8 steps per epoch: resume from the step-16 checkpoint (after switch and refreshes)
    common = ["adapter=sds_lora", "trainer.max_steps=32", "callbacks.checkpoint.every_n_train_steps=8",
              "callbacks.checkpoint.save_top_k=-1", "deterministic=true"]  # fmt: skip
    full = train(make_cfg(tmp_path / "full", common))
    mid = tmp_path / "full" / "checkpoints" / "epoch=1-step=16.ckpt"
    resumed = train(make_cfg(tmp_path / "resumed", [*common, f"ckpt_path='{mid}'"]))
    assert resumed["callbacks"]["SDSSchedule"]["refresh_log"] == full["callbacks"]["SDSSchedule"]["refresh_log"]
    assert resumed["adapter_state_digest_per_rank"] == full["adapter_state_digest_per_rank"]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for k in (k for k in a if "lora_" in k or "Q_" in k):
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_keeps_sds_buffers_identical_and_logs_alignment_once(tmp_path: Path) -> None:
    res = run_cli(
        tmp_path, "trainer=ddp", "trainer.devices=2", "adapter=sds_lora", "callbacks=alignment",
        "callbacks.alignment.every_n_steps=5", "trainer.max_steps=30", "trainer.log_every_n_steps=5",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2
    # parameters, Q_A, Q_B and the phase flag are bit-identical on both ranks after switch and refreshes
    states = results["adapter_state_digest_per_rank"]
    assert len(states) == 2 and states[0] == states[1]
    assert results["callbacks"]["SDSSchedule"]["refresh_log"] == _scheduled(30, 5, 10)
    align = results["callbacks"]["GradientAlignment"]
    assert align["logged_steps"] == [5, 10, 15, 20, 25, 30]
    rows = [r for r in csv_rows(tmp_path) if r.get("align/mean/cos_f")]
    assert [int(r["step"]) + 1 for r in rows] == align["logged_steps"]  # once per step: rank 0 only
    assert all(-1.0 <= float(r["align/mean/cos_f"]) <= 1.0 for r in rows)
