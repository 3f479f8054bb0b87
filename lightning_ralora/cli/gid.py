"""`lightning-ralora-gid [overrides]`: the GID profile of a config (warm-up GID per module, the plan it gives,
its figures) without training (lightning_ralora.reporting.gid_profile)."""

from __future__ import annotations

from typing import Any

import hydra

from lightning_ralora.reporting.gid_profile import profile_gid
from lightning_ralora.run.compose import CONF_DIR, exit_on_config_error


def _hydra_gid(cfg: Any) -> None:
    """One profile; a config error is one line and exit code 2."""
    exit_on_config_error("lightning-ralora-gid", profile_gid, cfg)


def gid_main() -> None:
    """`lightning-ralora-gid [overrides]`: the GID profile of a model on a task, same Hydra groups as training."""
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(_hydra_gid)()


if __name__ == "__main__":
    gid_main()
