"""The evaluation runner: data rows -> examples (the run's prompt template) -> each rank generates and scores its
shard -> rank 0 gathers every record and writes RUN/eval.json, RUN/eval/<suite>.jsonl, results.json["eval"] and W&B.

Two steps so that bad input fails before any model is loaded or anything is written: `prepare` (suites, rows,
examples, the code-execution gate; `attach_completions` for `eval.completions`) and `run_jobs` (generation, or the
replay of a completions file, and outputs). Multi-process runs go through
Lightning's test stage (`run_test_stage`): `AdapterModule.on_test_epoch_end` calls back into `run_jobs` on every
rank, inside the strategy's process group.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_ralora.adapters.schema import is_number, is_pos_int
from lightning_ralora.core.errors import ConfigError
from lightning_ralora.core.signals import check_stop
from lightning_ralora.data.tokenizer import load_tokenizer
from lightning_ralora.evaluation.base import (
    CLASSIFICATION_CHECKS,
    CLASSIFICATION_SUITES,
    SUITES,
    EvalConfigError,
    EvalDataError,
    GenerationSuite,
    SuiteJob,
    plain_cfg,
    read_rows,
    suite_file,
)
from lightning_ralora.evaluation.generate import ReplayGenerate, make_generate
from lightning_ralora.evaluation.lm_eval_backend import evaluate_with_lm_eval
from lightning_ralora.evaluation.outputs import TABLE_ROWS, log_wandb, write_outputs
from lightning_ralora.evaluation.serving import endpoint_generate, served_cfg_problem
from lightning_ralora.tasks import TASKS


def load_suite_modules(plugins: Sequence[str] = ()) -> None:
    """Import the package's suites (`lightning_ralora.evaluation`) and any `eval.plugins` modules that register more."""
    importlib.import_module("lightning_ralora.evaluation")
    for name in plugins or ():
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise EvalConfigError(f"eval.plugins: cannot import {name!r} ({err})") from None


def suite_names(eval_cfg: Mapping[str, Any] | None) -> list[str]:
    """The suites an `eval` config asks for: `eval.suites`, else the group's `name` (none: [])."""
    cfg = plain_cfg(eval_cfg)
    names = cfg.get("suites")
    if names is None:
        names = [cfg["name"]] if cfg.get("name") not in (None, "none") else []
    return [names] if isinstance(names, str) else [str(n) for n in names]


def eval_requested(cfg: Mapping[str, Any]) -> bool:
    """Whether a run config lists evaluation suites (`eval=gsm8k`, `eval.suites=[...]`)."""
    return bool(suite_names(cfg.get("eval")))


def _hub_rows(suite: GenerationSuite, name: str) -> list[dict[str, Any]]:
    if suite.hub is None:
        raise EvalDataError(f"eval={name} has no hub dataset; give a local file with eval.data_files=FILE")
    try:
        import datasets

        configs = getattr(suite, "hub_configs", ()) or (suite.hub.name,)  # MATH: one config per subject
        rows = []
        for config in configs:
            rows += [dict(r) for r in datasets.load_dataset(suite.hub.path, config, split=suite.hub.split)]
    except Exception as err:  # noqa: BLE001 - offline, unknown dataset, ...: one line naming the source
        where = f"{suite.hub.path}" + (f"/{suite.hub.name}" if suite.hub.name else "") + f" (split {suite.hub.split})"
        msg = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise EvalDataError(
            f"eval={name}: could not load {where} from the hub ({msg}); or pass eval.data_files"
        ) from None
    return rows


def build_suite(cls: type[GenerationSuite], cfg: Mapping[str, Any], tokenizer: Any = None) -> GenerationSuite:
    """The suite with its options from the `eval` config: every constructor parameter found in `cfg` (HumanEval's
    `mode`, `samples`, ...; commonsense's `subsets`), `eval_cfg` (the whole config) and `tokenizer` if it takes them."""
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: cfg[k] for k in params if k not in ("self", "eval_cfg", "tokenizer") and cfg.get(k) is not None}
    if "eval_cfg" in params:
        kwargs["eval_cfg"] = cfg
    if "tokenizer" in params:
        kwargs["tokenizer"] = tokenizer
    try:
        suite = cls(**kwargs)
    except ValueError as err:
        raise EvalConfigError(f"eval={cls.name}: {err}") from None
    suite.tokenizer = tokenizer
    return suite


