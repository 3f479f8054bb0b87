"""The experiment tables follow their papers: compose each (experiment, method), apply the `methods` table, build
the adapter layer and compare its scale with the paper's rule computed here (compose only, no training)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_ralora.adapters import ADAPTER_CLASSES
from lightning_ralora.adapters.attach import attachment
from lightning_ralora.adapters.registry import spec_from_cfg
from lightning_ralora.core.errors import ConfigError
from lightning_ralora.rank.estimate import GIDStat
from lightning_ralora.rank.rules import build_ralora_plan
from lightning_ralora.run.catalog import sweep_configs
from lightning_ralora.run.compose import compose_config
from lightning_ralora.run.methods import apply_method_settings
from lightning_ralora.run.validate import validate_config

SDS_METHODS = ["lora", "rslora", "lora_plus", "pissa", "dora", "sds_lora", "full"]
SDS_LR = {  # SDS-LoRA paper, Table 10: (LoRA-based lr, full-FT lr)
    "sds_commonsense_llama": (1e-4, 1e-5),
    "sds_commonsense_gemma": (2e-4, 2e-5),
}
SDS_RANKS = [8, 32]  # SDS-LoRA paper, Table 1
GRALORA_RANKS = [16, 32, 64, 128]  # GraLoRA paper: k = 2 for r in {16, 32}, k = 4 for r in {64, 128}
RALORA_TABLES = {
    "ralora_glue_t5": ["lora", "ralora", "ralora_pro", "full"],
    "ralora_gsm8k_llama": ["lora", "ls_lora", "ralora", "ralora_pro", "full"],
    "ralora_rank_ablation": ["lora", "ls_lora", "ralora", "ralora_pro"],
}


def settled(tmp_path: Path, overrides: list[str]) -> DictConfig:
    """Compose as the CLI would, apply the experiment's methods table (the overrides win), and validate."""
    cfg = compose_config(overrides, run_dir=tmp_path)
    cfg = apply_method_settings(cfg, overrides)
    validate_config(cfg, check_model=False)
    return cfg


def built_scaling(adapter: DictConfig) -> float:
    """The scale of the adapter layer this config builds on a 64x64 linear (peft: peft's own LoRA layer)."""
    a: dict[str, Any] = OmegaConf.to_container(adapter, resolve=True)
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    if a["kind"] == "peft":  # the peft variant's own attachment, as AdapterModule.configure_model calls it
        model = attachment("peft").attach(nn.Sequential(lin), ["0"], [], a, None)
        return float(model.base_model.model[0].scaling["default"])
    if a["kind"] == "ralora":  # the plan the GID warm-up would build (erank = r: one block, the scale is the point)
        stat = GIDStat(erank=float(a["r"]), importance=1.0, sigma=torch.ones(1), grad_norm=1.0, shape=(64, 64))
        spec = build_ralora_plan({"lin": stat}, {"lin": (64, 64)}, a).specs()["lin"]
    else:
        spec = spec_from_cfg(a)
    return float(ADAPTER_CLASSES[spec.kind].from_spec(lin, spec).scaling)


# --------------------------------------------------------------------------------------------------------------
# SDS-LoRA tables
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", sorted(SDS_LR))
def test_sds_tables_list_the_papers_methods(tmp_path: Path, experiment: str) -> None:
    assert _methods(experiment) == sorted(SDS_METHODS)


@pytest.mark.parametrize("r", SDS_RANKS)
@pytest.mark.parametrize("method", [m for m in SDS_METHODS if m != "full"])
@pytest.mark.parametrize("experiment", sorted(SDS_LR))
def test_sds_tables_scale_lr_and_optimizer(tmp_path: Path, experiment: str, method: str, r: int) -> None:
    cfg = settled(tmp_path, [f"experiment={experiment}", f"adapter={method}", f"adapter.r={r}"])
    paper_s = 2.0 if method == "lora" else 4 / math.sqrt(r)  # §4.1: s = 2 for LoRA, α/√r with α = 4 otherwise
    assert built_scaling(cfg.adapter) == pytest.approx(paper_s, rel=1e-6)
    assert cfg.optim.lr == SDS_LR[experiment][0]
    assert cfg.optim.weight_decay == 0.0
    assert cfg.task.batch_size * cfg.trainer.accumulate_grad_batches == 32
    assert cfg.trainer.max_epochs == 1
    if method == "lora_plus":
        assert cfg.adapter.lr_ratio_B == 4.0  # LoRA+ with ratio λ = 4
    else:
        assert cfg.adapter.get("lr_ratio_B", 1.0) == 1.0
    if method == "sds_lora":
        assert (cfg.adapter.warmup_steps, cfg.adapter.K) == (10, 5)


