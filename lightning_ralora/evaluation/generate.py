"""Batched decoding for the generation suites: left-padded batches through HF `model.generate` (KV cache, greedy
unless sampling arguments are given), stop strings, prompts sorted by length and the order restored."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "num_return_sequences", "do_sample", "num_beams")


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class StopOnStrings(StoppingCriteria):
    """Ends each row once its completion contains a stop string (EOS is handled by `generate` itself); the batch
    ends when every row has ended."""

    def __init__(self, tokenizer: Any, prompt_len: int, stop: Sequence[str]) -> None:
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, [s for s in stop if s]
        self.tail = max((len(s) for s in self.stop), default=0) + 8  # tokens to decode: enough for any stop string

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len :]
        texts = self.tokenizer.batch_decode(new[:, -self.tail :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], dtype=torch.bool, device=input_ids.device)


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _max_over_ranks(value: int, device: torch.device) -> int:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def make_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    batch_size: int,
    device: torch.device | str | None = None,
    max_new_tokens_cap: int | None = None,
    progress: bool | None = None,
) -> Callable[..., list[str]]:
    """A `generate(prompts, stop=[...], max_new_tokens=N, **sampling) -> list[str]` over `model` (a causal LM).

    Greedy unless sampling arguments (temperature, top_p, top_k, num_return_sequences) are given; with
    `num_return_sequences=k` the list holds k completions per prompt, grouped by prompt. `max_new_tokens_cap`
    (`eval.max_new_tokens`) bounds the suites' own budgets. Under FSDP every rank runs the same number of
    `generate` calls (`synced_gpus`), so ranks with shorter shards run dummy batches."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fill_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id  # for an empty prompt
    show = (_rank() == 0) if progress is None else progress

    def encode(prompt: str) -> list[int]:
        # as tasks/sft.py encodes training prompts: no special tokens added
        return tokenizer(prompt, add_special_tokens=False)["input_ids"] or [fill_id]

    def run_batch(ids: list[list[int]], stop: Sequence[str], max_new: int, sampling: dict, synced: bool) -> list:
        width = max(len(x) for x in ids)
        # left padding: every prompt ends at the same position, so new tokens follow the prompt directly
        input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        criteria = StoppingCriteriaList([StopOnStrings(tokenizer, width, stop)] if stop else [])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            use_cache=True,
            pad_token_id=pad_id,
            stopping_criteria=criteria,
            synced_gpus=synced,
            **sampling,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [truncate_at_stop(t, stop) for t in texts]

    def generate(prompts: Sequence[str], stop: Sequence[str] = (), max_new_tokens: int = 256, **sampling: Any):
        """Completions of `prompts` (same order), each cut at the first stop string."""
        sampling = {k: v for k, v in sampling.items() if v is not None}
        unknown = set(sampling) - set(SAMPLING_KEYS)
        if unknown:
            raise TypeError(f"generate() got unknown arguments {sorted(unknown)}; allowed: {list(SAMPLING_KEYS)}")
        if "temperature" in sampling or "top_p" in sampling or "top_k" in sampling:
            sampling.setdefault("do_sample", True)
        sampling.setdefault("do_sample", False)
        n_ret = int(sampling.get("num_return_sequences", 1))
        max_new = min(int(max_new_tokens), int(max_new_tokens_cap)) if max_new_tokens_cap else int(max_new_tokens)
        encoded = [encode(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # longest first: similar widths
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        synced = _is_fsdp(model) and torch.distributed.is_initialized()
        n_batches = _max_over_ranks(len(batches), device) if synced else len(batches)
        results: list[list[str]] = [[] for _ in prompts]
        was_training = model.training
        model.eval()
        from tqdm.auto import tqdm

        # the bar's rate is in examples/s (unit="ex")
        bar = tqdm(total=len(prompts), unit="ex", desc="generate", disable=not show or not prompts, leave=False)
        try:
            with torch.inference_mode():
                for b in range(n_batches):
                    if b >= len(batches):  # FSDP: keep the collectives of every rank in step
                        run_batch([[fill_id]], stop, max_new, sampling, synced)
                        continue
                    texts = run_batch([encoded[i] for i in batches[b]], stop, max_new, sampling, synced)
                    for j, i in enumerate(batches[b]):
                        results[i] = texts[j * n_ret : (j + 1) * n_ret]
                    bar.update(len(batches[b]))
        finally:
            bar.close()
            model.train(was_training)
        return [t for r in results for t in r]

    return generate