def check_eval_values(cfg: Mapping[str, Any]) -> None:
    """The `eval` keys the suites read, when set: batch_size, max_samples, max_new_tokens, num_beams and samples
    positive integers, temperature a number >= 0, top_p in (0, 1] (null: the suite's protocol)."""
    counts = {
        "batch_size": "8 per call",
        "max_samples": "every example",
        "max_new_tokens": "the suite's own",
        "num_beams": "the suite's protocol",
        "samples": "1, greedy",
    }
    for key, means in counts.items():
        if cfg.get(key) is not None and not is_pos_int(cfg[key]):
            raise EvalConfigError(f"eval.{key} must be a positive integer or null ({means}), got {cfg[key]!r}")
    t, p = cfg.get("temperature"), cfg.get("top_p")
    if t is not None and not (is_number(t) and t >= 0):
        raise EvalConfigError(f"eval.temperature must be a number >= 0 or null (the suite's default), got {t!r}")
    if p is not None and not (is_number(p) and 0 < p <= 1):
        raise EvalConfigError(f"eval.top_p must be a number in (0, 1] or null (the suite's default), got {p!r}")


CLASSIFICATION_FAMILIES = {"glue": ("seq_classification",), "image": ("image_classification", "clip_vision")}


def check_run_tokenizer(names: Sequence[str], backend: str, run_task: str | None) -> None:
    """Generation suites (and the lm_eval backend) decode with the run's tokenizer, which only tasks that load
    `model.tokenizer` have: refuse the others (task=planted) before any model loads."""
    task_cls = TASKS.get(run_task) if run_task else None
    generating = [n for n in names if backend == "lm_eval" or n in SUITES]
    if task_cls is None or task_cls.loads_tokenizer or not generating:
        return
    loaders = sorted(n for n, t in TASKS.items() if t.loads_tokenizer)
    raise EvalConfigError(
        f"eval={generating[0]} generates text with the run's tokenizer (model.tokenizer), but task={run_task} loads "
        f"none; allowed: a run of task {' or '.join(loaders)} (model.tokenizer: bytes, a hub name or a local path)"
    )


def prepare(
    eval_cfg: Mapping[str, Any],
    template: str | None = None,
    family: str | None = "causal_lm",
    tokenizer: Any = None,
    run_task: str | None = None,
) -> list[SuiteJob]:
    """Resolve the suites, load and check their rows (every file in full; none may be empty), build the examples
    with the prompt `template`, and refuse code-executing suites unless `eval.allow_code_execution=true` and
    generation on a run whose task (`run_task`) loads no tokenizer. Raises EvalConfigError / EvalDataError."""
    cfg = plain_cfg(eval_cfg)
    load_suite_modules(cfg.get("plugins") or ())
    names = suite_names(cfg)
    backend = cfg.get("backend") or "builtin"
    if backend not in ("builtin", "lm_eval", "openai"):
        raise EvalConfigError(f"eval.backend={backend!r} is unknown; allowed: builtin, lm_eval, openai")
    check_eval_values(cfg)
    if backend == "openai" and (problem := served_cfg_problem(cfg, names)):  # a serving engine generates
        raise EvalConfigError(problem)
    check_run_tokenizer(names, backend, run_task)
    if backend == "lm_eval":  # the harness loads its own data; names may be any lm-eval task
        if "humaneval" in names and not cfg.get("allow_code_execution"):
            raise EvalConfigError("eval=humaneval executes model-generated code; set eval.allow_code_execution=true")
        return [SuiteJob(n) for n in names]
    allowed = sorted({*SUITES, *CLASSIFICATION_SUITES})
    unknown = [n for n in names if n not in SUITES and n not in CLASSIFICATION_SUITES]
    if unknown:
        raise EvalConfigError(f"eval.suites: {', '.join(map(repr, unknown))} is unknown; allowed: {allowed}")
    for n in names:
        if n in SUITES and getattr(SUITES[n], "needs_code_execution", False) and not cfg.get("allow_code_execution"):
            raise EvalConfigError(
                f"eval={n} executes model-generated code; set eval.allow_code_execution=true to allow it "
                "(only in a sandbox you trust)"
            )
        if n in SUITES and family not in (None, "causal_lm"):
            raise EvalConfigError(f"eval={n} generates text and needs a causal LM; this run's model.family={family}")
        fits = CLASSIFICATION_FAMILIES.get(n)
        if fits and family is not None and family not in fits:
            raise EvalConfigError(
                f"eval={n} scores a classifier's logits; this run's model.family={family}, allowed: {list(fits)}"
            )
    jobs = []
    for n in names:
        if n in CLASSIFICATION_SUITES:
            if n in CLASSIFICATION_CHECKS:
                CLASSIFICATION_CHECKS[n](cfg)
            jobs.append(SuiteJob(n, classify=CLASSIFICATION_SUITES[n]))
            continue
        suite = build_suite(SUITES[n], cfg, tokenizer)
        path = suite_file(cfg, n, len(names))
        if path:  # a suite with several files (commonsense: a folder or {subset: file}) reads them itself
            rows = suite.load_rows(path) if hasattr(suite, "load_rows") else read_rows(path)
            source = f"eval.data_files={path}"
        else:
            rows, source = _hub_rows(suite, n), f"eval={n} hub data"
        if not rows:  # scored, it would report accuracy 0.0 over nothing
            raise EvalDataError(
                f"{source}: no data rows for eval={n} (an empty file); a row needs {list(suite.required_keys)}"
            )
        suite.check_rows(rows, source)
        if cfg.get("max_samples"):
            rows = rows[: int(cfg["max_samples"])]
        try:
            examples = suite.examples(rows, template)
        except EvalDataError:
            raise
        except ValueError as err:  # e.g. template=chat without a tokenizer that has a chat template
            raise EvalConfigError(f"eval={n}: {err}") from None
        if not examples:
            raise EvalDataError(f"{source}: no examples for eval={n} (no row of the selected subsets)")
        jobs.append(SuiteJob(n, suite=suite, examples=examples))
    return jobs


