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