@pytest.mark.parametrize("experiment", sorted(SDS_LR))
def test_sds_tables_full_fine_tuning_lr(tmp_path: Path, experiment: str) -> None:
    cfg = settled(tmp_path, [f"experiment={experiment}", "adapter=full"])
    assert cfg.optim.lr == SDS_LR[experiment][1]
    assert cfg.optim.weight_decay == 0.0


def test_sds_peft_methods_keep_their_peft_options(tmp_path: Path) -> None:
    dora = settled(tmp_path, ["experiment=sds_commonsense_llama", "adapter=dora"]).adapter.peft
    pissa = settled(tmp_path, ["experiment=sds_commonsense_llama", "adapter=pissa"]).adapter.peft
    assert dora.use_dora and dora.use_rslora
    assert pissa.init_lora_weights == "pissa" and pissa.use_rslora


# --------------------------------------------------------------------------------------------------------------
# GraLoRA table
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", GRALORA_RANKS)
@pytest.mark.parametrize("method", ["lora", "gralora"])
def test_gralora_table_alpha_2r_and_k_by_rank(tmp_path: Path, method: str, r: int) -> None:
    cfg = settled(tmp_path, ["experiment=gralora_code_llama", f"adapter={method}", f"adapter.r={r}"])
    assert cfg.adapter.alpha == 2 * r
    assert built_scaling(cfg.adapter) == pytest.approx(2 * r / r)  # s = α/(r + 0) with α = 2r
    if method == "gralora":
        assert cfg.adapter.hybrid_r == 0
        assert cfg.adapter.k == (2 if r <= 32 else 4)


def test_gralora_table_hybrid_states_its_alpha(tmp_path: Path) -> None:
    cfg = settled(tmp_path, ["experiment=gralora_code_llama", "adapter=hybrid_gralora"])
    a = cfg.adapter
    total = a.r + a.hybrid_r
    assert total <= 16 and a.hybrid_r <= total // 2  # low rank only, at most half of it shared
    assert a.alpha == 2 * total and a.k == 2
    assert built_scaling(a) == pytest.approx(2 * total / (a.r + a.hybrid_r))


# --------------------------------------------------------------------------------------------------------------
# RaLoRA tables
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", sorted(RALORA_TABLES))
def test_ralora_tables_list_the_papers_methods(tmp_path: Path, experiment: str) -> None:
    assert _methods(experiment) == sorted(RALORA_TABLES[experiment])


@pytest.mark.parametrize(
    ("experiment", "method"), [(e, m) for e, ms in sorted(RALORA_TABLES.items()) for m in ms if m != "full"]
)
def test_ralora_tables_r_equals_r_ref_8(tmp_path: Path, experiment: str, method: str) -> None:
    cfg = settled(tmp_path, [f"experiment={experiment}", f"adapter={method}"])
    assert cfg.adapter.r == 8
    if cfg.adapter.kind == "ralora":
        assert cfg.adapter.r_ref == 8 and cfg.adapter.gid_batches == 8
    assert built_scaling(cfg.adapter) == pytest.approx(cfg.adapter.alpha / 8)  # α/r_ref (LoRA: α/r), r_ref = r


@pytest.mark.parametrize("r", [8, 64])
@pytest.mark.parametrize("method", RALORA_TABLES["ralora_rank_ablation"])
def test_rank_ablation_r_ref_follows_r(tmp_path: Path, method: str, r: int) -> None:
    cfg = settled(tmp_path, ["experiment=ralora_rank_ablation", f"adapter={method}", f"adapter.r={r}"])
    assert cfg.adapter.r == r
    if cfg.adapter.kind == "ralora":
        assert cfg.adapter.r_ref == r
    assert built_scaling(cfg.adapter) == pytest.approx(cfg.adapter.alpha / r)


def test_ralora_full_fine_tuning_lr(tmp_path: Path) -> None:
    cfg = settled(tmp_path, ["experiment=ralora_gsm8k_llama", "adapter=full"])
    assert cfg.optim.lr == 1e-5