# ------------------------------------------------------------------------------------------------------------------
# ranks
# ------------------------------------------------------------------------------------------------------------------
def _dist() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """This rank's example indices: a disjoint stride, no padding (ranks may differ by one example)."""
    return list(range(rank, n, world_size))


def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's records on every rank, ordered by example `index` (each example exactly once)."""
    rank, world = _dist()
    if world > 1:
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: r["index"])


# ------------------------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------------------------
def _model_and_tokenizer(module_or_model: Any, tokenizer: Any) -> tuple[torch.nn.Module, Any]:
    model = getattr(module_or_model, "backbone", module_or_model)
    tok = tokenizer if tokenizer is not None else getattr(getattr(module_or_model, "task", None), "tokenizer", None)
    if tok is None:
        raise EvalConfigError("evaluation of a plain model needs its tokenizer (evaluate(..., tokenizer=...))")
    return model, tok


def generation_settings(module_or_model: Any, eval_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """How the run encoded its prompts and seeds sampling: `task.add_special_tokens` of the module's task config
    (the run config; absent: true, the default) unless `eval.add_special_tokens` is set, and the run's seed."""
    task = getattr(module_or_model, "task", None)
    task_cfg = getattr(task, "cfg", None) or {}
    special = eval_cfg.get("add_special_tokens")
    special = task_cfg.get("add_special_tokens", True) if special is None else special
    return {"add_special_tokens": bool(special), "seed": getattr(task, "seed", None)}


def stoppable(generate: Callable[..., list[str]], suite: str) -> Callable[..., list[str]]:
    """`generate` that first checks for a stop signal (cluster.check_stop): an evaluation ends at a batch boundary,
    nothing written (a resume evaluates again)."""

    def call(*args: Any, **kwargs: Any) -> list[str]:
        check_stop(f"eval ({suite})")
        return generate(*args, **kwargs)

    return call


def run_jobs(
    module_or_model: Any,
    jobs: Sequence[SuiteJob],
    eval_cfg: Mapping[str, Any],
    run_dir: str | Path | None,
    tokenizer: Any = None,
) -> dict[str, dict[str, float]]:
    """Run prepared suites on this rank's shard, gather on every rank, and (rank 0) write the outputs.
    Returns {suite: {metric: value, "n": count}} on every rank."""
    cfg = plain_cfg(eval_cfg)
    rank, world = _dist()
    metrics: dict[str, dict[str, float]] = {}
    records_by_suite: dict[str, list[dict[str, Any]]] = {}
    if cfg.get("backend") == "lm_eval":
        metrics = _lm_eval_on_rank0(module_or_model, [job.name for job in jobs], cfg, tokenizer)
        jobs = []
    for job in jobs:
        if job.classify is not None:  # scored on logits by the suite itself (every rank runs it: FSDP forwards)
            m, records = job.classify(module_or_model, cfg)
            metrics[job.name] = {**m, "n": m.get("n", len(records))}
            records_by_suite[job.name] = records
            continue
        mine = shard_indices(len(job.examples), rank, world)
        if job.completions is not None:  # eval.completions: the file's texts instead of a model's
            generate: Callable[..., list[str]] = ReplayGenerate(
                [job.examples[i].prompt for i in mine], [job.completions[i] for i in mine]
            )
        elif cfg.get("backend") == "openai":  # a serving engine generates (evaluation/serving.py)
            generate = endpoint_generate(module_or_model, tokenizer, cfg, **generation_settings(module_or_model, cfg))
        else:
            model, tok = _model_and_tokenizer(module_or_model, tokenizer)
            generate = make_generate(
                model,
                tok,
                int(cfg.get("batch_size") or 8),
                max_new_tokens_cap=cfg.get("max_new_tokens") or None,
                **generation_settings(module_or_model, cfg),
            )
        # an empty shard still runs: under FSDP its generate calls keep the ranks' collectives in step
        records = job.suite.run(stoppable(generate, job.name), [job.examples[i] for i in mine])
        records = gather_records([{"index": i, **r} for i, r in zip(mine, records, strict=True)])
        metrics[job.name] = {**job.suite.aggregate(records), "n": len(records)}
        records_by_suite[job.name] = records
    if rank == 0 and run_dir is not None:
        write_outputs(Path(run_dir), metrics, records_by_suite)
        log_wandb(metrics, records_by_suite, int(cfg.get("table_rows") or TABLE_ROWS))
    return metrics


def _lm_eval_on_rank0(
    module_or_model: Any, names: list[str], cfg: Mapping[str, Any], tokenizer: Any
) -> dict[str, dict[str, float]]:
    """`eval.backend=lm_eval`: lm-evaluation-harness scores the merged model on rank 0; every rank gets the result."""
    rank, world = _dist()
    result: list[Any] = [None]
    if rank == 0:
        merged = module_or_model.merged_backbone() if hasattr(module_or_model, "merged_backbone") else module_or_model
        tok = tokenizer or getattr(getattr(module_or_model, "task", None), "tokenizer", None)
        result[0] = evaluate_with_lm_eval(merged.eval(), tok, names, cfg)
    if world > 1:
        torch.distributed.broadcast_object_list(result, src=0)
    return result[0]


def evaluate(
    module_or_model: Any,
    eval_cfg: Mapping[str, Any],
    run_dir: str | Path | None,
    template: str | None = None,
    tokenizer: Any = None,
) -> dict[str, dict[str, float]]:
    """Prepare and run the suites of `eval_cfg` in this process (its rank's shard when torch.distributed is up).
    `template` defaults to `eval_cfg.template`."""
    cfg = plain_cfg(eval_cfg)
    jobs = prepare(cfg, template if template is not None else cfg.get("template"))
    return run_jobs(module_or_model, jobs, cfg, run_dir, tokenizer)


def run_test_stage(
    trainer: Any, module: Any, jobs: Sequence[SuiteJob], eval_cfg: Mapping[str, Any], run_dir: str | Path
) -> dict[str, dict[str, float]]:
    """Run the prepared suites inside `trainer.test` (one dummy batch per rank; the generation happens in
    `AdapterModule.on_test_epoch_end`), so every rank of the trainer's strategy generates its shard."""
    import warnings

    from torch.utils.data import DataLoader

    out: dict[str, Any] = {}

    def hook(m: Any) -> None:
        out["metrics"] = run_jobs(m, jobs, eval_cfg, run_dir)

    module.eval_hook = hook
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|DistributedSampler).*")
            trainer.test(module, dataloaders=DataLoader([torch.zeros(1)], batch_size=1), verbose=False)
    finally:
        del module.eval_hook
    return out.get("metrics", {})


