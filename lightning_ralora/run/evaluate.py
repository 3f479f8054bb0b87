"""Evaluation of a finished (or interrupted) training run, what `lightning-ralora-eval` runs (its help: cli/eval.py):
find the model (RUN/checkpoints/last.ckpt, else RUN/export) and the run's prompt template, prepare the suites before
any weights load, evaluate in Lightning's test stage with the configured strategy (or replay `eval.completions`, or
generate through a serving engine with `eval.backend=openai`), and add the metrics to the run's record."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import GenerationConfig

from lightning_ralora.data.tokenizer import load_tokenizer
from lightning_ralora.evaluation.base import EvalConfigError, EvalDataError
from lightning_ralora.evaluation.completions import attach_completions
from lightning_ralora.evaluation.endpoint import EndpointError
from lightning_ralora.evaluation.runner import (
    prepare,
    run_jobs,
    run_template,
    run_test_stage,
    suite_names,
    template_tokenizer,
)
from lightning_ralora.evaluation.serving import ServedModel, ServedTask, check_decoding, connect
from lightning_ralora.modules.adapter_module import AdapterModule
from lightning_ralora.run.build import trainer_kwargs
from lightning_ralora.run.checkpoints import newest_intact_checkpoint
from lightning_ralora.run.compose import CONF_DIR
from lightning_ralora.run.record import RunRecord
from lightning_ralora.run.rundir import is_rank_zero

TRAINER_KEYS = ("accelerator", "devices", "strategy", "precision", "num_nodes")


class EvalInputError(ValueError):
    """Bad command-line input (no run dir, no checkpoint, unknown eval group)."""


def find_model(run_dir: Path) -> tuple[Path | None, Path | None]:
    """(the run's newest intact checkpoint, RUN/export) where present; EvalInputError when neither is. A truncated
    checkpoint is never loaded: an older intact one is used, naming the skipped file."""
    if not run_dir.is_dir():
        raise EvalInputError(f"run_dir={run_dir}: directory not found")
    ckpt, skipped = newest_intact_checkpoint(run_dir)
    export = run_dir / "export"
    export_ok = (export / "config.json").is_file()
    if ckpt is None and not export_ok:
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise EvalInputError(
            f"run_dir={run_dir}: no intact checkpoint (checkpoints/*.ckpt){why} and no export/ to evaluate"
        )
    for line in skipped:
        print(f"eval: skipping {line}", file=sys.stderr, flush=True)
    return ckpt, (export if export_ok else None)


def saved_run_config(run_dir: Path, ckpt: Path | None) -> dict[str, Any]:
    """The run's config: results.json "config", else the checkpoint's hyperparameters (model/task/adapter/optim)."""
    results = run_dir / "results.json"
    if results.is_file():
        config = json.loads(results.read_text()).get("config")
        if config:
            return config
    if ckpt is None:
        raise EvalInputError(f"run_dir={run_dir}: no results.json config and no checkpoint to read the config from")
    import torch

    hp = torch.load(ckpt, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    keys = {"model": "model_cfg", "task": "task_cfg", "adapter": "adapter_cfg", "optim": "optim_cfg"}
    return {**{k: dict(hp.get(v) or {}) for k, v in keys.items()}, "seed": hp.get("seed", 0)}


def load_module(run_cfg: dict[str, Any], ckpt: Path | None, export: Path | None):
    """The trained AdapterModule: from the checkpoint (adapter structure and weights), else the merged export."""
    if ckpt is not None:
        return AdapterModule.from_checkpoint(ckpt)
    model = {**run_cfg["model"], "pretrained": str(export), "tokenizer": str(export), "config": None}
    adapter = {"name": f"{run_cfg['adapter'].get('name', 'adapter')}-merged", "kind": "full"}
    module = AdapterModule(model, run_cfg["task"], adapter, run_cfg.get("optim") or {"lr": 1e-4}, run_cfg["seed"])
    module.configure_model()
    return module


def _run_config_if_any(run_dir: Path) -> dict[str, Any]:
    """The run's saved config when RUN holds one (results.json or a checkpoint); {} otherwise."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if (run_dir / "results.json").is_file() or ckpt.is_file():
        try:
            return saved_run_config(run_dir, ckpt if ckpt.is_file() else None)
        except EvalInputError:
            return {}
    return {}


def _tokenizer_source(run_cfg: dict[str, Any], ckpt: Path | None, export: Path | None) -> str | None:
    """Where the evaluated model's tokenizer comes from, as `load_module` loads it: the run's `model.tokenizer`, or
    the export folder when there is no checkpoint."""
    return str(export) if ckpt is None and export is not None else (run_cfg.get("model") or {}).get("tokenizer")


def _print_metrics(metrics: dict[str, dict[str, float]], run_dir: Path) -> None:
    """One line of metrics per suite and where eval.json is (rank 0)."""
    for name, m in metrics.items():
        print(f"{name}: " + "  ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float))))
    print(f"  eval:    {(run_dir / 'eval.json').resolve()}", flush=True)


def score_completions(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """`eval.completions=FILE`: every check (suites, data, the file against the examples) before anything runs,
    then the suites' own `run` and scoring on the file's completions; outputs as a model's evaluation."""
    run_dir = Path(cfg.run_dir)
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    try:
        if run_dir.exists() and not run_dir.is_dir():
            raise EvalInputError(f"run_dir={run_dir}: not a directory")
        run_cfg = _run_config_if_any(run_dir)
        template = cfg.eval.get("template") or run_template(run_cfg)
        tok = template_tokenizer(template, (run_cfg.get("model") or {}).get("tokenizer")) if run_cfg else None
        if template == "chat" and tok is None:
            raise EvalInputError(f"template=chat needs the run's tokenizer: run_dir={run_dir} holds no run config")
        jobs = prepare(eval_cfg, template, None, tok)  # no model: any run's family can be scored from a file
        attach_completions(jobs, eval_cfg)
    except (EvalInputError, EvalConfigError, EvalDataError) as err:
        raise EvalInputError(str(err)) from err
    metrics = run_jobs(None, jobs, eval_cfg, run_dir)
    _print_metrics(metrics, run_dir)
    return metrics


def served_model(run_dir: Path, run_cfg: dict[str, Any]) -> ServedModel:
    """The run as `eval.backend=openai` evaluates it: its task config, seed and tokenizer (RUN/export's, the served
    model's, else `model.tokenizer`) and RUN/export's generation config (None: transformers' defaults)."""
    export = run_dir / "export"
    source = str(export) if (export / "config.json").is_file() else (run_cfg.get("model") or {}).get("tokenizer")
    try:
        tok = load_tokenizer(source)
    except (OSError, ValueError) as err:
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise EvalInputError(f"eval.backend=openai encodes prompts with the run's tokenizer {source}: {msg}") from None
    has_config = (export / "generation_config.json").is_file()
    generation = GenerationConfig.from_pretrained(export) if has_config else None
    return ServedModel(ServedTask(run_cfg.get("task") or {}, run_cfg.get("seed"), tok), generation)


def evaluate_served(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """`eval.backend=openai`: check the run, the suites and the endpoint (it answers, serves `eval.model`, can
    decode as the suites' protocols do), then generate through it; the model is never loaded here."""
    run_dir = Path(cfg.run_dir)
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    try:
        ckpt = newest_intact_checkpoint(run_dir)[0] if not (run_dir / "results.json").is_file() else None
        run_cfg = saved_run_config(run_dir, ckpt)
        served = served_model(run_dir, run_cfg)
        template = cfg.eval.get("template") or run_template(run_cfg)
        family, task = (run_cfg.get("model") or {}).get("family"), (run_cfg.get("task") or {}).get("name")
        jobs = prepare(eval_cfg, template, family, served.task.tokenizer, run_task=task)
        client, engine = connect(eval_cfg)
        check_decoding({job.name: job.suite for job in jobs}, engine, client.where)
    except (EvalInputError, EvalConfigError, EvalDataError, EndpointError) as err:
        raise EvalInputError(str(err)) from err
    metrics = run_jobs(served, jobs, eval_cfg, run_dir)
    _print_metrics(metrics, run_dir)
    return metrics


def evaluate_run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Evaluate the run (`_evaluate`) and add the metrics to its results.json `eval`, when it has one (rank 0)."""
    metrics = _evaluate(cfg)
    if metrics and is_rank_zero():
        RunRecord.add_eval(cfg.run_dir, metrics)
    return metrics


def _evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Check the input, load the run's model, and evaluate it in Lightning's test stage (`eval.backend=openai`:
    generate through the endpoint instead, `evaluate_served`)."""
    import lightning as L

    run_dir = Path(cfg.run_dir)
    try:
        if not suite_names(cfg.eval):
            raise EvalInputError(f"no suite selected: pass eval=<suite> (one of {eval_groups()}) or eval.suites=[...]")
        if cfg.eval.get("backend") == "openai" and not cfg.eval.get("completions"):
            return evaluate_served(cfg)
        if not cfg.eval.get("completions"):
            ckpt, export = find_model(run_dir)
            run_cfg = saved_run_config(run_dir, ckpt)
            template = cfg.eval.get("template") or run_template(run_cfg)
            tok = template_tokenizer(template, _tokenizer_source(run_cfg, ckpt, export))
            family, task = (run_cfg.get("model") or {}).get("family"), (run_cfg.get("task") or {}).get("name")
            jobs = prepare(cfg.eval, template, family, tok, run_task=task)
    except (EvalInputError, EvalConfigError, EvalDataError) as err:
        raise EvalInputError(str(err)) from err
    if cfg.eval.get("completions"):
        return score_completions(cfg)
    module = load_module(run_cfg, ckpt, export)
    kwargs = {k: v for k, v in trainer_kwargs(cfg).items() if k in TRAINER_KEYS}
    trainer = L.Trainer(
        **kwargs,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    metrics = run_test_stage(trainer, module, jobs, OmegaConf.to_container(cfg.eval, resolve=True), run_dir)
    if trainer.is_global_zero:
        _print_metrics(metrics, run_dir)
    return metrics


def eval_groups() -> list[str]:
    """The `eval=<name>` options shipped in conf/eval/."""
    return sorted(p.stem for p in (Path(CONF_DIR) / "eval").glob("*.yaml"))
