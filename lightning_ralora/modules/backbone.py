"""Build the HF backbone a run adapts: `from_pretrained(name)` for real models, or from a config dict for tiny ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

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
    import os

    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    local, node = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("NODE_RANK", 0))
    return local if node == 0 else node * int(os.environ.get("LOCAL_WORLD_SIZE", 1)) + local


def checkpoint_missing_modules(model: nn.Module, pretrained: str) -> list[str]:
    """The modules `from_pretrained` would initialise fresh (as its `missing_keys`), read from the safetensors
    headers of a local directory only: no tensor is loaded."""
    from pathlib import Path

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
