"""Validate a composed run config before any model weights or data are touched: every problem is
collected and reported in one error that names the field and what is allowed.

One path for every section: the adapter through its registered typed schema (`adapters.registry`), the trainer
keys against Lightning's own accepted values, model/data paths on disk, the task through its `validate`, and the
target modules and per-layer shapes on the meta-device skeleton (no weights).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_ralora.adapters.base import AdapterLayer
from lightning_ralora.adapters.inject import find_modules
from lightning_ralora.adapters.registry import adapter_config, check_adapter, import_plugins
from lightning_ralora.adapters.schema import (
    is_int,
    is_number,
    is_pos_int,
    nonneg_int,
    nonneg_number,
    pos_int,
    pos_number,
    unit_interval,
)
from lightning_ralora.core.errors import ConfigError, one_line
from lightning_ralora.modules.backbone import FAMILIES, adapter_sites, meta_backbone
from lightning_ralora.run.cluster import launcher_problems
from lightning_ralora.tasks import TASKS

# --------------------------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------------------------
_FALLBACK_PRECISIONS = (64, 32, 16, "64", "32", "16", "bf16", "16-true", "16-mixed", "bf16-true", "bf16-mixed")
_FALLBACK_PRECISIONS += ("32-true", "64-true", "transformer-engine", "transformer-engine-float16")


def _literal_values(tp: Any) -> list[Any]:
    """Every value of a (nested) typing.Literal / Union."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return list(args)
    return [v for a in args for v in _literal_values(a)]


def lightning_precisions() -> tuple[Any, ...]:
    """The `precision` values Lightning accepts (its own `_PRECISION_INPUT`), with a fallback copy."""
    try:
        from lightning.fabric.connector import _PRECISION_INPUT

        values = _literal_values(_PRECISION_INPUT)
    except Exception:  # noqa: BLE001 - a private name: fall back to the list of Lightning 2.x
        values = []
    return tuple(values) or _FALLBACK_PRECISIONS


def lightning_strategies() -> tuple[str, ...]:
    """Strategy names Lightning resolves from a string ("auto" plus its StrategyRegistry)."""
    try:
        from lightning.pytorch.strategies import StrategyRegistry

        return ("auto", *StrategyRegistry.available_strategies())
    except Exception:  # noqa: BLE001
        return ("auto", "ddp", "ddp_spawn", "fsdp", "deepspeed", "single_device")


def _devices_ok(value: Any) -> bool:
    if value == "auto" or value == -1 or is_pos_int(value):
        return True
    if isinstance(value, str):  # Lightning's "2", "0,1", "-1"
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if value.strip() == "-1" or (len(parts) == 1 and parts[0].isdigit() and int(parts[0]) > 0):
            return True
        return len(parts) > 1 and all(p.isdigit() for p in parts)
    if isinstance(value, (list, tuple)):
        return bool(value) and all(is_int(v) and v >= 0 for v in value)
    return False


def visible_accelerators() -> dict[str, bool]:
    """{accelerator name Lightning accepts: whether such a device is visible in this process} ("gpu" is CUDA or
    MPS, "auto" and "cpu" always are)."""
    try:
        from lightning.pytorch.accelerators import AcceleratorRegistry

        found = {n: bool(AcceleratorRegistry[n]["accelerator"].is_available()) for n in AcceleratorRegistry}
    except Exception:  # noqa: BLE001 - a private layout changed: CUDA and MPS through torch
        import torch

        found = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    return {"auto": True, **found, "gpu": found.get("cuda", False) or found.get("mps", False)}


def check_accelerator(value: Any) -> list[str]:
    """`trainer.accelerator` must name an accelerator Lightning knows whose device this process can see."""
    if value is None or isinstance(value, Mapping):  # null: Lightning's default; a mapping: an instantiated class
        return []
    found = visible_accelerators()
    here = [n for n, ok in found.items() if ok]
    if value not in found:
        return [f"trainer.accelerator={value!r} is unknown; allowed: {sorted(found)} (visible here: {here})"]
    if not found[value]:
        return [f"trainer.accelerator={value!r}: no such device is visible on this machine; allowed here: {here}"]
    return []


