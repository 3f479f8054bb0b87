"""Causal-LM supervised fine-tuning on prompt/response pairs; the loss covers response tokens only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_ralora.adapters.schema import pos_int
from lightning_ralora.data.datamodule import ListDataModule
from lightning_ralora.data.templates import TEMPLATES, render_prompt
from lightning_ralora.data.tokenizer import encode_prompt, load_tokenizer, special_affixes
from lightning_ralora.tasks.base import Task
from lightning_ralora.tasks.text_data import EncodedText, check_data_source, tokenizer_key

IGNORE = -100


def encode_pair(
    tokenizer,
    prompt: str,
    response: str,
    max_length: int,
    add_special_tokens: bool = True,
    prefix: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Token ids of prompt + response + eos, with labels = -100 on the prompt. The prompt is encoded as the
    references tokenize their text (`encode_prompt`: the tokenizer's BOS first where it adds one, never two, no EOS
    inside the prompt; `add_special_tokens=False`: the text's ids only); the response gets no special tokens at its
    start and EOS at its end. Over max_length, the response keeps at least half of it (all, if shorter) and the
    prompt loses the beginning of its text, after its leading special ids: an example whose labels were all masked
    would make the loss NaN (the prompt's end, e.g. "### Response:", stays next to the response). `prefix` is
    `special_affixes(tokenizer)[0]` when the caller computed it once for every row."""
    if prefix is None or not add_special_tokens:
        prefix = special_affixes(tokenizer)[0] if add_special_tokens else []
    p_ids = encode_prompt(tokenizer, prompt, add_special_tokens, prefix)
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p_ids) + len(r_ids) > max_length:
        r_ids = r_ids[: min(len(r_ids), max(max_length - len(p_ids), max_length // 2, 1))]
        budget = max_length - len(r_ids)
        head = len(prefix) if prefix and p_ids[: len(prefix)] == prefix and budget > len(prefix) else 0
        p_ids = p_ids[:head] + p_ids[len(p_ids) - (budget - head) :]
    ids = p_ids + r_ids
    labels = [IGNORE] * len(p_ids) + r_ids
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def sft_collator(tokenizer):
    """transformers' padding collator: right-pads input_ids/attention_mask, and labels with -100."""
    from transformers import DataCollatorForSeq2Seq

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")

    def collate(items: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return collator([{k: v.tolist() if hasattr(v, "tolist") else v for k, v in it.items()} for it in items])

    return collate


class SFTTask(Task):
    """`task=sft`: JSONL of {prompt, response} (or a hub dataset), next-token loss on the response."""

    name = "sft"
    loads_tokenizer = True
    objective = ("val/loss", "minimize")
    families = ("causal_lm",)

    @classmethod
    def validate(cls, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[str]:
        keys = {"prompt_key": "prompt", "response_key": "response"}
        problems = super().validate(cfg, model_cfg) + pos_int(cfg.get("max_length"), "task.max_length")
        problems += check_data_source(cfg, keys)
        if not isinstance(cfg.get("add_special_tokens", True), bool):
            problems.append(
                f"task.add_special_tokens={cfg.get('add_special_tokens')!r} must be true (the tokenizer's BOS "
                "before the prompt, as the references tokenize) or false (the prompt text's ids only)"
            )
        if (cfg.get("template") or "none") not in TEMPLATES:
            problems.append(f"task.template={cfg.get('template')!r} is unknown; allowed: {list(TEMPLATES)}")
        return problems

    def __init__(self, cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], seed: int = 0) -> None:
        super().__init__(cfg, model_cfg, seed)
        self.tokenizer = load_tokenizer(model_cfg.get("tokenizer"))
        self._probed: tuple[Any, list[int]] | None = None  # (tokenizer, its leading special ids)

    def prompt_prefix(self) -> list[int]:
        """The ids `encode_pair` puts before each prompt's text (`special_affixes`), probed once per tokenizer rather
        than once per row; [] with `task.add_special_tokens=false`."""
        if not self.cfg.get("add_special_tokens", True):
            return []
        if self._probed is None or self._probed[0] is not self.tokenizer:
            self._probed = (self.tokenizer, special_affixes(self.tokenizer)[0])
        return self._probed[1]

    def extra_model_config(self) -> dict[str, Any]:
        return {"pad_token_id": self.tokenizer.pad_token_id} if not self.model_cfg.get("pretrained") else {}

    def datamodule(self) -> L.LightningDataModule:
        """Prompt/response pairs encoded by `encode_pair`, once per node (Dataset.map cache; see EncodedText)."""
        source = EncodedText(self.cfg, self.seed, self.encode_row, self.encoding_key(), ("input_ids", "labels"))
        return ListDataModule(
            None, None, self.cfg["batch_size"], collate_fn=sft_collator(self.tokenizer), seed=self.seed, source=source
        )

    def encode_row(self, row: Mapping[str, Any]) -> dict[str, list[int]]:
        """One data row as `encode_pair` encodes it (the prompt rendered in `task.template`), as lists."""
        pk, rk = self.cfg.get("prompt_key", "prompt"), self.cfg.get("response_key", "response")
        prompt = self.prompt(row[pk])
        special = self.cfg.get("add_special_tokens", True)
        enc = encode_pair(self.tokenizer, prompt, row[rk], self.cfg["max_length"], special, self.prompt_prefix())
        return {k: v.tolist() for k, v in enc.items()}

    def encoding_key(self) -> dict[str, Any]:
        """Everything besides the data that changes `encode_row`'s output (names the encoding cache)."""
        keys = ("template", "max_length", "prompt_key", "response_key")
        key = {"task": self.name, "tokenizer": tokenizer_key(self.tokenizer), **{k: self.cfg.get(k) for k in keys}}
        key["template_text"] = self.prompt("{instruction}\n{input}")  # a template's text changes the encoding too
        return {**key, "add_special_tokens": self.cfg.get("add_special_tokens", True)}

    def prompt(self, instruction: str) -> str:
        """The training prompt in `task.template` (the evaluation runner renders its prompts the same way)."""
        return render_prompt(self.cfg.get("template"), instruction, tokenizer=self.tokenizer)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss
