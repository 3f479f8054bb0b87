"""The acceptance run's sections, each a thin call into the existing harness (benchmarks/paper.py, schedules.py,
generation.py) at the device's shapes: bf16-mixed (bf16 frozen weights, fp32 adapters, forward under autocast).

Every section takes the Env and a `Budget` and returns {"figures": [...], "raw": {...}, "notes": [...]}; on
`--dry-run` the Env is CPU with tiny shapes (quick) and the code path is the same.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from benchmarks import generation, paper, schedules
from benchmarks.common import Env, Figure, call_sampler, round_robin, summarize
from benchmarks.memory import _reset_peak_rss, _static_bytes, _status_kb
from lightning_ralora.rank.estimate import estimate_gid
from lightning_ralora.reporting.memory_plan import ARCH, estimate_memory
from lightning_ralora.run.compose import compose_config

AMP = torch.bfloat16  # bf16-mixed: the forward's autocast dtype
RANK = 16
# the variants under the names of benchmarks/paper.py (conf/adapter preset -> paper variant)
PRESETS = {
    "lora": "lora",
    "rslora": "rslora",
    "ralora": "ralora",
    "ralora_pro": "ralora_pro",
    "gralora": "gralora",
    "hybrid_gralora": "hybrid",
    "sds_lora": "sds",
    "peft_lora": "peft_lora",
    "dora": "peft_dora",
}
REFERENCES = ("floor", "peft_gralora")  # the frozen floor, and peft's GraLoRA for ours-vs-peft
LLAMA_8B = [("LLaMA-3.1-8B", p, *paper.LLAMA[p], RANK) for p in ("q/o", "gate/up", "down", "k/v")]
TINY = [("tiny", "q", 32, 32, 8), ("tiny", "kv", 32, 16, 8)]
LLAMA_TARGETS = paper.TARGETS_LLAMA
FULL_LAYERS_8B = 32


@dataclass
class Budget:
    """The wall-clock budget of the run: sections ask `left()` before starting and between their parts."""

    seconds: float
    start: float

    def left(self) -> float:
        """Seconds left (negative once over)."""
        return self.seconds - (time.perf_counter() - self.start)


def buildable(variants: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """The variants that build on a tiny layer here (an older peft may lack GraLoRA or DoRA), and notes on the rest."""
    ok, notes = [], []
    for v in variants:
        try:
            paper.build_layer(v, nn.Linear(32, 32, bias=False).requires_grad_(False), 8)
            ok.append(v)
        except Exception as err:  # noqa: BLE001 - a missing variant is reported, not fatal
            notes.append(f"variant {v} not measured: {type(err).__name__}: {err}"[:300])
    return tuple(ok), notes


def layer_variants() -> tuple[tuple[str, ...], list[str]]:
    """floor, the issue's variants and peft GraLoRA, those that build here."""
    return buildable(("floor", *PRESETS.values(), "peft_gralora"))


def layers(env: Env, budget: Budget) -> dict[str, Any]:
    """Forward + backward of one adapted linear at LLaMA-3.1-8B's shapes, every variant interleaved
    (`paper.run_layers` under bf16 autocast); a shape starts only while 60 % of the budget is left."""
    variants, notes = layer_variants()
    raw: dict[str, Any] = {}
    figures: list[Figure] = []
    for shape in TINY if env.quick else LLAMA_8B:
        if budget.left() < 0.6 * budget.seconds and raw:
            notes.append(f"layer {shape[2]}x{shape[3]}: skipped, budget ({budget.left():.0f} s left)")
            continue
        r, f = paper.run_layers(env, [shape], variants, autocast=AMP, min_sample_s=None if env.quick else 0.1)
        raw.update(r)
        figures += f
    return {"raw": raw, "figures": figures, "notes": notes, "variants": {v: paper.DESCRIPTIONS[v] for v in variants}}


