"""`lightning-ralora-plan-memory [overrides]`: the memory a config needs per GPU, before a run
(lightning_ralora.reporting.memory_plan)."""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from lightning_ralora.reporting.memory_plan import plan_memory, table
from lightning_ralora.run.compose import CONF_DIR, exit_on_config_error


def _hydra_plan(cfg: DictConfig, as_json: bool = False) -> None:
    """One estimate, printed as the table (or as JSON with --json)."""
    result = exit_on_config_error("lightning-ralora-plan-memory", plan_memory, cfg)
    print(json.dumps(result, indent=2) if as_json else table(result))


def main() -> None:
    """`lightning-ralora-plan-memory [overrides] [--json]`: the expected peak memory per GPU of a run config."""
    as_json = "--json" in sys.argv
    sys.argv = [a for a in sys.argv if a != "--json"]

    def one_estimate(cfg: DictConfig) -> None:
        _hydra_plan(cfg, as_json)

    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(one_estimate)()


if __name__ == "__main__":
    main()