def run_template(run_cfg: Mapping[str, Any]) -> str | None:
    """The prompt template of a run config: `eval.template` if set, else the `task.template` it trained with."""
    cfg = plain_cfg(run_cfg)
    return (cfg.get("eval") or {}).get("template") or (cfg.get("task") or {}).get("template")


def prepare_training_eval(cfg: Mapping[str, Any]) -> list[SuiteJob]:
    """The suites a training config lists (none: []), prepared before training; problems become a ConfigError."""
    if not eval_requested(cfg):
        return []
    if (cfg.get("eval") or {}).get("backend") == "openai":
        raise ConfigError(
            [
                "eval.backend=openai scores a served model, not one being trained: train with export=true, serve "
                "RUN/export, then lightning-ralora-eval run_dir=RUN eval=SUITE eval.backend=openai eval.base_url=URL "
                "eval.model=NAME (docs/serving.md)"
            ]
        )
    if (cfg.get("eval") or {}).get("completions"):
        raise ConfigError(
            [
                "eval.completions scores a file without a model: use lightning-ralora-eval run_dir=DIR eval=SUITE "
                "eval.completions=FILE, not a training run"
            ]
        )
    template = run_template(cfg)
    model, task = cfg.get("model") or {}, (cfg.get("task") or {}).get("name")
    try:
        tok = template_tokenizer(template, model.get("tokenizer"))
        return prepare(cfg["eval"], template, model.get("family"), tok, run_task=task)
    except (EvalConfigError, EvalDataError) as err:
        raise ConfigError([str(err)]) from None


def template_tokenizer(template: str | None, tokenizer: str | None) -> Any:
    """The tokenizer the prompts are rendered with when `template=chat` (its chat template, as the run's task
    loads it: `model.tokenizer`); None for the other templates, which need none."""
    if template != "chat":
        return None
    try:
        return load_tokenizer(tokenizer)
    except (OSError, ValueError) as err:
        msg = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise EvalConfigError(
            f"template=chat renders prompts with the tokenizer model.tokenizer={tokenizer!r}: cannot load it ({msg})"
        ) from None
