"""`lightning-ralora-train [overrides]` (or `python -m lightning_ralora.cli.train`): one training run, or a sweep (-m).

The configs are the repository's conf/ (installed as `lightning_ralora.conf`: CONF_DIR); add your own config
directory with `hydra.searchpath=[file:///path/to/my_conf]`. The run itself: lightning_ralora.run.job.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from lightning_ralora.cli.checks import exit_on_bad_command_line
from lightning_ralora.core.signals import install_stop_handlers
from lightning_ralora.run.cluster import objective_value, worst_objective
from lightning_ralora.run.compose import CONF_DIR
from lightning_ralora.run.hydra_callbacks import SweepSummary
from lightning_ralora.run.job import run_job


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    """One job; returns the task's objective (`task.objective.metric`) for Hydra's sweepers (Optuna); the worst
    value (-inf maximising, +inf minimising) for a job that did not complete, so an Optuna search goes on."""
    results = run_job(cfg)
    if results.get("status", "completed") != "completed":
        return worst_objective(cfg.task)
    return objective_value(cfg.task, results["final_metrics"])


def main() -> None:
    """`lightning-ralora-train [overrides]`: one training run (or a sweep with -m) from the Hydra configs; a sweep
    with a failed job exits 1 after its summary; a stop signal exits 128 + the signal after recording the run."""
    exit_on_bad_command_line(sys.argv[1:], "lightning-ralora-train")  # Hydra-level errors: one line, exit 2
    install_stop_handlers()
    _hydra_main()
    if SweepSummary.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
