"""lightning-ralora-compare on generated run directories (results.json + CSVLogger-style metrics.csv)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lightning_ralora.cli.compare import main
from lightning_ralora.reporting.compare import load_runs, read_curves


def _run_dir(root: Path, variant: str, seed: int, loss0: float, cos: float | None, version: int = 0) -> Path:
    d = root / f"{variant}-seed{seed}"
    vdir = d / "csv" / f"version_{version}"
    vdir.mkdir(parents=True)
    cols = ["step", "train/loss", "align/mean/cos_f", "align/layers.0.q/cos_f", "epoch"]
    with (vdir / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for step in range(0, 20):
            w.writerow([step, loss0 / (1 + step), "", "", 0])  # loss rows leave the alignment columns empty
            if cos is not None and (step + 1) % 5 == 0:
                w.writerow([step, "", cos + 0.001 * step, cos, 0])  # alignment rows leave the loss empty
    results = {
        "variant": variant,
        "seed": seed,
        "final_metrics": {"val/loss": loss0 / 20, "val/acc": 0.5 + 0.1 * seed, "align/layers.0.q/cos_f": 0.3},
        "trainable_params": 1000,
        "total_params": 100000,
        "wall_time_s": 12.5,
    }
    (d / "results.json").write_text(json.dumps(results))
    return d


def test_compare_writes_plot_and_table(tmp_path: Path, capsys) -> None:
    runs = [
        _run_dir(tmp_path, "lora", 0, 2.0, 0.4),
        _run_dir(tmp_path, "lora", 1, 2.2, 0.45),
        _run_dir(tmp_path, "sds_lora", 0, 1.8, 0.7),
        _run_dir(tmp_path, "full", 0, 1.5, None),
    ]
    out = tmp_path / "cmp"
    assert main([str(r) for r in runs] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    png, md = out / "comparison.png", out / "comparison.md"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = md.read_text()
    assert "comparison.png" in text
    for label in ("lora s0", "lora s1", "sds_lora s0", "full s0"):
        assert f"| {label} |" in text and f"| {label} |" in printed
    assert "val/acc" in text and "align/layers.0.q/cos_f" not in text  # per-layer keys stay out
    assert "## Mean ± std over seeds" in text and "| lora | 2 |" in text
    sds_row = next(line for line in text.splitlines() if line.startswith("| sds_lora s0 |"))
    assert sds_row.rstrip(" |").endswith("0.7115")  # mean of 0.7 + 0.001·step over steps 4, 9, 14, 19
    full_row = next(line for line in text.splitlines() if line.startswith("| full s0 |"))
    assert full_row.rstrip(" |").endswith("–")  # no alignment logged


def test_curves_skip_gaps_and_later_versions_win(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, "lora", 0, 2.0, 0.4, version=2)
    v10 = d / "csv" / "version_10"
    v10.mkdir()
    (v10 / "metrics.csv").write_text("step,train/loss\n19,0.001\n25,nan\n")
    curves = read_curves(d)
    assert [s for s, _ in curves["align/mean/cos_f"]] == [4, 9, 14, 19]
    loss = dict(curves["train/loss"])
    assert len(loss) == 20 and loss[19] == 0.001  # version_10 (resumed) overrides version_2, NaN dropped
    assert "epoch" not in curves


def test_alignment_summary_in_results_is_preferred(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, "lora", 0, 2.0, 0.4)
    res = json.loads((d / "results.json").read_text())
    res["callbacks"] = {"GradientAlignment": {"metrics": {"align/mean/cos_f": {"mean": 0.123, "last": 0.1}}}}
    (d / "results.json").write_text(json.dumps(res))
    (run,) = load_runs([d])
    from lightning_ralora.reporting.compare import markdown_table

    assert markdown_table([run]).splitlines()[4].rstrip(" |").endswith("0.123")


def test_missing_results_json_is_a_clear_error(tmp_path: Path, capsys) -> None:
    good = _run_dir(tmp_path, "lora", 0, 2.0, 0.4)
    bad = tmp_path / "unfinished"
    (bad / "csv").mkdir(parents=True)
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exc:
        main([str(good), str(bad), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(bad / "results.json") in err and "not found" in err
    assert not out.exists()  # nothing half-written


def test_missing_keys_are_named(tmp_path: Path, capsys) -> None:
    d = _run_dir(tmp_path, "lora", 0, 2.0, 0.4)
    res = json.loads((d / "results.json").read_text())
    del res["wall_time_s"], res["seed"]
    (d / "results.json").write_text(json.dumps(res))
    with pytest.raises(SystemExit):
        main([str(d), "--out", str(tmp_path / "cmp")])
    assert "missing key(s) ['seed', 'wall_time_s']" in capsys.readouterr().err


def test_run_without_csv_still_compares(tmp_path: Path, capsys) -> None:
    d = tmp_path / "nocsv"
    d.mkdir()
    res = {
        "variant": "lora",
        "seed": 0,
        "final_metrics": {},
        "trainable_params": 1,
        "total_params": 2,
        "wall_time_s": 1,
    }
    (d / "results.json").write_text(json.dumps(res))
    assert main([str(d), "--out", str(tmp_path / "cmp")]) == 0
    captured = capsys.readouterr()
    assert "no metrics.csv" in captured.err and "| lora s0 |" in captured.out
