"""What LoRA and SDS-LoRA must cost over the frozen floor, term by term (`python -m benchmarks.roofline`).

Every matrix product the adapter adds to one linear's forward + backward (with input gradients, as the papers' layers
train inside a model) is listed with its FLOPs and the bytes it must move at least once (operands read, result
written; an in-place accumulation reads and writes its output). With this machine's measured rates (the floor's own
GEMM FLOP rate, a large copy's bandwidth) each term costs at least max(FLOPs / rate, bytes / bandwidth): the roofline
bound of the ratio over the floor. Each term is also timed alone, and the whole layers side by side (interleaved
rounds, medians and quartiles), so a measured ratio can be read against what the extra work alone implies; beside
them, LoRA as one fused autograd Function (the input gradients accumulated in one addmm_) and SDS-LoRA product by
product (as before its one-node update)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import calibrate_inner, call_sampler, paired_ratio, pick_env, round_robin, summarize
from benchmarks.layer import _step_fn
from benchmarks.paper import build_layer
from lightning_ralora.adapters.base import add_product

F32 = 4  # bytes


@dataclass(frozen=True)
class Term:
    """One product the adapter adds: `out = a @ b` ((rows x inner) @ (inner x cols)), `accumulate` into `out`."""

    name: str
    rows: int
    inner: int
    cols: int
    accumulate: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.inner * self.cols

    @property
    def bytes(self) -> int:
        out = self.rows * self.cols * (2 if self.accumulate else 1)
        return F32 * (self.rows * self.inner + self.inner * self.cols + out)


def terms(variant: str, t: int, n: int, m: int, r: int) -> list[Term]:
    """The products LoRA (h = x Aᵀ, y += s h Bᵀ) or SDS-LoRA after its switch (y += s (x Aᵀ) Q_Bᵀ + s (x Q_A) Bᵀ,
    the Q's constant, computed as one rank-2r product as `_SDSUpdate` does) add to a frozen n -> m linear at t tokens,
    rank r: forward, then the backward's weight and input gradients."""
    if variant == "lora":
        return [
            Term("h = x Aᵀ", t, n, r),
            Term("y += s h Bᵀ", t, r, m, accumulate=True),
            Term("dB = s dYᵀ h", m, t, r),
            Term("dh = s dY B", t, m, r),
            Term("dA = dhᵀ x", r, t, n),
            Term("dX += dh A", t, r, n, accumulate=True),
        ]
    return [  # h = [h₁, h₂]; A gets its gradient through the first half, B through the second
        Term("h = x [Aᵀ, Q_A]", t, n, 2 * r),
        Term("y += s h [Q_B, B]ᵀ", t, 2 * r, m, accumulate=True),
        Term("dB = s dYᵀ h₂", m, t, r),
        Term("dh = s dY [Q_B, B]", t, m, 2 * r),
        Term("dA = dh₁ᵀ x", r, t, n),
        Term("dX += dh [A; Q_Aᵀ]", t, 2 * r, n, accumulate=True),
    ]


def _product(term: Term, device: torch.device) -> Callable[[], Any]:
    a = torch.randn(term.rows, term.inner, device=device)
    b = torch.randn(term.inner, term.cols, device=device)
    out = torch.randn(term.rows, term.cols, device=device)
    return (lambda: out.addmm_(a, b)) if term.accumulate else (lambda: torch.mm(a, b, out=out))


def by_hand(x: torch.Tensor, w: torch.Tensor, r: int, grad_out: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The floor's and LoRA's forward + backward written out without autograd, in one order on preallocated tensors:
    LoRA with its input gradient accumulated in place into the floor's (`lora_in_place`), and as autograd does it, a
    separate tensor summed afterwards (`lora_summed`). Their ratios say what the products cost in context."""
    (t, n), m, s = x.shape, w.shape[0], 2.0
    a, b = torch.randn(r, n) / n**0.5, torch.randn(m, r) * 0.01
    y, dx, h, dh = torch.empty(t, m), torch.empty(t, n), torch.empty(t, r), torch.empty(t, r)
    da, db = torch.empty(r, n), torch.empty(m, r)

    def floor() -> None:
        torch.mm(x, w.t(), out=y)
        torch.mm(grad_out, w, out=dx)

    def lora(in_place: bool) -> None:
        floor()
        torch.mm(x, a.t(), out=h)
        y.addmm_(h, b.t(), alpha=s)
        torch.mm(grad_out.t(), h, out=db).mul_(s)
        torch.mm(grad_out, b, out=dh).mul_(s)
        torch.mm(dh.t(), x, out=da)
        dx.addmm_(dh, a) if in_place else dx.add_(dh @ a)

    return {"floor_by_hand": floor, "lora_in_place": lambda: lora(True), "lora_summed": lambda: lora(False)}


class _FusedLoRA(torch.autograd.Function):
    """A frozen linear and LoRA as one autograd node, x -> x Wᵀ + s (x Aᵀ) Bᵀ: its backward accumulates the adapter's
    input gradient into the floor's (dX += dh A, one addmm_) where autograd sums two tensors. A candidate for the
    layer, timed beside it to say whether that fusion pays."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
        h = x @ a.t()
        ctx.save_for_backward(x, w, a, b, h)
        ctx.s = s
        return (x @ w.t()).addmm_(h, b.t(), alpha=s)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, a, b, h = ctx.saved_tensors
        dh = (g @ b).mul_(ctx.s)
        return (g @ w).addmm_(dh, a), None, dh.t() @ x, (g.t() @ h).mul_(ctx.s), None


class FusedLoRA(nn.Module):
    """Our LoRA layer's parameters through `_FusedLoRA` (frozen base without bias, no dropout)."""

    def __init__(self, lora: nn.Module) -> None:
        super().__init__()
        self.lora = lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.lora
        return _FusedLoRA.apply(x, layer.base.weight, layer.lora_A, layer.lora_B, layer.scaling)


class SDSByProducts(nn.Module):
    """A switched SDS layer's update product by product, each accumulated into the output (`add_product`, how the
    layer computed it before `_SDSUpdate`), timed beside the layer."""

    def __init__(self, sds: nn.Module) -> None:
        super().__init__()
        self.sds = sds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.sds
        y = add_product(layer.base(x), x @ layer.lora_A.t(), layer.Q_B, layer.scaling)
        return add_product(y, x @ layer.Q_A, layer.lora_B, layer.scaling)


def bandwidth(env: Any, mib: int = 256) -> float:
    """Bytes per second of a large copy (read + write), the machine's streaming rate."""
    src = torch.randn(mib * 2**18, device=env.device)
    dst = torch.empty_like(src)
    times = round_robin({"copy": call_sampler(lambda: dst.copy_(src), env)}, 7)["copy"]
    return 2 * F32 * src.numel() / summarize(times)["median"]


def measure(t: int, n: int, m: int, r: int, repeats: int, threads: int) -> dict[str, Any]:
    """Floor, LoRA and SDS layers side by side, each extra term alone, and the roofline bounds."""
    torch.set_num_threads(threads)
    env = pick_env("cpu")
    torch.manual_seed(0)
    base = nn.Linear(n, m, bias=False)
    x = torch.randn(t, n, requires_grad=True)
    grad_out = torch.randn(t, m)
    samplers = {}
    layers = {variant: build_layer(variant, base, r).train() for variant in ("floor", "lora", "sds")}
    layers["lora_fused"] = FusedLoRA(layers["lora"])
    layers["sds_by_products"] = SDSByProducts(layers["sds"])
    for variant, layer in layers.items():
        fn = _step_fn(layer, x, grad_out)
        samplers[variant] = call_sampler(fn, env, calibrate_inner(fn, env, 0.2))
    for name, fn in by_hand(x.detach(), base.weight.detach(), r, grad_out).items():
        samplers[name] = call_sampler(fn, env, calibrate_inner(fn, env, 0.2))
    every = {term.name: term for v in ("lora", "sds") for term in terms(v, t, n, m, r)}
    for name, term in every.items():
        fn = _product(term, env.device)
        samplers[name] = call_sampler(fn, env, calibrate_inner(fn, env, 0.05))
    times = round_robin(samplers, repeats)
    median = {k: summarize(v)["median"] for k, v in times.items()}
    floor_flops = 2 * (2 * t * n * m)  # y = x Wᵀ and dX = dY W
    rate, bw = floor_flops / median["floor"], bandwidth(env)
    result: dict[str, Any] = {"shape": {"tokens": t, "in": n, "out": m, "r": r, "threads": threads}}
    result["machine"] = {"floor_gflops": rate / 1e9, "copy_gb_s": bw / 1e9}
    for variant in ("lora", "sds"):
        rows = []
        for term in terms(variant, t, n, m, r):
            bound = max(term.flops / rate, term.bytes / bw)
            rows.append({**asdict(term), "flops": term.flops, "bytes": term.bytes, "bound_s": bound,
                         "measured_s": median[term.name]})  # fmt: skip
        result[variant] = {
            "terms": rows,
            "extra_flops_share": sum(row["flops"] for row in rows) / floor_flops,
            "bound_ratio": 1 + sum(row["bound_s"] for row in rows) / median["floor"],
            "terms_alone_ratio": 1 + sum(row["measured_s"] for row in rows) / median["floor"],
            "measured_ratio": paired_ratio(times[variant], times["floor"]),
        }
    result["sds_vs_lora"] = paired_ratio(times["sds"], times["lora"])
    result["fused_vs_lora"] = paired_ratio(times["lora_fused"], times["lora"])
    result["sds_vs_by_products"] = paired_ratio(times["sds"], times["sds_by_products"])
    result["by_hand"] = {k: paired_ratio(times[k], times["floor_by_hand"]) for k in ("lora_in_place", "lora_summed")}
    result["times_s"] = {k: summarize(v) for k, v in times.items() if k in ("floor", "lora", "sds")}
    return result


def _spread(q: dict[str, Any]) -> str:
    return f"{q['median']:.3f} ({q['q1']:.3f}–{q['q3']:.3f})"


CANDIDATES = {
    "sds / lora": "sds_vs_lora",
    "lora as one fused Function / lora": "fused_vs_lora",
    "sds (one rank-2r node) / sds product by product": "sds_vs_by_products",
}


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per shape and variant: the extra FLOPs, the bounds and the measured ratios."""
    lines = [
        "| shape | variant | extra FLOPs | roofline bound | terms timed alone | measured (IQR) |",
        "|---|---|---|---|---|---|",
    ]
    for res in results:
        s = res["shape"]
        for v in ("lora", "sds"):
            d, q = res[v], res[v]["measured_ratio"]
            shape = f"{s['in']}→{s['out']}, {s['tokens']} tokens, r {s['r']}"
            ratios = f"{d['bound_ratio']:.3f} | {d['terms_alone_ratio']:.3f} | {_spread(q)}"
            lines.append(f"| {shape} | {v} | {100 * d['extra_flops_share']:.2f} % | {ratios} |")
        for label, key in CANDIDATES.items():
            lines.append(f"| | {label} | | | | {_spread(res[key])} |")
        for name, q in res["by_hand"].items():
            lines.append(f"| | {name} / floor, without autograd | | | | {_spread(q)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--shapes", default="4096x4096,4096x14336", help="in x out, comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    results = [measure(args.tokens, n, m, args.r, args.repeats, args.threads) for n, m in shapes]
    print(markdown(results))
    for res in results:
        rates = res["machine"]
        print(f"{res['shape']}: floor {rates['floor_gflops']:.1f} GFLOP/s, copy {rates['copy_gb_s']:.1f} GB/s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