def compile_on_off(env: Env, budget: Budget) -> dict[str, Any]:
    """`adapter.compile` on vs off: LoRA and SDS-LoRA layers, compiled update against eager, at 4096x4096."""
    shape = TINY[0] if env.quick else LLAMA_8B[0]
    variants = ("lora", "lora_compiled", "sds", "sds_compiled")
    # the dry run calls the compiled update under the force_eager stance: the same calls, no inductor build
    stance = "force_eager" if env.quick else "default"
    with torch.compiler.set_stance(stance):
        raw, figures = paper.run_layers(env, [shape], variants, autocast=AMP, min_sample_s=None if env.quick else 0.1)
    notes = ["dry run: adapter.compile ran under torch.compiler.set_stance('force_eager')"] if env.quick else []
    return {"raw": raw, "figures": [f for f in figures if "compiled" in f.key], "notes": notes}


def _peak(fn: Callable[[], Any], env: Env, resident: int) -> int:
    """Peak bytes while `fn` runs: CUDA max allocated (resident tensors included); on CPU (the dry run) a cheap
    stand-in, `resident` plus the peak-RSS growth (VmHWM after resetting it, minus VmRSS before; 0 off Linux)."""
    gc.collect()
    if env.cuda:
        env.sync()
        torch.cuda.reset_peak_memory_stats(env.device)
        fn()
        env.sync()
        return int(torch.cuda.max_memory_allocated(env.device))
    reset, before = _reset_peak_rss(), _status_kb("VmRSS") or 0
    fn()
    growth = (_status_kb("VmHWM") or before) - before if reset else 0
    return resident + 1024 * max(growth, 0)


def _allocated(env: Env, model: nn.Module) -> int:
    """Bytes resident now: CUDA allocated, or the model's parameters and buffers on CPU."""
    return int(torch.cuda.memory_allocated(env.device)) if env.cuda else _static_bytes(model)


