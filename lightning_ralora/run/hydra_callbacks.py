"""Hydra callbacks (conf/hydra/default.yaml): secrets redacted from the files Hydra writes, and the summary of a
sweep."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from lightning_ralora.core.secrets import HYDRA_FILES, config_secrets, redact_yaml_file
from lightning_ralora.run.record import SWEEP_ID_ENV, print_sweep_summary


class RedactHydraFiles(HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): Hydra writes `<run_dir>/.hydra/{config,hydra,overrides}.yaml` (and
    a sweep's `multirun.yaml`) before the job starts, secrets included; at job start, before the task runs, they
    are rewritten redacted."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hc = config.hydra
        found = config_secrets(config)
        if hc.output_subdir is not None:
            for name in HYDRA_FILES:
                redact_yaml_file(Path(str(hc.runtime.output_dir)) / str(hc.output_subdir) / name, found)
        if str(hc.mode) == "RunMode.MULTIRUN":
            redact_yaml_file(Path(str(hc.sweep.dir)) / "multirun.yaml", found)


class SweepSummary(HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): after a multirun, one line per job of this sweep (its status and
    run dir, the error of a failed one); `failed` tells `main` to exit 1. The sweep's id (an environment variable
    its jobs inherit, on this machine or through SLURM) is in every record its jobs write, so a concurrent sweep
    into the same directory is not counted."""

    failed: int = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_ID_ENV] = uuid.uuid4().hex[:12]
        SweepSummary.failed = 0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.failed = print_sweep_summary(Path(str(config.hydra.sweep.dir)))
