"""Shared machinery: device choice, interleaved repeated timing (round-robin of `torch.utils.benchmark` samples),
medians with spread, paired ratios, figures."""

from __future__ import annotations

import gc
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.benchmark import Timer

# target id -> what the README promises; a figure with this target_id is met when its median ratio <= bound
TARGETS: dict[str, dict[str, Any]] = {
    "lora_vs_peft_lora_step": {"text": "Our LoRA ≤ 1.05× peft LoRA per step", "bound": 1.05},
    "gralora_vs_peft_gralora": {"text": "Our GraLoRA ≤ 1.0× peft GraLoRA", "bound": 1.0},
    "ralora_vs_lora": {"text": "RaLoRA (4 blocks) ≤ 1.15× our LoRA at equal parameters", "bound": 1.15},
    "gralora_vs_lora": {"text": "GraLoRA (k = 2) ≤ 1.15× our LoRA at equal parameters", "bound": 1.15},
    "sds_run_vs_lora": {"text": "SDS-LoRA ≤ 1.05× LoRA averaged over a run", "bound": 1.05},
    "sds_memory": {"text": "SDS-LoRA memory ≤ 1.01× LoRA", "bound": 1.01},
    "gid_share": {"text": "GID warm-up ≤ 5% of the default job's wall time", "bound": 0.05},
    "alignment_overhead": {"text": "Alignment logging ≤ 5% at its default interval", "bound": 1.05},
    "lightning_vs_plain": {"text": "Lightning module step ≤ 1.05× the plain loop", "bound": 1.05},
    "paper_lora_vs_floor": {"text": "Papers' shapes: our LoRA ≤ 1.03× the frozen floor", "bound": 1.03},
    "paper_lora_vs_peft_lora": {"text": "Papers' shapes: our LoRA ≤ 1.0× peft LoRA", "bound": 1.0},
    "paper_variant_vs_lora": {"text": "Papers' shapes: RaLoRA, GraLoRA, Hybrid, SDS ≤ 1.05× our LoRA", "bound": 1.05},
    "paper_gralora_vs_peft_gralora": {"text": "Papers' shapes: our GraLoRA ≤ 1.0× peft GraLoRA", "bound": 1.0},
}


@dataclass
class Env:
    """Where and how the suite runs: device, dtype of the layer section, quick (tiny sizes) or full."""

    device: torch.device
    dtype: torch.dtype
    quick: bool
    repeats: dict[str, int] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        """True on a CUDA device (bf16, synchronised timings)."""
        return self.device.type == "cuda"

    def sync(self) -> None:
        """Wait for queued device work, so a wall-clock timing covers it."""
        if self.cuda:
            torch.cuda.synchronize(self.device)


def pick_env(device: str = "auto", quick: bool = False, repeats: dict[str, int] | None = None) -> Env:
    """CUDA with bf16 when available (or asked for), else CPU with fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return Env(device=dev, dtype=dtype, quick=quick, repeats=dict(repeats or {}))


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3) with the inclusive method; one sample gives that sample three times."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("quartiles of an empty sample")
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, med, q3


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, IQR, min and n of a list of timings (seconds), plus the samples themselves."""
    q1, med, q3 = quartiles(samples)
    return {
        "median": med,
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": min(samples),
        "n": len(samples),
        "samples": [float(s) for s in samples],
    }


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """Per-round ratios num[i]/den[i] (both measured in round i) summarised; also the ratio of the medians."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio needs two equally long non-empty samples, got {len(num)} and {len(den)}")
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    out = summarize(ratios)
    out["ratio_of_medians"] = statistics.median(num) / statistics.median(den)
    return out


def round_robin(samplers: Mapping[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call every sampler `repeats` times, interleaved: round i runs all of them, starting at position i.

    A sampler returns one timing (seconds). `warmup` untimed rounds come first (allocations, lazy inits, caches).
    The rotation gives every variant every position equally often, so slow drifts and neighbour effects cancel.
    """
    names = list(samplers)
    for _ in range(warmup):
        for name in names:
            samplers[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        k = i % len(names)
        gc.collect()  # once per round: a full collection costs tens of ms with transformers and Lightning loaded
        for name in names[k:] + names[:k]:
            out[name].append(float(samplers[name]()))
    return out


def timer(fn: Callable[[], Any]) -> Timer:
    """A `torch.utils.benchmark.Timer` of `fn()` at torch's current thread count (the Timer's default is 1): it
    synchronises the accelerator around the timed calls and pauses the garbage collector while timing."""
    return Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def call_sampler(fn: Callable[[], Any], env: Env, inner: int = 1) -> Callable[[], float]:
    """Wrap `fn` into a sampler: the mean time of `inner` calls, by `torch.utils.benchmark.Timer.timeit` (which
    runs a couple of untimed calls first). `env` is kept for the samplers' common signature."""
    t = timer(fn)

    def sample() -> float:
        return float(t.timeit(inner).mean)

    return sample


def calibrate_inner(fn: Callable[[], Any], env: Env, min_sample_s: float) -> int:
    """How many calls of `fn` make one sample last about `min_sample_s` (at least 1), from one timed call."""
    t = call_sampler(fn, env, 1)()
    return max(1, math.ceil(min_sample_s / max(t, 1e-9)))


@dataclass
class Figure:
    """One row of the report: a ratio num/den measured side by side, with its spread and (maybe) a target."""

    key: str
    section: str
    label: str
    ratio: dict[str, Any]
    target_id: str | None = None
    bound: float | None = None
    note: str = ""

    @property
    def value(self) -> float:
        """The reported ratio: the median of the paired per-round ratios."""
        return float(self.ratio["median"])

    @property
    def met(self) -> bool | None:
        """True/False against the bound; None for figures without a target."""
        return None if self.bound is None else self.value <= self.bound

    @property
    def within_spread(self) -> bool:
        """True when the bound lies inside the interquartile range (the verdict is within the noise)."""
        return self.bound is not None and self.ratio["q1"] <= self.bound <= self.ratio["q3"]

    def to_dict(self) -> dict[str, Any]:
        """JSON form (samples included)."""
        return {
            "key": self.key,
            "section": self.section,
            "label": self.label,
            "ratio": self.ratio,
            "target_id": self.target_id,
            "bound": self.bound,
            "met": self.met,
            "within_spread": self.within_spread,
            "note": self.note,
        }


def ratio_figure(
    key: str,
    section: str,
    label: str,
    times: Mapping[str, Sequence[float]],
    num: str,
    den: str,
    target_id: str | None = None,
    note: str = "",
) -> Figure:
    """A Figure for times[num]/times[den] paired by round, with the bound of `target_id` (see TARGETS)."""
    bound = TARGETS[target_id]["bound"] if target_id else None
    return Figure(key, section, label, paired_ratio(times[num], times[den]), target_id, bound, note)


def fmt_seconds(s: float) -> str:
    """Human-readable duration for notes."""
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"
