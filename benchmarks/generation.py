"""Section 5: generation throughput (examples/s) of the evaluation decoder, `evaluation.generate.make_generate`, on
the tiny Llama (conf/model/tiny_llama.yaml) with LoRA on every target: batch 1 against the configured batch (8),
and merged (`merge_all`, the export form) against unmerged adapters at batch 8.

Fixed prompts of varied length, a fixed number of new tokens (greedy; EOS disabled so every row decodes the full
budget), no stop strings. Ratios are of examples/s, i.e. the inverse ratio of the times of one pass over the prompts.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from benchmarks.common import Env, Figure, call_sampler, fmt_seconds, ratio_figure, round_robin, summarize
from benchmarks.variants import spec
from lightning_ralora.adapters import adapter_layers, inject, merge_all
from lightning_ralora.data.tokenizer import byte_tokenizer
from lightning_ralora.evaluation.generate import make_generate
from lightning_ralora.run.compose import CONF_DIR

BATCH = 8  # conf/eval/none.yaml's eval.batch_size
FULL = {"prompts": 32, "max_new_tokens": 32, "model": {}}
QUICK = {
    "prompts": 8,
    "max_new_tokens": 4,
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
}
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "small", "bird", "sing")


def prompts(n: int) -> list[str]:
    """`n` fixed prompts of 3 to 17 words (deterministic)."""
    return [f"Question {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + 5 * i % 15)) for i in range(n)]


def tiny_llama(overrides: dict[str, Any], env: Env) -> tuple[nn.Module, Any, list[str]]:
    """The tiny Llama of conf/model/tiny_llama.yaml (resized by `overrides`) with LoRA (random B, so merging changes
    the weights) on its target modules, in eval mode; returns (model, tokenizer, target module patterns)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_cfg = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "tiny_llama.yaml"))
    cfg = {k: v for k, v in model_cfg["config"].items() if k != "model_type"} | overrides
    tok = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(**cfg, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=None)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None  # every row decodes max_new_tokens: fixed work per call
    targets = list(model_cfg["target_modules"])
    inject(model, targets, spec("lora"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.to(env.device, env.dtype).eval(), tok, targets


def _pass(generate: Callable[..., list[str]], texts: list[str], max_new_tokens: int) -> Callable[[], list[str]]:
    """One greedy pass over all prompts."""
    return lambda: generate(texts, max_new_tokens=max_new_tokens)


def _sampler(fn: Callable[[], Any], env: Env) -> Callable[[], float]:
    """Wall-clock seconds of one call (a pass lasts long enough; `call_sampler`'s untimed extra calls would triple
    the section's time); the round-robin's warm-up round covers first-call costs."""

    def sample() -> float:
        env.sync()
        t0 = time.perf_counter()
        fn()
        env.sync()
        return time.perf_counter() - t0

    return sample


def run(env: Env) -> dict[str, Any]:
    """Time batch 1, batch 8 and merged batch 8 (interleaved) and report the examples/s ratios."""
    sizes = QUICK if env.quick else FULL
    repeats = env.repeats.get("generation", 2 if env.quick else 7)
    texts, max_new = prompts(sizes["prompts"]), sizes["max_new_tokens"]
    model, tok, targets = tiny_llama(sizes["model"], env)
    merged = merge_all(copy.deepcopy(model)).eval()
    fns = {
        "batch1": _pass(make_generate(model, tok, batch_size=1, progress=False), texts, max_new),
        f"batch{BATCH}": _pass(make_generate(model, tok, batch_size=BATCH, progress=False), texts, max_new),
        f"batch{BATCH}_merged": _pass(make_generate(merged, tok, batch_size=BATCH, progress=False), texts, max_new),
    }
    completions = {name: fn() for name, fn in fns.items()}
    sample = call_sampler if env.quick else _sampler  # quick: passes of a few ms, timed by torch's Timer
    times = round_robin({name: sample(fn, env) for name, fn in fns.items()}, repeats)
    throughput = {name: len(texts) / summarize(t)["median"] for name, t in times.items()}
    sec, b = "generation", f"batch{BATCH}"
    where = f"generation ({len(texts)} prompts, {max_new} new tokens)"
    figures: list[Figure] = [
        ratio_figure(
            f"generation/batch{BATCH}_vs_batch1",
            sec,
            f"{where}: examples/s batch {BATCH} / batch 1",
            times,
            "batch1",
            b,
            note="ratio of times batch 1 / batch 8, i.e. the batched speed-up",
        ),
        ratio_figure(
            f"generation/merged_vs_unmerged_batch{BATCH}",
            sec,
            f"{where}: examples/s merged / unmerged LoRA, batch {BATCH}",
            times,
            b,
            f"{b}_merged",
            note="ratio of times unmerged / merged",
        ),
    ]
    rates = ", ".join(f"{name} {rate:.1f}" for name, rate in throughput.items())
    one = fmt_seconds(summarize(times[b])["median"])
    notes = [f"generation examples/s (median): {rates}; one batch-{BATCH} pass over the prompts takes {one}"]
    return {
        "config": {
            "prompts": len(texts),
            "max_new_tokens": max_new,
            "batch_size": BATCH,
            "repeats": repeats,
            "model": {k: v for k, v in model.config.to_dict().items() if k in ("hidden_size", "num_hidden_layers")},
            "adapter": "lora on " + ",".join(targets),
            "dtype": str(env.dtype),
            "greedy": True,
        },
        "examples_per_s": throughput,
        # batching and merging should not change greedy decoding (up to float rounding on near-ties)
        "same_completions": {name: c == completions["batch1"] for name, c in completions.items()},
        "raw": {name: summarize(t) for name, t in times.items()},
        "figures": figures,
        "notes": notes,
    }