def check_trainer(t: Mapping[str, Any], check_devices: bool = True) -> list[str]:
    """The Trainer keys a run depends on, checked against what Lightning accepts, each naming `trainer.<key>`;
    `check_devices`: the accelerator's device must be visible here (off for planning on another machine)."""
    ms, me = t.get("max_steps"), t.get("max_epochs")
    if ms == -1 and is_pos_int(me):  # epoch-based (the vision tables): the run ends after max_epochs
        problems = []
    elif ms == -1:
        problems = [f"trainer.max_steps=-1 needs a positive trainer.max_epochs (the run must end), got {me!r}"]
    else:
        problems = pos_int(ms, "trainer.max_steps")
        problems = [p + " (or -1 with a positive trainer.max_epochs)" for p in problems]
    if "devices" in t and not _devices_ok(t["devices"]):
        problems.append(
            f"trainer.devices={t['devices']!r} is not accepted; allowed: a positive integer, -1 (all), 'auto' "
            "or a list of device indices"
        )
    if "num_nodes" in t:
        problems += pos_int(t["num_nodes"], "trainer.num_nodes")
    if t.get("precision") is not None:
        allowed = lightning_precisions()
        if t["precision"] not in allowed:
            problems.append(f"trainer.precision={t['precision']!r} is unknown; allowed: {list(allowed)}")
    strategy = t.get("strategy")
    if isinstance(strategy, Mapping):
        if "_target_" not in strategy:
            problems.append("trainer.strategy as a mapping needs `_target_` (a Strategy class to instantiate)")
    elif strategy is not None and strategy not in lightning_strategies():
        problems.append(f"trainer.strategy={strategy!r} is unknown; allowed: {list(lightning_strategies())}")
    if "accumulate_grad_batches" in t:
        problems += pos_int(t["accumulate_grad_batches"], "trainer.accumulate_grad_batches")
    vci = t.get("val_check_interval")
    if vci is not None and not (is_pos_int(vci) or (isinstance(vci, float) and 0 < vci <= 1)):
        problems.append(
            f"trainer.val_check_interval must be a positive integer (batches) or a float in (0, 1] "
            f"(fraction of an epoch), got {vci!r}"
        )
    if t.get("gradient_clip_val") is not None:
        problems += nonneg_number(t["gradient_clip_val"], "trainer.gradient_clip_val")
    if me is not None and not (is_int(me) and me >= -1):
        problems.append(f"trainer.max_epochs must be an integer >= -1 (-1: unlimited) or null, got {me!r}")
    if check_devices:
        problems += check_accelerator(t.get("accelerator"))
    return problems


