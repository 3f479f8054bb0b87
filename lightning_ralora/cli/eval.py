"""`lightning-ralora-eval run_dir=RUN eval=gsm8k [eval.data_files=FILE] [eval.max_new_tokens=N] [trainer=ddp ...]`

Evaluates a finished (or interrupted) training run: the package's Hydra configs (CONF_DIR) composed with the
overrides give the `eval` and `trainer` sections; the model comes from RUN/checkpoints/last.ckpt (adapter-only
checkpoints of hub backbones included), else RUN/export; the prompt template is the run's `task.template`.
The evaluation runs in Lightning's test stage with the configured strategy: `trainer=ddp trainer.devices=2`
starts 2 processes and each generates its shard. Outputs: RUN/eval.json, RUN/eval/<suite>.jsonl and
results.json["eval"]. Bad input is one line on stderr and exit code 2, with nothing written.

`eval.completions=FILE` scores existing completions without a model: FILE is JSONL (or .jsonl.gz), one line per
example in the suite's order ({"completion": ...}, {"completions": [...]} for n samples, {"turns": [a1, a2]} or
FastChat's {"question_id", "choices": [{"turns": [...]}]} for MT-Bench), matched by `task_id` / `id` /
`question_id` instead when the lines carry one. RUN needs no checkpoint and is created if missing; its saved config
(results.json or the checkpoint), when there is one, gives the prompt template.

`eval.backend=openai eval.base_url=URL eval.model=NAME` has a serving engine generate the completions (vLLM, SGLang,
`transformers serve` serving RUN/export, the merged model `export=true` writes): the model is not loaded here, the
run's tokenizer and template shape the prompts; `eval.concurrency` requests in flight, the key (if any) from the
variable `eval.api_key_env` names. The endpoint is checked first (it answers and serves NAME). Recipes, SLURM
included: docs/serving.md.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from omegaconf import DictConfig

from lightning_ralora.core.errors import ConfigError
from lightning_ralora.core.signals import Interrupted, install_stop_handlers
from lightning_ralora.run.compose import compose_config
from lightning_ralora.run.evaluate import EvalInputError, eval_groups, evaluate_run
from lightning_ralora.run.rundir import claim

PROG = "lightning-ralora-eval"


def _fail(message: str) -> NoReturn:
    """One line on stderr (a multi-line message joined) and exit code 2."""
    print(f"{PROG}: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def compose_eval_config(argv: Sequence[str]) -> DictConfig:
    """The package config composed with the command-line overrides; `run_dir=RUN` is required."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")]
    if not run_dirs or not run_dirs[-1]:
        raise EvalInputError("run_dir=RUN is required (a training run directory with checkpoints/last.ckpt)")
    for a in argv:
        if a.startswith("eval=") and a.split("=", 1)[1] not in eval_groups():
            raise EvalInputError(f"eval={a.split('=', 1)[1]} is unknown; allowed: {eval_groups()}")
    try:
        return compose_config([a for a in argv if not a.startswith("run_dir=")], run_dir=run_dirs[-1])
    except (HydraException, OmegaConfBaseException) as err:
        raise EvalInputError(" ".join(str(err).split())) from None


def main(argv: Sequence[str] | None = None) -> None:
    """`lightning-ralora-eval run_dir=RUN eval=<suite> [overrides]`: evaluate a training run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + f"\n\neval groups: {eval_groups()}")
        return
    try:
        cfg = compose_eval_config(argv)
        if not cfg.eval.get("completions") and not Path(cfg.run_dir).is_dir():  # scoring a file may make a new one
            raise EvalInputError(f"run_dir={cfg.run_dir}: directory not found")
    except EvalInputError as err:
        _fail(str(err))
    install_stop_handlers()
    try:
        # one writer per run dir: not while its training (or another eval) runs; a new dir (scoring a file) is
        # created only once the input has been checked
        with claim(cfg.run_dir) if Path(cfg.run_dir).is_dir() else contextlib.nullcontext():
            evaluate_run(cfg)
    except EvalInputError as err:
        _fail(str(err))
    except ConfigError as err:
        _fail(str(err).removeprefix("invalid config: "))
    except Interrupted as stop:  # a signal: stopped at a generation batch; eval.json untouched
        print(f"lightning-ralora-eval: stopped by {stop}; eval.json unchanged", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    main()
