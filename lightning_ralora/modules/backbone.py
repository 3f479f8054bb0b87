"""Build the HF backbone a run adapts: `from_pretrained(name)` for real models, or from a config dict for tiny ones;
and find where its adapter goes (`adapter_sites`: the modules trained in full and the target linears with their
shapes), the one lookup the module, config validation and the memory plan share."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_ralora.adapters.inject import find_modules, find_targets, target_shapes

FAMILIES = ("causal_lm", "seq_classification", "seq2seq_lm", "image_classification", "clip_vision")


class _ClipVisionAuto:
    """`clip_vision`: CLIP's vision tower with a linear `classifier` on the mean of its patch tokens
    (transformers' CLIPForImageClassification); loads the vision weights of a full CLIP checkpoint
    (openai/clip-vit-base-patch16), the text tower is dropped."""

    @staticmethod
    def from_config(config, **kwargs: Any) -> nn.Module:
        from transformers import CLIPForImageClassification

        return CLIPForImageClassification._from_config(config, **kwargs)

    @staticmethod
    def from_pretrained(name: str, **kwargs: Any):
        from transformers import CLIPForImageClassification

        return CLIPForImageClassification.from_pretrained(name, **kwargs)


def _auto_class(family: str):
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq_classification": transformers.AutoModelForSequenceClassification,
        "seq2seq_lm": transformers.AutoModelForSeq2SeqLM,
        "image_classification": transformers.AutoModelForImageClassification,
        "clip_vision": _ClipVisionAuto,
    }[family]


def load_config(model_cfg: Mapping[str, Any], extra: Mapping[str, Any] | None = None):
    """The transformers config: from the hub/local path (`model.pretrained`) or built from `model.config`."""
    from transformers import AutoConfig

    extra = dict(extra or {})
    if model_cfg.get("pretrained"):
        return AutoConfig.from_pretrained(
            model_cfg["pretrained"], trust_remote_code=trust_remote_code(model_cfg), **extra
        )
    cfg = dict(model_cfg["config"])
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg, **extra)


def trust_remote_code(model_cfg: Mapping[str, Any]) -> bool:
    """Run a hub repo's own Python code only on an explicit `model.trust_remote_code=true` (off by default)."""
    return model_cfg.get("trust_remote_code") is True


def torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name in (None, "auto") else getattr(torch, name)


def build_backbone(
    model_cfg: Mapping[str, Any], extra_config: Mapping[str, Any] | None = None, meta: bool = False
) -> nn.Module:
    """Instantiate the model. `meta=True` builds the skeleton without memory (used to validate targets)."""
    return load_backbone(model_cfg, extra_config, meta)[0]


def meta_backbone(model_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any]) -> nn.Module:
    """The backbone's skeleton on the meta device (no weights, no tokenizer): the model config plus the task's
    `num_labels`, what config validation and the memory plan inspect before any weight is loaded."""
    extra = {"num_labels": task_cfg["num_labels"]} if "num_labels" in task_cfg else {}
    return build_backbone(model_cfg, extra, meta=True)


def trained_in_full(
    backbone: nn.Module, head_modules: Iterable[str], model_cfg: Mapping[str, Any], fresh: Iterable[str] = ()
) -> list[str]:
    """Modules trained in full beside the adapter (outermost names): the head the task adds (peft's
    `modules_to_save`), any module `from_pretrained` initialised fresh, and `model.trainable_modules` (suffixes or
    a regex, as target_modules). They are saved in adapter-only checkpoints and exported."""
    heads = list(head_modules)
    names = find_modules(backbone, heads) if heads else []
    extra = model_cfg.get("trainable_modules") or []
    for name in [*fresh, *(find_modules(backbone, extra) if extra else [])]:
        if not any(name == n or name.startswith(n + ".") for n in names):
            names.append(name)
    return names


@dataclass
class AdapterSites:
    """Where an adapter goes in a backbone: the modules trained in full and the target linears, each with its
    (out_features, in_features), in model order."""

    full: list[str]
    targets: dict[str, tuple[int, int]]


def adapter_sites(
    backbone: nn.Module,
    model_cfg: Mapping[str, Any],
    adapter_cfg: Mapping[str, Any],
    head_modules: Iterable[str] = (),
    fresh: Iterable[str] = (),
) -> AdapterSites:
    """The modules trained in full (`trained_in_full`) and the linears `adapter.target_modules` (else
    `model.target_modules`) matches outside them; the ValueError of `find_targets` when none match."""
    full = trained_in_full(backbone, head_modules, model_cfg, fresh)
    patterns = adapter_cfg.get("target_modules") or model_cfg["target_modules"]
    names = find_targets(backbone, patterns, exclude=full)
    return AdapterSites(full, target_shapes(backbone, names))


