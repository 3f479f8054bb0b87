"""Section 4: peak memory of a few training steps per variant, relative to our LoRA.

CPU: the allocator's view, read from torch.profiler's memory events ("Total Allocated" of the CPU allocator, which
counts every tensor allocated while profiling) plus the parameters and buffers that existed before; in a full run
also the peak-RSS growth while training in a fresh subprocess per variant (`python -m benchmarks.memory VARIANT`).
CUDA: torch.cuda.max_memory_allocated over model build and steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import Env, Figure, pick_env, ratio_figure, round_robin, summarize
from benchmarks.harness import bench_config, configure_optimizers, datamodule, plain_model, quiet, register_task

VARIANTS = ("lora", "ralora", "gralora", "sds", "peft_lora", "peft_gralora", "peft_dora")
STEPS = 3
REPO = Path(__file__).resolve().parent.parent


def _static_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (storages counted once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _train_steps(model: nn.Module, task: Any, env: Env, steps: int) -> None:
    """`steps` plain training steps (the optimizer of `AdapterModule.configure_optimizers` is created here, so its
    state counts)."""
    model.train()
    opt, sched = configure_optimizers(model, bench_config(env, steps), steps)
    for i, batch in enumerate(datamodule(env, steps).train_dataloader()):
        if i == steps:
            break
        batch = batch.to(env.device)
        if env.cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = task.loss(model, batch)
        else:
            loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def _profiled_peak(fn: Any) -> int:
    """Peak of the CPU allocator's live bytes while `fn` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    peak = 0
    for e in events:
        if e.get("name") == "[memory]" and int(e["args"].get("Device Type", 0)) == 0:
            peak = max(peak, int(e["args"]["Total Allocated"]))
    return peak


def measure(variant: str, env: Env, steps: int = STEPS) -> dict[str, int]:
    """Peak bytes of building `variant` on the step model and training it `steps` steps (allocator view)."""
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)
        before = torch.cuda.memory_allocated(env.device)
        model, task = plain_model(variant, env)
        static = _static_bytes(model)
        _train_steps(model, task, env, steps)
        peak = torch.cuda.max_memory_allocated(env.device) - before
        del model, task
        gc.collect()
        torch.cuda.empty_cache()
        return {"static_bytes": static, "dynamic_peak_bytes": int(peak) - static, "peak_bytes": int(peak)}
    model, task = plain_model(variant, env)
    static = _static_bytes(model)
    dynamic = _profiled_peak(lambda: _train_steps(model, task, env, steps))
    return {"static_bytes": static, "dynamic_peak_bytes": dynamic, "peak_bytes": static + dynamic}


def _status_kb(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_subprocess(variant: str, quick: bool, threads: int) -> dict[str, Any]:
    """Peak RSS (bytes) of a fresh process while it trains `variant`, above its RSS after imports and model build."""
    cmd = [sys.executable, "-m", "benchmarks.memory", variant, "--threads", str(threads)] + (
        ["--quick"] if quick else []
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(env: Env, rss: bool | None = None) -> dict[str, Any]:
    """Allocator-view peaks (and RSS peaks on CPU in full runs) per variant, and their ratios to our LoRA."""
    rss = (not env.quick and not env.cuda) if rss is None else rss
    measure("lora", env)  # discarded: one-time allocations (cuBLAS workspaces, lazy inits) land here, not on LoRA
    alloc = {v: measure(v, env) for v in VARIANTS}
    figures: list[Figure] = []
    view = "torch.cuda.max_memory_allocated" if env.cuda else "CPU allocator (profiler memory events) + params/buffers"
    for v in VARIANTS[1:]:
        ratio = alloc[v]["peak_bytes"] / alloc["lora"]["peak_bytes"]
        figures.append(
            Figure(
                f"memory/{v}_vs_lora",
                "memory",
                f"memory: {v} / our LoRA, peak allocated ({STEPS} steps)",
                {**summarize([ratio]), "ratio_of_medians": ratio},
                "sds_memory" if v == "sds" else None,
                1.01 if v == "sds" else None,
                note=view,
            )
        )
    for v in ("sds",):
        ratio = alloc[v]["dynamic_peak_bytes"] / alloc["lora"]["dynamic_peak_bytes"]
        figures.append(
            Figure(
                f"memory/{v}_vs_lora_training_only",
                "memory",
                f"memory: {v} / our LoRA, training allocations only (peak minus weights and buffers)",
                {**summarize([ratio]), "ratio_of_medians": ratio},
                note="the rest of SDS's excess is its Q_A, Q_B buffers: r(m+n) values per target",
            )
        )
    raw: dict[str, Any] = {"view": view, "steps": STEPS, "allocator": alloc}
    notes: list[str] = []
    if rss:
        threads = torch.get_num_threads()
        rounds = env.repeats.get("memory", 3)
        workers: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}

        def sampler(v: str) -> Any:
            def sample() -> float:
                workers[v].append(rss_subprocess(v, env.quick, threads))
                return float(workers[v][-1]["train_peak_above_start_bytes"])

            return sample

        growth = round_robin({v: sampler(v) for v in VARIANTS}, rounds, warmup=0)
        raw["rss"] = {"growth_bytes": {v: summarize(g) for v, g in growth.items()}, "workers": workers}
        raw["rss_note"] = (
            "fresh process per variant and round: imports and model build, then the peak-RSS mark is reset "
            "(/proc/self/clear_refs) and the figure is peak RSS during the training steps minus RSS before them"
        )
        for v in VARIANTS[1:]:
            figures.append(
                ratio_figure(
                    f"memory/{v}_vs_lora_rss",
                    "memory",
                    f"memory: {v} / our LoRA, peak RSS growth while training (fresh processes)",
                    growth,
                    v,
                    "lora",
                    note="info: RSS also holds allocator caches and fragmentation (about ±20% run to run here)",
                )
            )
    else:
        notes.append("peak RSS of fresh processes not measured (quick run, CUDA or --no-rss): allocator view only")
    return {"config": {"variants": list(VARIANTS), "steps": STEPS}, "raw": raw, "figures": figures, "notes": notes}


def _worker(argv: list[str] | None = None) -> None:
    """Subprocess entry: build one variant, train STEPS steps, print its RSS figures as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant", choices=list(VARIANTS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    register_task()
    import peft  # noqa: F401  (every worker imports the same libraries, so RSS differences are the variants')

    env = pick_env("cpu", quick=args.quick)
    model, task = plain_model(args.variant, env)
    gc.collect()
    reset = _reset_peak_rss()
    start_kb = _status_kb("VmRSS") or 0
    _train_steps(model, task, env, STEPS)
    peak_kb = _status_kb("VmHWM") if reset else None
    if peak_kb is None:  # no resettable mark: the lifetime peak (imports included), much less telling
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "variant": args.variant,
        "peak_mark_reset": reset,
        "rss_start_bytes": start_kb * 1024,
        "peak_bytes": peak_kb * 1024,
        "train_peak_above_start_bytes": (peak_kb - start_kb) * 1024,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    _worker()
