"""`lightning-ralora-tables --table ID --out DIR RUN_OR_SWEEP_DIR...`: a paper table from finished runs.

Every `results.json` below the given directories is one run. Runs are grouped by (model, rank, method):
`model`, `config.adapter.r` (+ `config.adapter.hybrid_r`, the total rank of Hybrid GraLoRA; empty for full
fine-tuning) and `variant`. The table's spec (its folder's table.yaml, `TABLES`) says where its metrics come from;
each cell is the mean ± the sample standard deviation (n − 1) over distinct seeds, accuracies in percent. Writes
`DIR/<ID>.md` (rows = methods in model/rank blocks, the published value and the difference beside each cell) and
`DIR/<ID>.csv` (columns `CSV_HEADER`; one line per measured cell: missing cells are "—" in the markdown and have no
csv line). `--wandb` also logs the table to the runs' W&B project (offline without credentials).

Runs left out, with a warning on stderr: results.json unreadable or missing a required key, a `status` other than
`completed`, no metric of the table. A seed seen twice in one group (a re-run or requeue) counts once: the run whose
results.json is newest. Bad input (unknown table, a directory without runs, runs of several experiments) is one
line each on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_ralora.reporting.tables.build import TableInputError, build
from lightning_ralora.reporting.tables.render import upload_wandb, write
from lightning_ralora.reporting.tables.runs import PROG, warn
from lightning_ralora.reporting.tables.spec import TABLES


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (console script `lightning-ralora-tables`)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, help=f"table id: {', '.join(TABLES)}")
    parser.add_argument("--out", default=".", help="where <ID>.md and <ID>.csv go (default: .)")
    parser.add_argument("--wandb", action="store_true", help="also log the table to the runs' W&B project")
    parser.add_argument("dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="directories searched for results.json")
    args = parser.parse_args(argv)
    spec = TABLES.get(args.table)
    if spec is None:
        print(f"{PROG}: unknown table {args.table!r}; allowed: {', '.join(TABLES)}", file=sys.stderr)
        sys.exit(2)
    try:
        table = build(spec, args.dirs)
    except TableInputError as e:
        for p in e.problems:
            print(f"{PROG}: {p}", file=sys.stderr)
        sys.exit(2)
    for note in table.warnings:
        warn(note)
    md, csv_path = write(table, Path(args.out))
    print(table.markdown())
    print(f"wrote {md} and {csv_path}")
    if args.wandb:
        print(f"W&B: {upload_wandb(table, Path(args.out))}")
    return 0


if __name__ == "__main__":
    main()