def step(env: Env, budget: Budget) -> dict[str, Any]:
    """Training steps (forward under bf16 autocast, backward, AdamW) of the 2-layer LLaMA-3.1-8B-width model per
    variant, interleaved: tokens/s and the step's peak memory above what is resident (weights, adapters, state)."""
    variants, notes = buildable(("floor", *PRESETS.values(), "peft_gralora"))
    base = paper.build_model(env)
    b, s = (2, 8) if env.quick else paper.STEP_SHAPE[env.device.type]
    batch = torch.randint(0, base.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    batch = batch.to(env.device)
    fns = {v: paper._train_step_fn(paper.adapt_model(base, v, RANK), batch, AMP) for v in variants}
    for fn in fns.values():
        fn()  # the optimizer state exists before the memory is read
    peaks: dict[str, dict[str, int]] = {}
    for v, fn in fns.items():
        resident = _allocated(env, base)
        peaks[v] = {"resident_bytes": resident, "step_peak_above_resident_bytes": _peak(fn, env, resident) - resident}
    repeats = env.repeats.get("paper", 1 if env.quick else 5)
    times = round_robin({v: call_sampler(fn, env) for v, fn in fns.items()}, repeats)
    where = f"step 2-layer Llama {base.config.hidden_size}/{base.config.intermediate_size} r={RANK}, {b}x{s} tokens"
    figures = paper._figures("gpu/step", where, times)
    lora_peak = peaks["lora"]["step_peak_above_resident_bytes"]
    for v in variants:
        ratio = peaks[v]["step_peak_above_resident_bytes"] / max(lora_peak, 1)
        figures.append(
            Figure(
                f"gpu/step/memory/{v}_vs_lora",
                "step",
                f"{where}: step peak memory above resident, {v} / our LoRA",
                {**summarize([ratio]), "ratio_of_medians": ratio},
            )
        )
    tokens_per_s = {v: b * s / summarize(t)["median"] for v, t in times.items()}
    raw = {
        "batch": [b, s],
        "tokens_per_s": tokens_per_s,
        "peak": peaks,
        "times_s": {v: summarize(t) for v, t in times.items()},
    }
    return {"raw": raw, "figures": figures, "notes": notes}


def sds_run(env: Env, budget: Budget) -> dict[str, Any]:
    """SDS-LoRA's run-level overhead: `schedules.run`'s SDS part (Lightning runs with the warm-up, the switch and
    the QR refreshes, interleaved with LoRA runs of the same length) on the harness's model."""
    out = schedules.run(env, parts=("sds",))
    notes = out["notes"] + ["run-level SDS: the step benchmark's model (benchmarks/harness.py), not 8B width"]
    return {"raw": out["raw"], "figures": out["figures"], "notes": notes}


def plan_cfg(env: Env, layers: int, vocab: int, batch: int, seq: int) -> dict[str, Any]:
    """The config `lightning-ralora-plan-memory` reads for adapter=ralora on LLaMA-3.1-8B (trainer=gpu,
    bf16-mixed), with `layers` layers, `vocab` tokens and micro-batch batch x seq (memory_plan.ARCH's dims)."""
    cfg = compose_config(["model=llama31_8b", "adapter=ralora", "trainer=gpu"], run_dir="/tmp")
    c = OmegaConf.to_container(cfg, resolve=True)
    dims = {**ARCH["meta-llama/Llama-3.1-8B"], "num_hidden_layers": layers, "vocab_size": vocab}
    if env.quick:
        dims.update(paper.QUICK_MODEL)
    c["model"].update(pretrained=None, config=dims)
    c["task"].update(batch_size=batch, seq_len=seq)
    return c


def gid(env: Env, budget: Budget) -> dict[str, Any]:
    """Peak memory of the GID warm-up (`rank.estimate.estimate_gid`, under bf16 autocast) on the 2-layer 8B-width
    model against the memory plan's prediction for the same model, and that prediction scaled to 32 layers."""
    model = paper.build_model(env)
    b, s = (2, 8) if env.quick else paper.STEP_SHAPE[env.device.type]
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(0)).to(env.device)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(tuple(LLAMA_TARGETS))]

    def loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(env.device.type, dtype=AMP):
            return m(input_ids=x, labels=x).loss

    batches = 2
    measured = _peak(lambda: estimate_gid(model, [batch] * batches, loss, targets, world_reduce=False), env, 0)
    if not env.cuda:
        measured += _static_bytes(model)
    two = estimate_memory(plan_cfg(env, 2, vocab, b, s))["gid_warmup"]
    full = estimate_memory(plan_cfg(env, FULL_LAYERS_8B, ARCH["meta-llama/Llama-3.1-8B"]["vocab_size"], b, s))
    scaled = measured * full["gid_warmup"] / two
    ratio = measured / two
    raw = {
        "batch": [b, s],
        "gid_batches": batches,
        "measured_2_layers_bytes": measured,
        "predicted_2_layers_bytes": two,
        "predicted_32_layers_bytes": full["gid_warmup"],
        "measured_scaled_to_32_layers_bytes": scaled,
        "plan_peak_training_32_layers_bytes": full["peak"],
    }
    fig = Figure(
        "gpu/gid/measured_vs_plan",
        "gid",
        f"GID warm-up peak memory, 2-layer 8B-width model ({b}x{s} tokens): measured / memory plan",
        {**summarize([ratio]), "ratio_of_medians": ratio},
        note=f"plan at 32 layers, 128k vocab: {full['gid_warmup'] / 2**30:.2f} GiB; "
        f"measured scaled by the plan's 32/2-layer ratio: {scaled / 2**30:.2f} GiB",
    )
    return {"raw": raw, "figures": [fig], "notes": []}


def eval_generation(env: Env, budget: Budget) -> dict[str, Any]:
    """Eval generation examples/s in process (`generation.run` without the serving endpoint)."""
    out = generation.run(env, endpoint=False)
    return {
        "raw": {**out["raw"], "examples_per_s": out["examples_per_s"]},
        "figures": out["figures"],
        "notes": out["notes"],
    }


# in the order they run: the most wanted first, the slow compile late
SECTIONS: dict[str, Callable[[Env, Budget], dict[str, Any]]] = {
    "layers": layers,
    "step": step,
    "gid": gid,
    "sds_run": sds_run,
    "compile": compile_on_off,
    "generation": eval_generation,
}
