"""The paper-table folders (`experiments/<paper>/<table>/`, installed as `lightning_ralora.experiments`): their sweep
configs, registered as Hydra's `experiment=<name>` options; their table specs (`table.yaml`); the papers' own records
(`<paper>/paper.yaml`). Adding a table is adding a folder: nothing here changes."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

SPEC_FILES = ("table.yaml", "paper.yaml")  # data files of a folder; every other *.yaml is a sweep config


def experiments_dir() -> Path:
    """The folder of paper tables (the repository's experiments/, or the installed package data)."""
    return Path(str(resources.files("lightning_ralora.experiments")))


@cache
def sweep_configs() -> dict[str, Path]:
    """{experiment name: its yaml} for every sweep config below experiments/; a name used twice is an error."""
    found: dict[str, Path] = {}
    for path in sorted(experiments_dir().rglob("*.yaml")):
        if path.name in SPEC_FILES:
            continue
        if path.stem in found:
            raise ValueError(f"experiment name {path.stem!r} is used twice: {found[path.stem]} and {path}")
        found[path.stem] = path
    return found


def register_experiments() -> None:
    """Make every sweep config selectable as `experiment=<name>` (a `# @package _global_` config, as in conf/)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    for name, path in sweep_configs().items():
        store.store(group="experiment", name=name, node=OmegaConf.load(path), package="_global_")


@cache
def table_docs() -> dict[str, tuple[Path, dict[str, Any]]]:
    """{table id: (its folder, its parsed table.yaml)}."""
    docs: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in sorted(experiments_dir().rglob("table.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc["id"] in docs:
            raise ValueError(f"table id {doc['id']!r} is used twice: {docs[doc['id']][0]} and {path.parent}")
        docs[doc["id"]] = (path.parent, doc)
    return docs


def table_folder(table_id: str) -> Path:
    """The folder of one table (its sweep configs, table.yaml and protocol card)."""
    return table_docs()[table_id][0]


@cache
def paper_docs() -> dict[str, dict[str, Any]]:
    """{paper: its paper.yaml}: source, what the copy does not capture, the published tables no folder reproduces."""
    return {p.parent.name: yaml.safe_load(p.read_text()) for p in sorted(experiments_dir().glob("*/paper.yaml"))}
