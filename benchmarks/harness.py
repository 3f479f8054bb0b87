"""The step benchmark's model, task and the two training harnesses timed against each other.

Everything is composed from the package's Hydra configs (`lightning_ralora.run.compose.compose_config`): conf/model/
tiny_llama.yaml resized to the benchmark shapes, conf/optim/adamw.yaml with its cosine schedule, conf/trainer/cpu.yaml
(trainer=gpu on CUDA), conf/logger/csv.yaml and the LearningRateMonitor of conf/callbacks/default.yaml. The adapters
come from the variant registry (`benchmarks.variants`), the task is the benchmark's own causal-LM task.

- `plain_block`: a plain PyTorch loop (data fetch, forward, loss, backward, grad clipping, optimizer step, LR
  schedule, zero_grad) with the optimizer and schedule of `AdapterModule.configure_optimizers` itself, timed by
  `torch.utils.benchmark.Timer`.
- `lightning_block`: `trainer.fit` of the real `AdapterModule` (built by `lightning_ralora.run.build.build_module`) with
  the Trainer arguments of the composed config, no progress bar, no checkpointing, no validation, timed wall-clock
  from the start of the first timed batch to `on_train_end`.

Both run the same number of untimed warm-up steps, then report the mean seconds per step of the timed ones.
"""

from __future__ import annotations

import copy
import functools
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.benchmark import Timer

from benchmarks.common import Env
from lightning_ralora.data.datamodule import ListDataModule
from lightning_ralora.run.compose import compose_config
from lightning_ralora.tasks import TASKS, Task

# the benchmark shapes, applied over conf/model/tiny_llama.yaml (model.config.*) and the bench task
FULL_MODEL = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "seq_len": 128,
    "batch_size": 8,
}
QUICK_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "seq_len": 16,
    "batch_size": 2,
}
TASK_KEYS = ("seq_len", "batch_size")
# untimed calls `torch.utils.benchmark.Timer.timeit(n)` makes before timing (torch: max(n // 100, 2))
TIMER_WARMUP = 2


class BenchLMTask(Task):
    """Causal-LM loss (labels = inputs) on fixed random token sequences: the same batches for every harness."""

    name = "bench_lm"
    families = ("causal_lm",)

    def datamodule(self) -> L.LightningDataModule:
        gen = torch.Generator().manual_seed(self.seed)
        n = int(self.cfg["batch_size"]) * int(self.cfg["n_batches"])
        data = torch.randint(
            0, int(self.model_cfg["config"]["vocab_size"]), (n, int(self.cfg["seq_len"])), generator=gen
        )
        val = data[: self.cfg["batch_size"]]
        return ListDataModule(list(data), list(val), int(self.cfg["batch_size"]), collate_fn=torch.stack, shuffle=False)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(input_ids=batch, labels=batch).loss


def register_task() -> None:
    """Make `task.name = bench_lm` known to AdapterModule (the task registry is the extension point)."""
    TASKS.setdefault(BenchLMTask.name, BenchLMTask)


def quiet() -> None:
    """Silence Lightning's per-fit banners and the warnings about tiny runs, which would drown the table."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.profiler")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@functools.lru_cache(maxsize=8)
def _composed(quick: bool, cuda: bool, adapter: str) -> DictConfig:
    """The package's config for the benchmark shapes (composed once per combination; callers get copies)."""
    m = QUICK_MODEL if quick else FULL_MODEL
    sizes = {k: v for k, v in m.items() if k not in TASK_KEYS}
    overrides = [
        "model=tiny_llama",
        "model.name=bench_llama",
        "model.tokenizer=null",  # the bench task feeds token ids; no tokenizer is loaded
        *(f"model.config.{k}={v}" for k, v in sizes.items()),
        f"model.config.max_position_embeddings={max(256, m['seq_len'])}",
        "optim=adamw",
        f"trainer={'gpu' if cuda else 'cpu'}",
        "logger=csv",
        "callbacks=default",
        f"adapter={adapter}",
    ]
    return compose_config(overrides, run_dir=tempfile.gettempdir())


def bench_config(env: Env, n_batches: int, variant: str | None = None) -> DictConfig:
    """The composed config of a benchmark run (read-only, shared between callers): the resized tiny Llama, the bench
    task with `n_batches` distinct batches, and `variant`'s adapter (see `adapter_cfg`; None: conf's default)."""
    return _bench_config(env.quick, env.cuda, n_batches, variant)


