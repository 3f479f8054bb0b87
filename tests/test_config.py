"""Every shipped config composes and validates; experiment files override the right groups."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_ralora.run.catalog import sweep_configs
from lightning_ralora.run.compose import CONF_DIR
from lightning_ralora.run.methods import apply_method_settings
from lightning_ralora.run.validate import validate_config
from tests.conftest import make_cfg

EXPERIMENTS = sorted(sweep_configs())
ADAPTERS = sorted(p.stem for p in (Path(CONF_DIR) / "adapter").glob("*.yaml"))


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_every_adapter_config_validates_on_the_tiny_model(tmp_path: Path, adapter: str) -> None:
    cfg = make_cfg(tmp_path, [f"adapter={adapter}"])
    if adapter.endswith("gralora"):  # the paper recipe (r=32, k=2) fits the tiny model's 32-wide k/v projections
        assert cfg.adapter.k == 2
    validate_config(cfg)
    assert cfg.adapter.name == adapter


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_configs_compose(tmp_path: Path, experiment: str) -> None:
    cfg = make_cfg(tmp_path, [f"experiment={experiment}"], fast=False)
    table = [k for k, v in OmegaConf.to_container(cfg.methods, resolve=False).items() if v is not None]
    if table and cfg.adapter.name not in table:  # the default adapter is not a row of this table: take its first
        cfg = make_cfg(tmp_path, [f"experiment={experiment}", f"adapter={table[0]}"], fast=False)
    cfg = apply_method_settings(cfg, [])  # as train() does before validating
    assert cfg.experiment_name == experiment
    header = sweep_configs()[experiment].read_text().splitlines()[0]
    assert header == "# @package _global_"
    validate_config(cfg, check_model=(cfg.model.pretrained is None))


def test_published_numbers_cover_spec_section_8() -> None:
    """The headline numbers the papers state (RaLoRA GSM8K, SDS-LoRA commonsense average) are in the table folders."""
    from lightning_ralora.reporting.published import published_cell

    gsm8k = {"lora": 67.78, "ralora": 72.25, "ralora_pro": 73.01, "full": 73.69}
    for method, value in gsm8k.items():
        assert published_cell("ralora_nlg", "llama31_8b", None if method == "full" else 8, method, "gsm8k")[0] == value
    assert published_cell("sds_commonsense", "llama3_8b", 8, "sds_lora", "avg")[0] == 85.42
