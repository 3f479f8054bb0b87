"""Consolidate a sharded (FSDP2, distributed-checkpoint) Lightning checkpoint directory into one `.ckpt` file.

`python -m lightning_ralora.cli.consolidate CKPT_DIR OUT` writes a regular Lightning checkpoint: the tensors of every
shard (`state_dict`, `optimizer_<i>`) gathered by `dcp_to_torch_save`, plus the non-tensor state of `meta.pt`
(plan, callbacks' state, run identity), so `AdapterModule.from_checkpoint(OUT)` and single-process tools read it.
Runs in one process, without a process group.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_ralora.core.io import atomic_write
from lightning_ralora.modules.adapter_module import checkpoint_metadata_file


def load_full_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """A checkpoint as one dict with full (unsharded) tensors, whether a single file or a sharded directory."""
    path = Path(ckpt_path)
    if not path.is_dir():
        return torch.load(path, map_location="cpu", weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tensors.pt"
        dcp_to_torch_save(path, out)
        tensors = torch.load(out, map_location="cpu", weights_only=True)
    meta = torch.load(checkpoint_metadata_file(path), map_location="cpu", weights_only=True)
    optimizers = [tensors.pop(k) for k in sorted((k for k in tensors if k.startswith("optimizer_")), key=_index)]
    return {**meta, **tensors, **({"optimizer_states": optimizers} if optimizers else {})}


def _index(key: str) -> int:
    return int(key.rsplit("_", 1)[1])


class ConsolidateInputError(ValueError):
    """A CKPT_DIR or OUT the consolidation cannot use (the message names the path and what is expected)."""


DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards


def check_paths(ckpt_dir: str | Path, out: str | Path) -> None:
    """Refuse, before reading any shard: a CKPT_DIR that is missing, a file, or a directory without the shards'
    index and Lightning's meta.pt; an OUT that is a directory or CKPT_DIR itself."""
    path = Path(ckpt_dir)
    if not path.exists():
        raise ConsolidateInputError(f"CKPT_DIR={ckpt_dir}: not found")
    if not path.is_dir():
        raise ConsolidateInputError(
            f"CKPT_DIR={ckpt_dir}: a file, not a sharded checkpoint directory (a single-file checkpoint needs no "
            "consolidation)"
        )
    missing = [name for name in (DCP_METADATA, "meta.pt") if not (path / name).is_file()]
    if missing:
        raise ConsolidateInputError(
            f"CKPT_DIR={ckpt_dir}: no {' and no '.join(missing)}; allowed: a sharded (FSDP2) checkpoint directory "
            "as Lightning writes it (e.g. <run_dir>/checkpoints/last.ckpt/)"
        )
    if Path(out).is_dir():
        raise ConsolidateInputError(f"OUT={out}: a directory; allowed: the path of the single .ckpt file to write")


def consolidate(ckpt_dir: str | Path, out: str | Path) -> Path:
    """Write the sharded checkpoint `ckpt_dir` as the single-file checkpoint `out` (atomically: `out` is either
    absent/its old content or the whole new file); returns `out`. ConsolidateInputError on a path it cannot use."""
    check_paths(ckpt_dir, out)
    state = load_full_checkpoint(ckpt_dir)
    return atomic_write(out, lambda f: torch.save(state, f))
