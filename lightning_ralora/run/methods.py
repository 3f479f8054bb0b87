"""Per-method settings of an experiment table: `methods.<adapter.name>` is merged into the composed config.

An experiment file reproduces one paper table, and the paper often fixes settings per method (the SDS-LoRA paper:
s = 2 for LoRA, s = α/√r with α = 4 for the others, a smaller lr for full fine-tuning). They live beside the table:

    methods:
      lora: {adapter: {scale: 2.0}}
      full: {optim: {lr: 1e-5}}

`apply_method_settings` merges the entry of the selected adapter, except the keys the user set on the command
line (those win). An adapter missing from a non-empty table is a ConfigError: the table lists what the paper ran.
An entry set to null (`methods: {full: null}`) removes an entry inherited from another experiment file.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_ralora.core.errors import ConfigError

log = logging.getLogger(__name__)


def command_line(root: DictConfig) -> list[str]:
    """The command-line overrides: Hydra's `hydra.overrides.task` when the config carries the Hydra node, else the
    `overrides` key (Hydra's task overrides inside a run, compose_config's list outside)."""
    for key in ("hydra.overrides.task", "overrides"):
        value = OmegaConf.select(root, key, default=None, throw_on_resolution_failure=False)
        if value is not None and not isinstance(value, str):
            return [str(o) for o in value]
    return []


def _override_keys(overrides: list[str]) -> list[tuple[str, bool]]:
    """(key, covers_subtree) per override: `adapter.alpha=8` -> ("adapter.alpha", False); a dict value such as
    `adapter.peft={use_rslora:false}` also covers the keys below it; a group choice (`adapter=rslora`) does not."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # not Hydra syntax: fall back to the text before '='
        keys = (o.split("=", 1)[0].lstrip("+~") for o in overrides)
        return [(k.split("@", 1)[0], False) for k in keys]
    out = []
    for o in parsed:
        value = None if o.is_delete() or o.is_sweep_override() else o.value()
        out.append((o.key_or_group, isinstance(value, dict)))
    return out


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every non-dict value of a plain nested dict."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _user_set(path: str, keys: list[tuple[str, bool]]) -> bool:
    """True if a command-line override set `path`, a key below it, or (with a dict value) a node above it."""
    for key, covers_subtree in keys:
        if path == key or key.startswith(path + ".") or (covers_subtree and path.startswith(key + ".")):
            return True
    return False


def apply_method_settings(cfg: DictConfig, overrides: list[str] | None = None) -> DictConfig:
    """Merge `cfg.methods[cfg.adapter.name]` into a copy of `cfg`, keeping the keys set in `overrides`
    (default: the command line's, `cfg.overrides`)."""
    table = OmegaConf.to_container(cfg.methods, resolve=False) if cfg.get("methods") else {}
    defined = [str(k) for k, v in table.items() if v is not None]
    if not defined:
        return cfg
    name = cfg.adapter.name
    if name not in defined:
        raise ConfigError(
            [
                f"adapter={name} is not in the methods table of experiment_name={cfg.get('experiment_name')}; "
                f"that table defines: {', '.join(defined)}"
            ]
        )
    entry = table[name]  # a plain dict: interpolations such as ${mul:2,${adapter.r}} stay strings
    if not isinstance(entry, dict):
        raise ConfigError([f"methods.{name} must be a mapping of config overrides, got {entry!r}"])
    keys = _override_keys(command_line(cfg) if overrides is None else overrides)
    kept, applied = [], {}
    for path, value in _leaves(entry):
        if _user_set(path, keys):
            kept.append(path)
        else:
            applied[path] = value
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for path, value in applied.items():
            OmegaConf.update(out, path, value, merge=True, force_add=True)
        # keep only the applied entry: the others may interpolate keys this adapter lacks (hybrid_r, r of full FT)
        out.methods = OmegaConf.create({name: entry})
    log.info("methods.%s: applied %s; kept the command line's %s", name, applied or "{}", kept or "[]")
    return out
