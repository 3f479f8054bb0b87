"""FSDP2 training steps at the papers' width, per variant, through the real CLI:
`python -m benchmarks.fsdp2 [--shape 8b|small] [--devices N] [--variants lora,ralora,...] [--steps S]`.

Each variant trains with `trainer=fsdp2` on a Llama of LLaMA-3.1-8B's width (hidden 4096, MLP 14336, 32 heads /
8 KV heads) and 2 layers (`--shape 8b`; the byte vocabulary keeps the embedding small, so the layers dominate), in
bf16 with fp32 adapters on a GPU. `StepTimer` times every training step after `--skip` warm-up steps and gathers
each rank's peak memory (CUDA max allocated, else peak RSS). The table (tokens/s, ratio to LoRA, peak per rank) goes
to stdout and benchmarks/results/<date>-<host>-fsdp2.{json,md}. On CPU `--shape small` is the functional check.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

VARIANTS = ("lora", "rslora", "ralora", "ralora_pro", "ls_lora", "gralora", "hybrid_gralora", "sds_lora")
SHAPES = {  # Llama config overrides; `8b` is LLaMA-3.1-8B's layer shapes with 2 layers
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8},
    "small": {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 8, "num_key_value_heads": 2},
}
RESULTS = Path(__file__).parent / "results"


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_memory_bytes() -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated on a GPU run, else this process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"


class StepTimer(L.Callback):
    """Wall time and tokens (attention-mask sum) of every training step; at the end, rank 0 writes
    `<run_dir>/step_timer.json` with the global tokens/s over the steps after `skip` and each rank's peak memory."""

    def __init__(self, skip: int = 2, filename: str = "step_timer.json") -> None:
        self.skip, self.filename = skip, filename
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        _sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, batch: Any, idx: int):
        _sync()
        self.seconds.append(time.perf_counter() - self._t0)
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        self.tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mine = {"seconds": self.seconds, "tokens": self.tokens, "peak": peak_memory_bytes()}
        ranks = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        if not trainer.is_global_zero:
            return
        timed = slice(self.skip, None)
        # a step ends with its slowest rank
        step_s = [max(col) for col in zip(*(r["seconds"][timed] for r in ranks), strict=True)]
        tokens = sum(sum(r["tokens"][timed]) for r in ranks)
        blob = {
            "steps_timed": len(step_s),
            "step_seconds_median": sorted(step_s)[len(step_s) // 2] if step_s else None,
            "tokens_per_s": tokens / sum(step_s) if step_s else None,
            "tokens_per_step": tokens / max(len(step_s), 1),
            "peak_memory_bytes_per_rank": [r["peak"][0] for r in ranks],
            "peak_memory_kind": ranks[0]["peak"][1],
        }
        (Path(pl_module.run_dir) / self.filename).write_text(json.dumps(blob, indent=2))


def write_data(path: Path, rows: int, length: int) -> Path:
    """prompt/response JSONL whose responses fill `length` byte tokens (the byte tokenizer: one token per byte)."""
    text = "the quick brown fox jumps over the lazy dog " * (length // 44 + 1)
    lines = [json.dumps({"prompt": f"{i}:", "response": text[: length - 8]}) for i in range(rows)]
    path.write_text("\n".join(lines))
    return path


def run_variant(variant: str, args: argparse.Namespace, data: Path, out: Path) -> dict[str, Any]:
    """One training run of `variant` through the CLI; its step_timer.json plus the run's status."""
    gpu = torch.cuda.is_available() and not args.cpu
    shape = {**SHAPES[args.shape], "num_hidden_layers": args.layers}
    overrides = [f"model.config.{k}={v}" for k, v in shape.items()]
    overrides += [f"adapter={variant}", "trainer=fsdp2", f"trainer.devices={args.devices}"]
    overrides += [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}"]
    overrides += ["+trainer.limit_val_batches=1", "callbacks.checkpoint=null", "logger=csv"]
    overrides += ["task=sft", f"task.data_files={data}", f"task.max_length={args.tokens}"]
    overrides += [f"task.batch_size={args.batch}", "trainer.enable_progress_bar=false"]
    overrides += ["+callbacks.step_timer._target_=benchmarks.fsdp2.StepTimer"]
    overrides += [f"+callbacks.step_timer.skip={args.skip}"]
    if gpu:
        overrides += ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "model.dtype=bfloat16"]
    else:
        overrides += ["trainer.accelerator=cpu"]
    if variant == "sds_lora":
        overrides += [f"adapter.warmup_steps={args.skip}"]  # the switch and refreshes fall inside the timed steps
    run_dir = out / variant
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "lightning_ralora.cli.train", f"hydra.run.dir={run_dir}", *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    timer = run_dir / "step_timer.json"
    if res.returncode or not timer.exists():
        return {"variant": variant, "status": "failed", "error": res.stderr[-2000:]}
    return {"variant": variant, "status": "ok", **json.loads(timer.read_text())}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: tokens/s, ratio of step time to LoRA's, peak memory per rank (GiB) and its ratio to LoRA's."""
    lora = next((r for r in rows if r["variant"] == "lora" and r["status"] == "ok"), None)
    lines = ["| variant | tokens/s | step time / LoRA | peak per rank (GiB) | peak / LoRA |", "|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | failed | | | |")
            continue
        peak = max(r["peak_memory_bytes_per_rank"])
        t_ratio = lora["tokens_per_s"] / r["tokens_per_s"] if lora else float("nan")
        m_ratio = peak / max(lora["peak_memory_bytes_per_rank"]) if lora else float("nan")
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s']:.0f} | {t_ratio:.3f} | {peak / 2**30:.2f} | {m_ratio:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b" if torch.cuda.is_available() else "small")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument(
        "--devices", type=int, default=max(torch.cuda.device_count(), 2 if not torch.cuda.is_available() else 1)
    )
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=12, help="training steps per run (the first --skip are not timed)")
    p.add_argument("--skip", type=int, default=3)
    p.add_argument("--tokens", type=int, default=512, help="sequence length (task.max_length)")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank and step (task.batch_size)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; allowed: {list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(
            Path(tmp) / "data.jsonl", rows=args.batch * args.devices * (args.steps + 2), length=args.tokens
        )
        rows = [run_variant(v, args, data, Path(tmp)) for v in args.variants.split(",")]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else "CPU"
    head = (
        f"FSDP2 training steps, {device} x {args.devices}, shape {args.shape} ({args.layers} layers), "
        f"{args.batch} x {args.tokens} tokens per rank and step, {args.steps - args.skip} timed steps, "
        f"{time.strftime('%Y-%m-%dT%H:%M:%S')}"
    )
    md = head + "\n\n" + table(rows) + "\n"
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{time.strftime('%Y-%m-%d')}-{os.uname().nodename.split('.')[0]}-fsdp2-{args.shape}"
    stem.with_suffix(".md").write_text(md)
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "device": device, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
