"""RaLoRA family end to end: GID warm-up in a real Trainer, planted ground truth, DDP agreement, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_ralora.modules.adapter_module import AdapterModule
from lightning_ralora.run.job import train
from tests.conftest import make_cfg, run_cli


def _adapter_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if "lora_" in k}


@pytest.mark.parametrize("variant", ["ralora", "ralora_pro", "ls_lora"])
def test_gid_plan_on_planted_task(tmp_path: Path, variant: str) -> None:
    results = train(make_cfg(tmp_path, [f"adapter={variant}", "adapter.gid_batches=4"]))
    gid = json.loads((tmp_path / "gid.json").read_text())
    targets = set(results["structure"]["layers"])
    assert set(gid["entries"]) == targets == set(gid["planted_erank"])
    assert gid["N"] == 4 and gid["batch_size"] == 8 and gid["seconds"] > 0
    assert gid["train_mode"] is True and gid["meta"]["gid_train_mode"] is True  # warm-up with dropout active
    assert -1.0 <= gid["spearman_erank_vs_planted"] <= 1.0
    assert (tmp_path / "gid.png").stat().st_size > 0
    layers = results["structure"]["layers"]
    # the structure built is exactly the plan, and the parameter count is r_l(m+n) summed
    for name, entry in gid["entries"].items():
        assert (layers[name]["r"], layers[name]["n_blocks"]) == (entry["spec"]["r"], entry["spec"]["n_blocks"])
    assert results["trainable_params"] == sum(
        layer["r"] * (layer["in_features"] + layer["out_features"]) for layer in layers.values()
    )
    meta = results["plan"]["meta"]
    if variant != "ralora":
        assert results["trainable_params"] == meta["params_plan"]
        assert "params_uniform_lora_r_ref" in meta  # the budget next to the real count
    if variant == "ls_lora":
        assert {layer["n_blocks"] for layer in layers.values()} == {1}
    if variant == "ralora":
        assert {layer["r"] for layer in layers.values()} == {8}
    assert results["callbacks"]["GIDWarmup"]["seconds"] > 0
    assert results["final_metrics"]["val/gap_closed"] > 0


@pytest.mark.slow
def test_ls_lora_has_ralora_pro_ranks_with_one_block(tmp_path: Path) -> None:
    pro = train(make_cfg(tmp_path / "pro", ["adapter=ralora_pro", "adapter.gid_batches=2", "trainer.max_steps=2"]))
    ls = train(make_cfg(tmp_path / "ls", ["adapter=ls_lora", "adapter.gid_batches=2", "trainer.max_steps=2"]))
    ranks = lambda res: {n: layer["r"] for n, layer in res["structure"]["layers"].items()}  # noqa: E731
    assert ranks(pro) == ranks(ls)
    assert {layer["n_blocks"] for layer in ls["structure"]["layers"].values()} == {1}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_plan_equals_single_process_estimate_on_the_same_global_batches(tmp_path: Path) -> None:
    common = ["adapter=ralora", "trainer.max_steps=2", "wandb.mode=disabled", "trainer.enable_progress_bar=false"]
    ddp = run_cli(tmp_path / "ddp", "trainer=ddp", "trainer.devices=2", "adapter.gid_batches=3", *common)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # one process over the same 6 global batches (the ranks took batches 0,2,4 and 1,3,5)
    train(make_cfg(tmp_path / "single", ["adapter.gid_batches=6", "logger=csv", *common], fast=False))
    d = json.loads((tmp_path / "ddp" / "gid.json").read_text())
    s = json.loads((tmp_path / "single" / "gid.json").read_text())
    assert d["world_size"] == 2 and d["batches_total"] == 6 and s["batches_total"] == 6
    for name, stat in s["meta"]["gid_stats"].items():
        other = d["meta"]["gid_stats"][name]
        assert other["erank"] == pytest.approx(stat["erank"], rel=1e-4), name
        assert other["importance"] == pytest.approx(stat["importance"], rel=1e-4), name
    assert {n: e["spec"] for n, e in d["entries"].items()} == {n: e["spec"] for n, e in s["entries"].items()}
    digests = json.loads((tmp_path / "ddp" / "results.json").read_text())["structure_digest_per_rank"]
    assert len(set(digests)) == 1 and len(digests) == 2


@pytest.mark.slow
def test_resume_after_warmup_matches_uninterrupted_run(tmp_path: Path) -> None:
    # 48 sequences / batch 8 = 6 steps per epoch; keep every checkpoint so step 6 can be resumed
    common = [
        "adapter=ralora_pro",
        "adapter.gid_batches=2",
        "task.train_size=48",
        "trainer.max_steps=12",
        "callbacks.checkpoint.save_top_k=-1",
        "deterministic=true",
    ]
    full = train(make_cfg(tmp_path / "full", common))
    mid = tmp_path / "full" / "checkpoints" / "epoch=0-step=6.ckpt"
    assert mid.exists()
    resumed = train(make_cfg(tmp_path / "resumed", [*common, f"ckpt_path='{mid}'"]))
    assert not (tmp_path / "resumed" / "gid.json").exists()  # no re-estimate: the plan came from the checkpoint
    assert resumed["plan"]["entries"] == full["plan"]["entries"]
    a = _adapter_state(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = _adapter_state(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    # the structure is rebuilt from the checkpoint alone in a fresh module
    module = AdapterModule.from_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert {n: layer.spec().n_blocks for n, layer in module.adapter_layers().items()} == {
        n: e["spec"]["n_blocks"] for n, e in full["plan"]["entries"].items()
    }


def test_gid_profiling_command_writes_the_profile_without_training(tmp_path: Path) -> None:
    from lightning_ralora.reporting.gid_profile import profile_gid

    result = profile_gid(make_cfg(tmp_path, ["adapter=ralora", "adapter.gid_batches=2"]))
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"gid_profile.{suffix}").stat().st_size > 0
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "checkpoints").exists()
    assert result["train_mode"] is True
    layers = result["layers"]
    assert len(layers) == 14 and all(layer["planted_erank"] is not None for layer in layers.values())
    assert -1.0 <= result["spearman_erank_vs_planted"] <= 1.0
    table = (tmp_path / "gid_profile.md").read_text()
    assert "Spearman" in table and all(name in table for name in layers)
