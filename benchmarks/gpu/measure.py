"""Runs the acceptance sections within the budget and writes one JSON + markdown report (called by
`benchmarks.gpu.acceptance` once the carried wheels are installed)."""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import TARGETS, Env, Figure, pick_env
from benchmarks.gpu.sections import SECTIONS, Budget
from benchmarks.harness import quiet
from benchmarks.report import markdown, write
from benchmarks.run import environment
from lightning_ralora.core.io import markdown_table

GIB = 2**30


def device_env(args: argparse.Namespace) -> Env:
    """The real run: the GPU with bf16 weights; the dry run: CPU, tiny shapes, fp32 weights (bf16 autocast on
    CPU), one timed round per section."""
    if args.dry_run:
        return Env(torch.device("cpu"), torch.float32, quick=True, repeats={"paper": 1, "generation": 1})
    env = pick_env(args.device)
    if not env.cuda:
        raise SystemExit(f"--device {args.device}: no CUDA device here; use --dry-run on CPU")
    return env


def run_sections(env: Env, names: list[str], budget: Budget) -> dict[str, dict[str, Any]]:
    """Each section in turn, skipped with a note once the budget is spent; a failing section is recorded (its
    traceback's tail) and the next one runs."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if budget.left() <= 0:
            out[name] = {"status": "skipped", "note": f"budget of {budget.seconds:.0f} s spent", "figures": []}
            continue
        t0 = time.perf_counter()
        print(f"[acceptance] {name} ({budget.left():.0f} s left) ...", file=sys.stderr, flush=True)
        try:
            res = SECTIONS[name](env, budget)
            out[name] = {"status": "ok", **res}
        except Exception as err:  # noqa: BLE001 - one broken section must not lose the others' figures
            tail = traceback.format_exc()[-3000:]
            out[name] = {"status": "failed", "note": f"{type(err).__name__}: {err}"[:500], "traceback": tail}
            out[name]["figures"] = []
        out[name]["seconds"] = time.perf_counter() - t0
        gc.collect()
        if env.cuda:
            torch.cuda.empty_cache()
        print(f"[acceptance] {name}: {out[name]['status']} in {out[name]['seconds']:.1f} s", file=sys.stderr)
    return out


def extra_tables(sections: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown for what is not a ratio: the step's tokens/s and peaks, the GID warm-up's bytes, section status."""
    lines = [
        "",
        markdown_table(
            ["section", "status", "seconds", "note"],
            [[n, s["status"], f"{s.get('seconds', 0):.1f}", s.get("note", "")] for n, s in sections.items()],
        ),
    ]
    step = sections.get("step", {})
    if step.get("status") == "ok":
        raw = step["raw"]
        rows = [
            [v, f"{raw['tokens_per_s'][v]:.0f}", f"{p['step_peak_above_resident_bytes'] / GIB:.3f}"]
            for v, p in raw["peak"].items()
        ]
        lines += [
            "",
            "2-layer 8B-width model step:",
            "",
            markdown_table(["variant", "tokens/s", "step peak above resident (GiB)"], rows),
        ]
    gid = sections.get("gid", {})
    if gid.get("status") == "ok":
        rows = [[k.removesuffix("_bytes"), f"{v / GIB:.3f}"] for k, v in gid["raw"].items() if k.endswith("_bytes")]
        lines += ["", "GID warm-up memory:", "", markdown_table(["quantity", "GiB"], rows)]
    return lines


def main(args: argparse.Namespace, start: float, notes: list[str]) -> dict[str, Any]:
    """Run the chosen sections, write DIR/acceptance.json and .md; returns the report."""
    quiet()
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes: one thread; OpenMP barriers stall on a busy CI machine
    env = device_env(args)
    names = list(SECTIONS) if not args.sections else [s for s in SECTIONS if s in args.sections.split(",")]
    budget = Budget(args.budget_s, start)  # counted from the process start: the wheel install is inside it
    started = dt.datetime.now()
    info = environment(env, started)
    info.update(dry_run=args.dry_run, budget_s=args.budget_s, precision="bf16-mixed (fp32 adapters)")
    # the libraries loaded so far go to the permanent generation: the collections the timings run walk only
    # what the sections allocate (as benchmarks.run does)
    gc.collect()
    gc.freeze()
    try:
        sections = run_sections(env, names, budget)
    finally:
        gc.unfreeze()
    figures: list[Figure] = [f for s in sections.values() for f in s.get("figures", [])]
    for s in sections.values():
        notes += s.get("notes", [])
    info["seconds_total"] = time.perf_counter() - start
    table = markdown(figures, info, notes) + "\n".join(extra_tables(sections)) + "\n"
    report = {
        "environment": info,
        "targets": TARGETS,
        "sections": {
            n: {**{k: v for k, v in s.items() if k != "figures"}, "figures": [f.to_dict() for f in s["figures"]]}
            for n, s in sections.items()
        },
        "notes": notes,
        "markdown": table,
    }
    json_path, md_path = write(Path(args.out) / "acceptance.json", report, table)
    print(table)
    print(f"[acceptance] wrote {json_path} and {md_path} in {info['seconds_total']:.1f} s", file=sys.stderr)
    return report
