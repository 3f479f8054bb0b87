"""Section 3: what the schedules cost over a run: GID warm-up share of the default job, SDS-LoRA's run-averaged
step time (warm-up, switch and QR refreshes included) and gradient-alignment logging at its default interval."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Any

from benchmarks.common import Env, Figure, ratio_figure, round_robin, summarize
from benchmarks.harness import bench_config, build_module, datamodule, lightning_block, section
from lightning_ralora.run.compose import compose_config

JOB = ["adapter=ralora", "logger=csv", "trainer.enable_progress_bar=false"]
# --quick: the package's `debug=fast` (12 steps, tiny planted data) and the shortest GID warm-up
QUICK_JOB = ["debug=fast", "adapter.gid_batches=1"]


def gid_share(env: Env, repeats: int) -> tuple[Figure, dict[str, Any]]:
    """Run the default job with adapter=ralora in-process; share = GIDWarmup seconds / the job's wall time."""
    from lightning_ralora.run.job import train

    overrides = JOB + (QUICK_JOB if env.quick else []) + (["trainer=gpu"] if env.cuda else [])
    os.environ.setdefault("WANDB_MODE", "disabled")
    shares, gid_s, wall_s = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="bench_gid_") as tmp:
            results = train(compose_config(overrides, run_dir=tmp))
        seconds = results["callbacks"]["GIDWarmup"]["seconds"]
        gid_s.append(seconds)
        wall_s.append(results["wall_time_s"])
        shares.append(seconds / results["wall_time_s"])
    fig = Figure(
        "schedules/gid_share",
        "schedules",
        "schedules: GID warm-up / default job wall time (adapter=ralora)",
        summarize(shares),
        "gid_share",
        0.05,
        note=f"default config with overrides {overrides}; share per job, median over {repeats} jobs",
    )
    raw = {"overrides": overrides, "gid_seconds": summarize(gid_s), "job_wall_s": summarize(wall_s)}
    return fig, raw


def schedule_cfgs() -> tuple[dict[str, Any], dict[str, Any]]:
    """The composed conf/adapter/sds_lora.yaml (warmup_steps, K) and the alignment callback of
    conf/callbacks/alignment.yaml, as dicts."""
    cfg = compose_config(["adapter=sds_lora", "callbacks=alignment"], run_dir=tempfile.gettempdir())
    return section(cfg, "adapter"), section(cfg, "callbacks")["alignment"]


def run(env: Env, parts: tuple[str, ...] = ("gid", "sds", "alignment")) -> dict[str, Any]:
    """The three schedule figures (those of `parts`); SDS and alignment runs are interleaved with plain LoRA runs of
    the same length."""
    from lightning_ralora.callbacks.sds_schedule import SDSSchedule

    repeats = env.repeats.get("schedules", 1 if env.quick else 3)
    notes: list[str] = []
    figures: list[Figure] = []
    raw: dict[str, Any] = {}

    if "gid" in parts:
        fig, raw["gid"] = gid_share(env, repeats)
        figures.append(fig)

    sds, align = schedule_cfgs()
    total = 6 if env.quick else 100
    warmup_steps = 2 if env.quick else int(sds["warmup_steps"])
    every = 3 if env.quick else int(align["every_n_steps"])
    if env.quick:
        notes.append(f"quick: runs of {total} steps, SDS warm-up {warmup_steps}, alignment every {every} steps")
    dm = datamodule(env, total + 1)
    callbacks_seen: dict[str, Any] = {}

    def lora_run() -> float:
        module = build_module("lora", env, total + 1)
        return lightning_block(module, bench_config(env, total + 1, "lora"), dm, env, total)

    def sds_run() -> float:
        module = build_module("sds", env, total + 1, prepare=False)
        cb = SDSSchedule(warmup_steps=warmup_steps, K=int(sds["K"]))
        t = lightning_block(module, bench_config(env, total + 1, "sds"), dm, env, total, extra_callbacks=[cb])
        callbacks_seen["sds"] = {
            "switch_step": cb.switch_step,
            "refreshes": len(cb.refresh_log),
            "refresh_steps": list(cb.refresh_log),
        }
        return t

    samplers = {"lora": lora_run, "sds": sds_run}
    kwargs: dict[str, Any] | None = None
    if "alignment" in parts and importlib.util.find_spec("lightning_ralora.callbacks.alignment") is None:
        notes.append("alignment overhead not measured: lightning_ralora.callbacks.alignment does not exist yet")
    elif "alignment" in parts:
        from lightning_ralora.callbacks.alignment import GradientAlignment

        kwargs = {k: v for k, v in align.items() if k != "_target_"}
        kwargs["every_n_steps"] = every

        def align_run() -> float:
            module = build_module("lora", env, total + 1)
            cb = GradientAlignment(**kwargs)
            t = lightning_block(module, bench_config(env, total + 1, "lora"), dm, env, total, extra_callbacks=[cb])
            cost = cb.summary.get("align/cost_s", {})
            callbacks_seen["alignment"] = {
                "logged_steps": list(cb.logged_steps),
                "measure_s_mean": cost.get("mean"),
                "measure_count": cost.get("count"),
            }
            return t

        samplers["lora_alignment"] = align_run
    times = round_robin(samplers, repeats, warmup=0)
    raw["runs"] = {
        "steps": total,
        "sds_warmup_steps": warmup_steps,
        "sds_K": int(sds["K"]),
        "align_every": every,
        "align_kwargs": kwargs,
        "mean_step_s": {k: summarize(v) for k, v in times.items()},
        "last_run": callbacks_seen,
    }
    figures.append(
        ratio_figure(
            "schedules/sds_run_vs_lora",
            "schedules",
            f"schedules: SDS-LoRA / LoRA, mean step over a {total}-step run "
            f"(warm-up {warmup_steps}, switch, refreshes K={sds['K']})",
            times,
            "sds",
            "lora",
            "sds_run_vs_lora",
        )
    )
    if "lora_alignment" in times:
        figures.append(
            ratio_figure(
                "schedules/alignment_overhead",
                "schedules",
                f"schedules: LoRA + GradientAlignment(every {every}) / LoRA, mean step over {total} steps",
                times,
                "lora_alignment",
                "lora",
                "alignment_overhead",
            )
        )
    return {"config": {"repeats": repeats}, "raw": raw, "figures": figures, "notes": notes}
