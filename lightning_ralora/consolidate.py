"""Consolidate a sharded (FSDP2, distributed-checkpoint) Lightning checkpoint directory into one `.ckpt` file.

`python -m lightning_ralora.consolidate CKPT_DIR OUT` writes a regular Lightning checkpoint: the tensors of every
shard (`state_dict`, `optimizer_<i>`) gathered by `dcp_to_torch_save`, plus the non-tensor state of `meta.pt`
(plan, callbacks' state, run identity), so `AdapterModule.from_checkpoint(OUT)` and single-process tools read it.
Runs in one process, without a process group.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from .modules.adapter_module import checkpoint_metadata_file


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


def consolidate(ckpt_dir: str | Path, out: str | Path) -> Path:
    """Write the sharded checkpoint `ckpt_dir` as the single-file checkpoint `out`; returns `out`."""
    if not Path(ckpt_dir).is_dir():
        raise NotADirectoryError(f"CKPT_DIR={ckpt_dir} is not a sharded (distributed) checkpoint directory")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(load_full_checkpoint(ckpt_dir), out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m lightning_ralora.consolidate CKPT_DIR OUT`."""
    parser = argparse.ArgumentParser(prog="lightning-ralora-consolidate", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir", help="sharded checkpoint directory (e.g. <run_dir>/checkpoints/last.ckpt)")
    parser.add_argument("out", help="the single-file checkpoint to write")
    args = parser.parse_args(argv)
    print(consolidate(args.ckpt_dir, args.out))


if __name__ == "__main__":
    main()