@functools.lru_cache(maxsize=64)
def _bench_config(quick: bool, cuda: bool, n_batches: int, variant: str | None) -> DictConfig:
    from benchmarks.variants import PEFT

    m = QUICK_MODEL if quick else FULL_MODEL
    cfg = copy.deepcopy(_composed(quick, cuda, "peft_lora" if variant in PEFT else "lora"))
    with open_dict(cfg):
        cfg.task = {"name": BenchLMTask.name, **{k: m[k] for k in TASK_KEYS}, "n_batches": n_batches}
        if variant is not None:
            cfg.adapter = adapter_cfg(variant, cfg.adapter)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def adapter_cfg(variant: str, composed: Any) -> dict[str, Any]:
    """The `adapter` config of a variant at the benchmark's equal parameter count: ours from the registry's
    benchmark entry (`variants.spec`'s config), peft LoRA from conf/adapter/peft_lora.yaml at r=RANK, alpha=ALPHA.
    peft GraLoRA and DoRA have no `adapter` config (plain loop only): their entry is only the kind."""
    from benchmarks.variants import ALPHA, RANK, ours
    from lightning_ralora.adapters.registry import VARIANTS

    if variant in ours():
        return {"name": variant, "kind": variant, "dropout": 0.0, **dict(VARIANTS[variant].benchmark.config)}
    if variant == "peft_lora":
        return {**OmegaConf.to_container(composed, resolve=True), "r": RANK, "alpha": ALPHA}
    return {"name": variant, "kind": "peft"}


def section(cfg: DictConfig, key: str) -> dict[str, Any]:
    """One node of a composed config as a plain dict (interpolations resolved)."""
    return OmegaConf.to_container(cfg[key], resolve=True)


def configure_optimizers(model: nn.Module, cfg: DictConfig, total_steps: int) -> tuple[Any, Any]:
    """`AdapterModule.configure_optimizers` itself, run for a plain model: the optimizer of `cfg.optim` over the
    `optimizer_groups` of `model` (LoRA+ of `cfg.adapter`), and its per-step schedule over `total_steps`."""
    from lightning_ralora.modules.adapter_module import AdapterModule

    host = SimpleNamespace(
        optim_cfg=section(cfg, "optim"),
        adapter_cfg=section(cfg, "adapter"),
        backbone=model,
        trainer=SimpleNamespace(estimated_stepping_batches=total_steps),
    )
    out = AdapterModule.configure_optimizers(host)  # type: ignore[arg-type]  # duck-typed: the attributes it reads
    return out["optimizer"], out["lr_scheduler"]["scheduler"]


class PlainLoop:
    """The plain training loop: `step()` fetches the next batch and trains on it (forward under bf16 autocast on
    CUDA, backward, gradient clipping at the trainer's `gradient_clip_val`, optimizer and schedule step)."""

    def __init__(
        self, model: nn.Module, task: Task, dm: L.LightningDataModule, env: Env, cfg: DictConfig, total_steps: int
    ) -> None:
        self.model, self.task, self.env, self.dm = model.train(), task, env, dm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt, self.sched = configure_optimizers(model, cfg, total_steps)
        self.clip = cfg.trainer.get("gradient_clip_val")
        self.batches: Iterator[Any] = iter(dm.train_dataloader())
        self.calls = 0

    def _next_batch(self) -> Any:
        try:
            return next(self.batches)
        except StopIteration:  # a new epoch, as Lightning would start one
            self.batches = iter(self.dm.train_dataloader())
            return next(self.batches)

    def step(self) -> None:
        """One training step on the next batch."""
        batch = self._next_batch().to(self.env.device, non_blocking=True)
        if self.env.cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = self.task.loss(self.model, batch)
        else:
            loss = self.task.loss(self.model, batch)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.calls += 1


def plain_block(
    model: nn.Module, task: Task, dm: L.LightningDataModule, env: Env, cfg: DictConfig, warmup: int, steps: int
) -> float:
    """A fresh optimizer, `warmup` untimed steps, then the mean seconds of `steps` steps (torch.utils.benchmark)."""
    loop = PlainLoop(model, task, dm, env, cfg, warmup + steps)
    for _ in range(max(0, warmup - TIMER_WARMUP)):
        loop.step()
    timer = Timer("step()", globals={"step": loop.step}, num_threads=torch.get_num_threads())
    mean = timer.timeit(steps).mean
    if loop.calls != max(warmup, TIMER_WARMUP) + steps:
        raise RuntimeError(f"plain loop ran {loop.calls} steps, expected {max(warmup, TIMER_WARMUP) + steps}")
    return mean


