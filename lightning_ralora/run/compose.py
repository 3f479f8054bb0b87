"""Composing a run's config: the Hydra configs (`conf/`, installed as `lightning_ralora.conf`: CONF_DIR), the paper
tables' sweep configs registered as `experiment=<name>` and the OmegaConf resolvers, both when this module is imported;
and the one-line exit for a config error."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import NoReturn, TypeVar

from omegaconf import DictConfig, open_dict

from lightning_ralora.core.errors import ConfigError
from lightning_ralora.run.catalog import register_experiments
from lightning_ralora.run.resolvers import register_resolvers

register_resolvers()
register_experiments()

CONF_DIR = str(resources.files("lightning_ralora.conf"))  # the repository's conf/, or the installed copy


T = TypeVar("T")


def compose_config(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> DictConfig:
    """The config the CLI composes from the package's conf/ with these overrides (outside a Hydra run: `run_dir`,
    if given, replaces the `${hydra:runtime.output_dir}` it would get, `overrides` the `${hydra:overrides.task}`)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.overrides = list(overrides)
        if run_dir is not None:
            cfg.run_dir = str(run_dir)
    return cfg


def config_error_exit(prog: str, err: ConfigError) -> NoReturn:
    """One message on stderr and exit code 2 (no traceback)."""
    print(f"{prog}: {err}", file=sys.stderr)
    sys.exit(2)


def exit_on_config_error(prog: str, fn: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run `fn(cfg)`; a ConfigError becomes one message on stderr and exit code 2 (no traceback)."""
    try:
        return fn(cfg)
    except ConfigError as err:
        config_error_exit(prog, err)