def check_optim(o: Mapping[str, Any]) -> list[str]:
    """The optimizer/scheduler keys the run reads, when present: lr > 0, weight_decay >= 0, warmup_ratio in [0, 1),
    warmup_steps >= 0, min_lr_ratio in [0, 1], betas two numbers in [0, 1)."""
    problems = pos_number(o.get("lr"), "optim.lr")
    if o.get("weight_decay") is not None:
        problems += nonneg_number(o["weight_decay"], "optim.weight_decay")
    if o.get("warmup_ratio") is not None:
        problems += unit_interval(o["warmup_ratio"], "optim.warmup_ratio")
    if o.get("warmup_steps") is not None:
        problems += nonneg_int(o["warmup_steps"], "optim.warmup_steps")
    mlr = o.get("min_lr_ratio")
    if mlr is not None and not (is_number(mlr) and 0 <= mlr <= 1):
        problems.append(f"optim.min_lr_ratio must be in [0, 1] (the cosine floor as a fraction of lr), got {mlr!r}")
    betas = o.get("betas")
    if betas is not None and not (
        isinstance(betas, (list, tuple)) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)
    ):
        problems.append(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
    return problems


def check_callbacks(callbacks: Mapping[str, Any]) -> list[str]:
    """The checkpoint callback's intervals (ModelCheckpoint refuses them only once the model is built)."""
    ckpt = callbacks.get("checkpoint")
    if not isinstance(ckpt, Mapping):
        return []
    problems = []
    for key in ("every_n_train_steps", "every_n_epochs"):
        if ckpt.get(key) is not None:
            problems += nonneg_int(ckpt[key], f"callbacks.checkpoint.{key}")
    top_k = ckpt.get("save_top_k")
    if top_k is not None and not (is_int(top_k) and top_k >= -1):
        problems.append(f"callbacks.checkpoint.save_top_k must be an integer >= -1 (-1: all), got {top_k!r}")
    return problems


# --------------------------------------------------------------------------------------------------------------
# model paths
# --------------------------------------------------------------------------------------------------------------
def looks_like_path(value: Any) -> bool:
    """A string meant as a local path: starts with / . ~ or names an existing relative directory."""
    return isinstance(value, str) and (value.startswith(("/", ".", "~")) or Path(value).is_dir())


def check_path(value: Any, name: str) -> list[str]:
    """`name=<value>: path not found` for a value that looks like a local path and does not exist."""
    if looks_like_path(value) and not Path(value).expanduser().exists():
        return [f"{name}={value}: path not found"]
    return []


MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")  # torch dtypes a backbone is loaded in


def check_model_section(model: Mapping[str, Any], adapter: Mapping[str, Any]) -> list[str]:
    """Model family, source (hub name / existing local path / config), tokenizer path and target patterns."""
    problems = []
    if model.get("family") not in FAMILIES:
        problems.append(f"model.family={model.get('family')!r} is unknown; allowed: {list(FAMILIES)}")
    if not model.get("pretrained") and not model.get("config"):
        problems.append(
            "model.pretrained (hub name or local path) or model.config (a transformers config dict) is required"
        )
    dtype = model.get("dtype")
    if dtype not in (None, "auto", *MODEL_DTYPES):
        allowed = ", ".join(MODEL_DTYPES)
        problems.append(f"model.dtype={dtype!r} is unknown; allowed: null, auto (the checkpoint's), {allowed}")
    problems += check_path(model.get("pretrained"), "model.pretrained")
    problems += check_path(model.get("tokenizer"), "model.tokenizer")
    if not (model.get("target_modules") or adapter.get("target_modules")):
        problems.append("model.target_modules (or adapter.target_modules) must name the linear layers to adapt")
    return problems


# --------------------------------------------------------------------------------------------------------------
# the whole config
# --------------------------------------------------------------------------------------------------------------
def validate_config(
    cfg: DictConfig | Mapping[str, Any], check_model: bool = True, check_devices: bool | None = None
) -> None:
    """Raise ConfigError listing every problem in the config. `check_model` builds the backbone skeleton on
    the meta device (no weights) to check the target patterns and shapes. `check_devices` (default: as
    `check_model`, so planning without a model, e.g. plan-memory on a login node, skips it) requires the
    `trainer.accelerator` device to be visible in this process.

    Variant plugins (`plugins` key, LIGHTNING_RALORA_PLUGINS) are imported first, so their kinds validate."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    try:
        import_plugins(c)
    except ImportError as err:
        raise ConfigError([str(err)]) from None
    model, task, adapter, trainer, optim = (c.get(k) or {} for k in ("model", "task", "adapter", "trainer", "optim"))
    problems = check_adapter(adapter)
    problems += check_model_section(model, adapter)
    task_cls = TASKS.get(task.get("name"))
    if task_cls is None:
        problems.append(f"task.name={task.get('name')!r} is unknown; allowed: {sorted(TASKS)}")
    else:
        problems += task_cls.validate(task, model)
    problems += check_trainer(trainer, check_model if check_devices is None else check_devices)
    problems += launcher_problems(trainer)  # no Lightning subprocess launcher inside a Hydra multirun
    problems += check_optim(optim)
    problems += check_callbacks(c.get("callbacks") or {})
    seed = c.get("seed")
    if not (is_int(seed) and seed >= 0):
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    if check_model and not problems:
        problems += _check_model(model, task, adapter, rehearsal="rehearsal" in c)
    if problems:
        raise ConfigError(problems)


def _names(names: list[str]) -> str:
    more = f", +{len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _check_shapes(targets: Mapping[str, tuple[int, int]], a: Mapping[str, Any], rehearsal: bool = False) -> list[str]:
    """The variant's per-layer shape rules (GraLoRA k | in, out; SDS r <= min(in, out)) on every target ({name:
    (out, in)}), one line per distinct problem listing the targets it hits; then its ranks (`rank_limits`) against the
    smallest min(in, out) of the targets, one line per field. Under `debug=rehearsal` (a width-64 stand-in for the
    real model, the adapter unchanged) a rank that only wastes parameters is let through; one that cannot be built
    is not."""
    schema = adapter_config(a)
    dims = {name: (i, o) for name, (o, i) in targets.items()}
    hits: dict[str, list[str]] = {}
    for name, (i, o) in dims.items():
        ranks = schema.rank_problems(i, o)
        for problem in schema.shape_problems(i, o):
            if not any(problem.startswith(r) for r in ranks):  # reported once below, over every target
                hits.setdefault(problem, []).append(name)
    out = [f"{problem} (targets: {_names(names)})" for problem, names in hits.items()]
    if rehearsal and not schema.ranks_must_fit:
        return out
    for key, value in schema.rank_limits().items():
        over = [name for name, (i, o) in dims.items() if value > min(i, o)]
        if over:
            limit = min(min(d) for d in dims.values())
            if schema.ranks_must_fit:
                why = f"adapter.kind={schema.kind!r} cannot build a larger {key}"
            else:
                why = f"a larger {key} only adds parameters"
            out.append(
                f"{schema.f(key)}={value} is above min(in_features, out_features) of {len(over)} target layer(s) "
                f"({_names(over)}): an update of an m x n layer has rank <= min(m, n) ({why}); "
                f"allowed: {key} <= {limit} for these targets"
            )
    return out


def _check_model(model: dict, task: dict, adapter: dict, rehearsal: bool = False) -> list[str]:
    """On the meta-device skeleton: the task's head and `model.trainable_modules` exist, the target patterns match
    linear layers outside them (`modules.backbone.adapter_sites`), and the adapter fits every target's shape."""
    try:
        skeleton = meta_backbone(model, task)
    except Exception as err:  # noqa: BLE001 - reported with the field that caused it
        where = f"model.pretrained={model['pretrained']!r}" if model.get("pretrained") else "model.config"
        return [f"{where} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:300]})"]
    problems = []
    heads = TASKS[task["name"]].head_modules
    if heads and not find_modules(skeleton, list(heads)):
        problems.append(
            f"task={task['name']} adds a head, but model.family={model['family']!r} has no module named one of "
            f"{list(heads)}; name the head in model.trainable_modules"
        )
    extra = model.get("trainable_modules") or []
    for entry in [extra] if isinstance(extra, str) else extra:  # a regex, or a list of suffixes
        if not find_modules(skeleton, entry if isinstance(extra, str) else [entry]):
            problems.append(f"model.trainable_modules entry {entry!r} matches no module of the model")
    try:
        sites = adapter_sites(skeleton, model, adapter, heads)
    except ValueError as err:
        return [*problems, str(err)]
    if problems:
        return problems
    if any(isinstance(m, AdapterLayer) for m in skeleton.modules()):
        return ["model already contains adapter layers"]
    return _check_shapes(sites.targets, adapter, rehearsal)


__all__ = [
    "ConfigError",
    "check_accelerator",
    "check_callbacks",
    "check_model_section",
    "check_optim",
    "check_path",
    "check_trainer",
    "lightning_precisions",
    "lightning_strategies",
    "looks_like_path",
    "one_line",
    "validate_config",
    "visible_accelerators",
]