# --------------------------------------------------------------------------------------------------------------
# the mechanism: command line wins, unknown methods are errors, no table changes nothing
# --------------------------------------------------------------------------------------------------------------
def test_command_line_override_wins_over_the_methods_table(tmp_path: Path) -> None:
    cfg = settled(tmp_path, ["experiment=sds_commonsense_llama", "adapter=rslora", "adapter.alpha=8"])
    assert cfg.adapter.alpha == 8
    assert built_scaling(cfg.adapter) == pytest.approx(8 / math.sqrt(8))
    full = settled(tmp_path, ["experiment=sds_commonsense_llama", "adapter=full", "optim.lr=3e-5"])
    assert full.optim.lr == 3e-5
    plus = settled(tmp_path, ["experiment=sds_commonsense_llama", "adapter=lora_plus", "adapter.lr_ratio_B=16"])
    assert plus.adapter.lr_ratio_B == 16 and plus.adapter.alpha == 4  # only the overridden key is kept


def test_dict_override_covers_the_keys_below_it(tmp_path: Path) -> None:
    overrides = ["experiment=sds_commonsense_llama", "adapter=dora", "++adapter.peft={use_dora:true,use_rslora:false}"]
    cfg = settled(tmp_path, overrides)
    assert cfg.adapter.peft.use_rslora is False and cfg.adapter.alpha == 4
    assert built_scaling(cfg.adapter) == pytest.approx(4 / 8)  # the user's choice: α/r


@pytest.mark.parametrize(
    ("experiment", "adapter", "listed"),
    [
        ("sds_commonsense_llama", "gralora", "sds_lora"),
        ("gralora_code_llama", "full", "hybrid_gralora"),
        ("ralora_rank_ablation", "full", "ralora_pro"),  # dropped with `full: null`
    ],
)
def test_adapter_missing_from_the_table_is_a_config_error(
    tmp_path: Path, experiment: str, adapter: str, listed: str
) -> None:
    with pytest.raises(ConfigError, match=rf"adapter={adapter}\b.*{listed}"):
        settled(tmp_path, [f"experiment={experiment}", f"adapter={adapter}"])


@pytest.mark.parametrize("adapter", ["lora", "gralora", "full"])
def test_no_table_changes_nothing(tmp_path: Path, adapter: str) -> None:
    cfg = compose_config([f"adapter={adapter}"], run_dir="/tmp/unused")
    assert OmegaConf.to_container(cfg.methods) == {}
    assert apply_method_settings(cfg, []) is cfg


def test_gralora_k_resolver() -> None:
    cfg = OmegaConf.create({"r": 16, "k": "${gralora_k:${r}}", "alpha": "${mul:2,${r}}", "t": "${add:${r},8}"})
    assert (cfg.k, cfg.alpha, cfg.t) == (2, 32, 24)
    cfg.r = 64
    assert (cfg.k, cfg.alpha) == (4, 128)


# --------------------------------------------------------------------------------------------------------------
# every experiment: each method of its table composes, validates, and asks for suites that exist
# --------------------------------------------------------------------------------------------------------------
EXPERIMENTS = sorted(sweep_configs())


def _methods(experiment: str) -> list[str]:
    """The methods an experiment's table lists (composed, before any is applied)."""
    cfg = compose_config([f"experiment={experiment}"], run_dir="/tmp/unused")
    table = OmegaConf.to_container(cfg.methods, resolve=False) if cfg.get("methods") else {}
    return sorted(k for k, v in table.items() if v is not None) or [cfg.adapter.name]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_for_each_of_its_methods(tmp_path: Path, experiment: str) -> None:
    from lightning_ralora.evaluation import CLASSIFICATION_SUITES, SUITES
    from lightning_ralora.evaluation.runner import suite_names

    for method in _methods(experiment):
        cfg = settled(tmp_path, [f"experiment={experiment}", f"adapter={method}"])
        assert cfg.adapter.name == method
        for suite in suite_names(cfg.get("eval")):
            assert suite in SUITES or suite in CLASSIFICATION_SUITES, (experiment, suite)


@pytest.mark.parametrize("hybrid_r", [0, 4, 8, 12])
def test_hybrid_ratio_sweep_keeps_total_rank_16_and_scale_2(tmp_path: Path, hybrid_r: int) -> None:
    cfg = settled(
        tmp_path, ["experiment=gralora_hybrid_ratio", "adapter=hybrid_gralora", f"adapter.hybrid_r={hybrid_r}"]
    )
    assert cfg.adapter.r + cfg.adapter.hybrid_r == 16  # GraLoRA paper: shared share hybrid_r/16 of the total rank
    assert built_scaling(cfg.adapter) == pytest.approx(2.0)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_k_sweep_runs_at_r64_with_the_requested_k(tmp_path: Path, k: int) -> None:
    cfg = settled(tmp_path, ["experiment=gralora_k_sweep", "adapter=gralora", f"adapter.k={k}"])
    assert (cfg.adapter.r, cfg.adapter.k, cfg.adapter.alpha) == (64, k, 128)  # α = 2r, the command line's k wins
