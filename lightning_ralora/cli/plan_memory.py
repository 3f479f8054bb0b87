"""`lightning-ralora-plan-memory [overrides]`: the memory a config needs per GPU, before a run
(lightning_ralora.reporting.memory_plan)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from lightning_ralora.reporting.memory_plan import plan_memory
from lightning_ralora.run.compose import CONF_DIR, exit_on_config_error


def _hydra_plan(cfg: DictConfig) -> None:

    exit_on_config_error("lightning-ralora-plan-memory", plan_memory, cfg)


def main() -> None:
    """`lightning-ralora-plan-memory [overrides] [--json]`: the expected peak memory per GPU of a run config."""

    global _AS_JSON
    _AS_JSON = "--json" in sys.argv
    sys.argv = [a for a in sys.argv if a != "--json"]
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(_hydra_plan)()


if __name__ == "__main__":
    main()
