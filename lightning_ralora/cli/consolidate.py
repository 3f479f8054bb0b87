"""Consolidate a sharded (FSDP2, distributed-checkpoint) Lightning checkpoint directory into one `.ckpt` file.

`python -m lightning_ralora.cli.consolidate CKPT_DIR OUT` writes a regular Lightning checkpoint: the tensors of every
shard (`state_dict`, `optimizer_<i>`) gathered by `dcp_to_torch_save`, plus the non-tensor state of `meta.pt`
(plan, callbacks' state, run identity), so `AdapterModule.from_checkpoint(OUT)` and single-process tools read it.
Runs in one process, without a process group.
"""

from __future__ import annotations

import argparse
import sys

from lightning_ralora.run.consolidate import ConsolidateInputError, consolidate

PROG = "lightning-ralora-consolidate"


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m lightning_ralora.cli.consolidate CKPT_DIR OUT`; a path it cannot use is one line on stderr and
    exit code 2, with nothing written."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir", help="sharded checkpoint directory (e.g. <run_dir>/checkpoints/last.ckpt)")
    parser.add_argument("out", help="the single-file checkpoint to write")
    args = parser.parse_args(argv)
    try:
        print(consolidate(args.ckpt_dir, args.out))
    except ConsolidateInputError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