def block_module_names(model: nn.Module) -> set[str]:
    """Class names of the model's repeated blocks (FSDP wrapping units): transformers' `_no_split_modules` of the
    model and its submodules (those present), else the class-name heuristic (…DecoderLayer, …EncoderLayer, …Block)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    present = {type(m).__name__ for m in model.modules()}
    names &= present
    if names:
        return names
    names = {n for n in present if n.endswith(("DecoderLayer", "EncoderLayer", "Block"))}
    for m in model.modules():  # RoBERTa & co. (no _no_split_modules): the class repeated in a ModuleList
        kinds = {type(c).__name__ for c in m.children()} if isinstance(m, nn.ModuleList) and len(m) > 1 else set()
        if len(kinds) == 1 and not isinstance(m[0], nn.Linear):
            names |= kinds
    return names


def load_backbone(
    model_cfg: Mapping[str, Any], extra_config: Mapping[str, Any] | None = None, meta: bool = False
) -> tuple[nn.Module, list[str]]:
    """The model and the modules `from_pretrained` initialised fresh because the checkpoint lacks them (a new
    task head, a pooler missing from a masked-LM checkpoint); those must train in full and be saved."""
    auto = _auto_class(model_cfg["family"])
    config = load_config(model_cfg, extra_config)
    dtype = torch_dtype(model_cfg.get("dtype"))
    if meta:
        with torch.device("meta"):
            return auto.from_config(config), []
    if model_cfg.get("pretrained"):
        model, info = auto.from_pretrained(
            model_cfg["pretrained"],
            config=config,
            dtype=dtype,
            output_loading_info=True,
            trust_remote_code=trust_remote_code(model_cfg),
        )
        missing = sorted({key.rpartition(".")[0] for key in info.get("missing_keys", ())})
        return model, missing
    model = auto.from_config(config)
    return (model.to(dtype) if dtype is not None else model), []


def env_global_rank() -> int:
    """This process's global rank from the launcher's environment (torchrun/SLURM: RANK; Lightning's launcher:
    NODE_RANK and LOCAL_RANK), usable before the process group exists; 0 outside a multi-process launch."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    local, node = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("NODE_RANK", 0))
    return local if node == 0 else node * int(os.environ.get("LOCAL_WORLD_SIZE", 1)) + local


def checkpoint_missing_modules(model: nn.Module, pretrained: str) -> list[str]:
    """The modules `from_pretrained` would initialise fresh (as its `missing_keys`), read from the safetensors
    headers of a local directory only: no tensor is loaded."""
    from safetensors import safe_open

    files = sorted(Path(pretrained).glob("*.safetensors")) if Path(pretrained).is_dir() else []
    if not files:
        raise ValueError(f"model.load_on_rank0 needs model.pretrained to be a local safetensors dir: {pretrained}")
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys.update(st.keys())
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [
        k
        for k in model.state_dict()
        if k not in tied and k not in keys and prefix + k not in keys and k.removeprefix(prefix) not in keys
    ]
    return sorted({k.rpartition(".")[0] for k in missing})


def load_backbone_rank0(
    model_cfg: Mapping[str, Any], extra_config: Mapping[str, Any] | None = None, rank: int | None = None
) -> tuple[nn.Module, list[str]]:
    """Bounded host memory: rank 0 loads the pretrained weights (`load_backbone`); every other rank builds the
    meta skeleton (no tensor loaded) with the same fresh-module list; `AdapterModule.configure_model` then
    broadcasts rank 0's weights shard by shard after fully_shard."""
    rank = env_global_rank() if rank is None else rank
    if rank == 0:
        return load_backbone(model_cfg, extra_config)
    model, _ = load_backbone(model_cfg, extra_config, meta=True)
    dtype = torch_dtype(model_cfg.get("dtype"))
    model = model.to(dtype) if dtype is not None else model
    return model, checkpoint_missing_modules(model, model_cfg["pretrained"])


def host_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors held in memory (meta tensors hold none): what loading materialised."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if not t.is_meta}
    return sum(t.numel() * t.element_size() for t in tensors.values())
