"""`python -m benchmarks.run [--quick] [--sections layer,step,schedules,memory,generation,paper] [--repeats N]
[--out PATH]`

Measures every adapter variant side by side (see benchmarks/__init__.py), prints a markdown table
(figure | measured ratio (spread) | target | met?) and writes benchmarks/results/<date>-<host>.json plus the table
as .md next to it. The .md summaries are what the repository keeps; the raw JSON (every sample) stays local
(.gitignore).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import TARGETS, Env, Figure, pick_env
from benchmarks.report import markdown, write

SECTIONS = ("layer", "step", "schedules", "memory", "generation", "paper")
RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(env: Env, started: dt.datetime) -> dict[str, Any]:
    """Versions, device, host, date and threads, for the JSON and the table header."""
    import lightning
    import peft
    import transformers

    return {
        "date": started.isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": str(env.device),
        "device_name": torch.cuda.get_device_name(env.device) if env.cuda else _cpu_name(),
        "dtype": str(env.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "quick": env.quick,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lightning": lightning.__version__,
        "loadavg_start": list(os.getloadavg()),
        "argv": sys.argv[1:],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CI smoke test); figures not meaningful")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per section (default: per section)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<date>-<host>.json)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-rss", action="store_true", help="skip the fresh-process peak-RSS measurements")
    args = p.parse_args(argv)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {unknown}; allowed: {list(SECTIONS)}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen sections, print the table, write the JSON; returns the results dict."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks.harness import quiet

    quiet()
    os.environ.setdefault("WANDB_MODE", "disabled")
    sections = [s for s in SECTIONS if s in args.sections.split(",")]
    repeats = {s: args.repeats for s in SECTIONS} if args.repeats else {}
    env = pick_env(args.device, quick=args.quick, repeats=repeats)
    started = dt.datetime.now()
    info = environment(env, started)
    modules = {name: importlib.import_module(f".{name}", __package__) for name in sections}
    results: dict[str, Any] = {"environment": info, "targets": TARGETS, "sections": {}}
    figures: list[Figure] = []
    notes: list[str] = []
    # everything alive now (torch, transformers, peft, Lightning, Hydra modules) goes to the permanent generation:
    # the full collection round_robin runs once per round then walks only what the benchmarks allocate
    gc.collect()
    gc.freeze()
    try:
        for name in sections:
            t0 = time.perf_counter()
            print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
            mod = modules[name]
            out = mod.run(env, rss=False) if name == "memory" and args.no_rss else mod.run(env)
            secs = time.perf_counter() - t0
            print(f"[benchmarks] {name} done in {secs:.1f} s", file=sys.stderr, flush=True)
            figures += out["figures"]
            notes += out.get("notes", [])
            results["sections"][name] = {
                **{k: v for k, v in out.items() if k != "figures"},
                "figures": [f.to_dict() for f in out["figures"]],
                "seconds": secs,
            }
    finally:
        gc.unfreeze()  # back to normal collection (main may run inside a longer-lived process)
    info["loadavg_end"] = list(os.getloadavg())
    busy = max(info["loadavg_start"][0], info["loadavg_end"][0])
    if not env.cuda and info["threads"] > 1 and busy > (os.cpu_count() or 1) - 0.5:
        notes.append(
            f"the CPU was busy (load average {busy:.1f} on {os.cpu_count()} cores) and torch used "
            f"{info['threads']} threads: OpenMP barriers stall under contention; rerun with --threads 1"
        )
    info["seconds_total"] = (dt.datetime.now() - started).total_seconds()
    results["figures"] = {
        f.key: {
            "ratio": f.value,
            "q1": f.ratio["q1"],
            "q3": f.ratio["q3"],
            "n": f.ratio["n"],
            "target_id": f.target_id,
            "bound": f.bound,
            "met": f.met,
        }
        for f in figures
    }
    results["targets_met"] = {
        tid: all(f.met for f in figures if f.target_id == tid)
        for tid in TARGETS
        if any(f.target_id == tid for f in figures)
    }
    table = markdown(figures, info, notes)
    results["markdown"] = table
    out_path = args.out or RESULTS / f"{started:%Y-%m-%d-%H%M%S}-{socket.gethostname()}.json"
    json_path, md_path = write(out_path, results, table)
    print(table)
    print(f"[benchmarks] wrote {json_path} and {md_path}", file=sys.stderr)
    results["paths"] = {"json": str(json_path), "markdown": str(md_path)}
    return results


if __name__ == "__main__":
    main()