class StepTimer(L.Callback):
    """Wall-clock from the start of batch `skip` (device-synchronised) to `on_train_end`: the timed steps include
    everything Lightning does between batches (hooks, logging, data fetch)."""

    def __init__(self, env: Env, skip: int = 0) -> None:
        self.env, self.skip = env, skip
        self.start: float | None = None
        self.end: float | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.skip and self.start is None:
            self.env.sync()
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.env.sync()
        self.end = time.perf_counter()


def lightning_block(
    module: L.LightningModule,
    cfg: DictConfig,
    dm: L.LightningDataModule,
    env: Env,
    max_steps: int,
    skip: int = 0,
    extra_callbacks: list[L.Callback] | None = None,
) -> float:
    """`trainer.fit` for `max_steps` steps with the composed config's Trainer arguments, logger and callbacks
    (checkpointing off); returns the mean seconds per step after the first `skip` steps."""
    from hydra.utils import instantiate

    from lightning_ralora.run.build import build_loggers, trainer_kwargs

    kwargs = trainer_kwargs(cfg)
    kwargs.update(
        max_steps=max_steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    timer = StepTimer(env, skip)
    with tempfile.TemporaryDirectory(prefix="bench_lightning_") as tmp:
        # the logger and callback nodes with this run's `run_dir` (their `${run_dir}` resolves against it)
        nodes = {k: OmegaConf.to_container(cfg[k], resolve=False) for k in ("logger", "callbacks", "wandb")}
        run_cfg = OmegaConf.create({**nodes, "run_dir": tmp})
        callbacks = [instantiate(c) for name, c in run_cfg.callbacks.items() if c is not None and name != "checkpoint"]
        trainer = L.Trainer(
            **kwargs,
            callbacks=[*callbacks, *(extra_callbacks or []), timer],
            logger=build_loggers(run_cfg),
            default_root_dir=tmp,
        )
        trainer.fit(module, datamodule=dm)
    if trainer.global_step != max_steps or timer.start is None or timer.end is None:
        raise RuntimeError(f"Lightning ran {trainer.global_step} steps, expected {max_steps}")
    return (timer.end - timer.start) / (max_steps - skip)


def build_module(variant: str, env: Env, n_batches: int, prepare: bool = True) -> L.LightningModule:
    """The real AdapterModule for `variant` (ours or peft LoRA), built by `lightning_ralora.run.build.build_module` from
    the composed config, with its adapters applied now. With `prepare`, each layer's registered benchmark `prepare`
    step runs (SDS: the switch to the SDS phase, for the steady-state step cost); otherwise SDS starts in warm-up."""
    from benchmarks.variants import prepare_layers
    from lightning_ralora.run.build import build_module as package_build_module

    register_task()
    torch.manual_seed(0)
    module = package_build_module(bench_config(env, n_batches, variant))
    module.configure_model()
    if prepare:
        prepare_layers(module.backbone)
    return module


def datamodule(env: Env, n_batches: int) -> L.LightningDataModule:
    """The bench batches (seeded: every harness and variant sees the same ones)."""
    register_task()
    cfg = bench_config(env, n_batches)
    return BenchLMTask(section(cfg, "task"), section(cfg, "model"), seed=0).datamodule()


def plain_model(variant: str, env: Env) -> tuple[nn.Module, Task]:
    """The same backbone (same seed) adapted by `variant` for the plain loop (SDS in its SDS phase), and its task."""
    from benchmarks.variants import apply_to_model
    from lightning_ralora.adapters import find_targets
    from lightning_ralora.modules.backbone import build_backbone

    register_task()
    cfg = bench_config(env, 1)
    mcfg = section(cfg, "model")
    torch.manual_seed(0)
    backbone = build_backbone(mcfg)
    targets = find_targets(backbone, mcfg["target_modules"])
    model = apply_to_model(backbone, variant, targets).to(env.device)
    return model, BenchLMTask(section(cfg, "task"), mcfg, seed=0)
