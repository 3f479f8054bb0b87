"""Section 2: a full training step of the tiny Llama, our Lightning module against a plain loop with peft LoRA."""

from __future__ import annotations

from typing import Any

from benchmarks.common import Env, Figure, ratio_figure, round_robin, summarize
from benchmarks.harness import (
    FULL_MODEL,
    QUICK_MODEL,
    TIMER_WARMUP,
    bench_config,
    build_module,
    datamodule,
    lightning_block,
    plain_block,
    plain_model,
)
from benchmarks.variants import DESCRIPTIONS, trainable

PLAIN = ("peft_lora", "lora", "peft_gralora", "gralora", "peft_dora")
LIGHTNING = ("lora", "ralora", "gralora", "sds", "peft_lora")


def run(env: Env) -> dict[str, Any]:
    """Interleave blocks of training steps of every (harness, variant); one sample = mean step time of a block."""
    repeats = env.repeats.get("step", 1 if env.quick else 7)
    warmup, steps = (TIMER_WARMUP, 1) if env.quick else (max(3, TIMER_WARMUP), 8)
    n_batches = warmup + steps + 2
    dm = datamodule(env, n_batches)
    cfg = bench_config(env, n_batches)
    clip = cfg.trainer.get("gradient_clip_val")
    samplers = {}
    params: dict[str, int] = {}
    for variant in PLAIN:
        model, task = plain_model(variant, env)
        params[f"plain/{variant}"] = trainable(model)
        vcfg = bench_config(env, n_batches, variant)

        def sample(model=model, task=task, vcfg=vcfg) -> float:
            return plain_block(model, task, dm, env, vcfg, warmup, steps)

        samplers[f"plain/{variant}"] = sample
    for variant in LIGHTNING:
        module = build_module(variant, env, n_batches)
        params[f"lightning/{variant}"] = trainable(module.backbone)
        vcfg = bench_config(env, n_batches, variant)

        def sample(module=module, vcfg=vcfg) -> float:
            return lightning_block(module, vcfg, dm, env, warmup + steps, skip=warmup)

        samplers[f"lightning/{variant}"] = sample
    times = round_robin(samplers, repeats, warmup=0)
    sec = "step"
    ref = "plain/peft_lora"
    figures: list[Figure] = [
        ratio_figure(
            "step/lightning_lora_vs_plain_peft_lora",
            sec,
            "step: our Lightning module (LoRA) / plain loop with peft LoRA",
            times,
            "lightning/lora",
            ref,
            "lightning_vs_plain",
        ),
        ratio_figure(
            "step/lightning_peft_lora_vs_plain_peft_lora",
            sec,
            "step: Lightning module with peft LoRA / plain loop with peft LoRA (framework only)",
            times,
            "lightning/peft_lora",
            ref,
            "lightning_vs_plain",
        ),
        ratio_figure(
            "step/lora_vs_peft_lora",
            sec,
            "step: our LoRA / peft LoRA (plain loop)",
            times,
            "plain/lora",
            ref,
            "lora_vs_peft_lora_step",
        ),
        ratio_figure(
            "step/gralora_vs_peft_gralora",
            sec,
            "step: our GraLoRA / peft GraLoRA (plain loop)",
            times,
            "plain/gralora",
            "plain/peft_gralora",
            "gralora_vs_peft_gralora",
        ),
        ratio_figure(
            "step/ralora_vs_lora",
            sec,
            "step: RaLoRA (4 blocks) / our LoRA (Lightning)",
            times,
            "lightning/ralora",
            "lightning/lora",
            "ralora_vs_lora",
        ),
        ratio_figure(
            "step/gralora_vs_lora",
            sec,
            "step: GraLoRA (k=2) / our LoRA (Lightning)",
            times,
            "lightning/gralora",
            "lightning/lora",
            "gralora_vs_lora",
        ),
        ratio_figure(
            "step/sds_vs_lora",
            sec,
            "step: SDS-LoRA (SDS phase) / our LoRA (Lightning)",
            times,
            "lightning/sds",
            "lightning/lora",
            note="steady state after the switch; run average: schedules",
        ),
        ratio_figure(
            "step/peft_dora_vs_peft_lora",
            sec,
            "step: peft DoRA / peft LoRA (plain loop)",
            times,
            "plain/peft_dora",
            ref,
        ),
    ]
    for variant in ("ralora", "gralora", "sds"):
        figures.append(
            ratio_figure(
                f"step/lightning_{variant}_vs_plain_peft_lora",
                sec,
                f"step: Lightning {variant} / plain loop with peft LoRA",
                times,
                f"lightning/{variant}",
                ref,
            )
        )
    m = QUICK_MODEL if env.quick else FULL_MODEL
    return {
        "config": {
            "model": m,
            "warmup_steps": warmup,
            "timed_steps_per_block": steps,
            "repeats": repeats,
            "precision": cfg.trainer.get("precision"),
            "optimizer": "AdapterModule.configure_optimizers of the composed optim config (both harnesses)",
            "gradient_clip_val": clip,
            "variants": {v: DESCRIPTIONS[v] for v in sorted(set(PLAIN) | set(LIGHTNING))},
        },
        "trainable_params": params,
        "raw": {"step_time_s": {k: summarize(v) for k, v in times.items()}},
        "figures": figures,
    }
