"""`lightning-ralora-compare RUN_DIR... [--out DIR]`: loss and alignment curves side by side, and a final-metrics table.

Each run directory holds the `results.json` written by `lightning-ralora-train` (keys used: variant, seed,
final_metrics, trainable_params, total_params, wall_time_s; the GradientAlignment summary when present) and the
CSVLogger's `**/metrics.csv` (columns `step`, `train/loss`, `align/mean/cos_f`, ... with gaps). Writes
`comparison.png` and `comparison.md` to --out and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_ralora.reporting.compare import load_runs, markdown_table, plot


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (console script `lightning-ralora-compare`)."""
    parser = argparse.ArgumentParser(prog="lightning-ralora-compare", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding results.json")
    parser.add_argument("--out", default=".", help="where comparison.png and comparison.md go (default: .)")
    parser.add_argument("--loss-key", default="train/loss", help="loss column of metrics.csv (default: train/loss)")
    parser.add_argument("--align-key", default="align/mean/cos_f", help="alignment column (default: align/mean/cos_f)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.run_dirs)
    except FileNotFoundError as e:
        parser.error(str(e))
    for run in runs:
        if not run.curves:
            print(
                f"lightning-ralora-compare: note: no metrics.csv under {run.path}; no curves for {run.label}",
                file=sys.stderr,
            )
    out = Path(args.out)
    table = markdown_table(runs, args.align_key)
    png = plot(runs, out / "comparison.png", args.loss_key, args.align_key)
    md = out / "comparison.md"
    md.write_text(f"# Comparison\n\n![curves]({png.name})\n\n{table}")
    print(table)
    print(f"wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    main()
