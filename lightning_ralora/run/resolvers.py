"""OmegaConf resolvers the experiment configs use (registered when lightning_ralora.run.compose is imported).

- `${mul:2,${adapter.r}}`: the product of the arguments (GraLoRA's alpha = 2r).
- `${add:${adapter.r},${adapter.hybrid_r}}`: the sum of the arguments.
- `${sub:16,${adapter.hybrid_r}}`: the first argument minus the others (GraLoRA's hybrid-ratio sweep).
- `${gralora_k:${adapter.r}}`: GraLoRA's grid size by rank (paper recipe, docs/maths.md §5): 2 for r <= 32, 4 above.
- `${image_dataset:cars,path}`: a field (path, split, num_labels, ...) of a named vision data set
  (evaluation/image.py IMAGE_DATASETS, the one table of hub copies the experiments and `eval=image` share).
- `${run_identity:}`: `<variant>-<model>-<task>-<hash of the identity keys>` (identity.py; run dirs, W&B names).
- `${rehearsal_data:${run_dir},gsm8k}`: a `debug=rehearsal` fixture file, written on first use (rehearsal.py).
"""

from __future__ import annotations

import math

from omegaconf import OmegaConf

from lightning_ralora.evaluation.image import IMAGE_DATASETS
from lightning_ralora.run.identity import run_label_resolver
from lightning_ralora.run.rehearsal import rehearsal_data


def mul(*xs: int | float) -> int | float:
    """Product of the arguments."""
    return math.prod(xs)


def add(*xs: int | float) -> int | float:
    """Sum of the arguments."""
    return sum(xs)


def sub(first: int | float, *rest: int | float) -> int | float:
    """The first argument minus the others."""
    return first - sum(rest)


def gralora_k(r: int) -> int:
    """GraLoRA paper recipe: k = 2 for r in {16, 32}, k = 4 for r in {64, 128} (2 up to 32, 4 above)."""
    return 2 if int(r) <= 32 else 4


def image_dataset(name: str, field: str) -> str | int | None:
    """A field of IMAGE_DATASETS[name] (cars, cub200, dtd, food101, sun397); one error naming the allowed keys."""
    key = str(name).lower()
    if key not in IMAGE_DATASETS:
        raise ValueError(f"image_set={name!r} unknown; allowed: {sorted(IMAGE_DATASETS)} (or set task.dataset)")
    return getattr(IMAGE_DATASETS[key], field)


RESOLVERS = {
    "mul": mul,
    "add": add,
    "sub": sub,
    "gralora_k": gralora_k,
    "image_dataset": image_dataset,
    "rehearsal_data": rehearsal_data,
    "run_identity": run_label_resolver,
}


def register_resolvers() -> None:
    """Register every resolver above once (re-importing or reloading the package is harmless)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
