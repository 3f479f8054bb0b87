"""lightning-ralora-tables on hand-made run directories: seeds, duplicates, failed runs, missing cells, bad input."""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from lightning_ralora.cli.tables import main
from lightning_ralora.reporting.tables.build import build
from lightning_ralora.reporting.tables.model import Cell
from lightning_ralora.reporting.tables.render import CSV_HEADER, format_cell
from lightning_ralora.reporting.tables.runs import Notes, select_runs
from lightning_ralora.reporting.tables.spec import TABLES

# the commonsense suites (eval.commonsense keys) and the SDS table's column ids, written out from the paper's Table 1
SUITES = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
IDS = dict(zip(SUITES, ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"), strict=True))
GLUE = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")  # the GLUE average's eight tasks (no WNLI)


def write_run(
    root: Path,
    name: str,
    variant: str,
    seed: int,
    accuracies: dict[str, float],
    r: int | None = 8,
    experiment: str = "sds_commonsense_llama",
    mtime: float | None = None,
    **extra: Any,
) -> Path:
    """A run directory holding a results.json as train + eval write it (accuracies as fractions)."""
    run = root / name
    run.mkdir(parents=True)
    suite = {f"{s}/accuracy": a for s, a in accuracies.items()}
    suite["average"] = statistics.mean(accuracies.values())
    adapter = {"name": variant, "kind": "full"} if r is None else {"name": variant, "r": r}
    results = {
        "variant": variant,
        "model": "llama3_8b",
        "task": "sft",
        "seed": seed,
        "final_metrics": {"val/loss": 1.0},
        "eval": {"commonsense": {**suite, "n": 100}},
        "wall_time_s": 10.0,
        "global_step": 5,
        "config": {"experiment_name": experiment, "adapter": adapter, "task": {"dataset": "fw407/Commonsense-170K"}},
        **extra,
    }
    path = run / "results.json"
    path.write_text(json.dumps(results))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def accs(base: float) -> dict[str, float]:
    """Distinct accuracies per suite around `base`."""
    return {s: base + 0.01 * i for i, s in enumerate(SUITES)}


LORA = {0: accs(0.80), 1: accs(0.83), 2: accs(0.815)}
SDS = {0: accs(0.85), 1: accs(0.86)}  # seed 2 never ran; seed 1 has no openbookqa


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for seed, a in LORA.items():
        write_run(root, f"lora_s{seed}", "lora", seed, a, mtime=1_000_000 + seed)
    write_run(root, "lora_s1_old", "lora", 1, accs(0.10), mtime=900_000)  # older duplicate of seed 1: not counted
    write_run(root, "lora_s3_failed", "lora", 3, accs(0.0), status="failed")
    (root / "lora_s4_crashed").mkdir()
    (root / "lora_s4_crashed" / "results.json").write_text(json.dumps({"variant": "lora", "seed": 4}))
    write_run(root, "sds_s0", "sds_lora", 0, SDS[0])
    write_run(root, "sds_s1", "sds_lora", 1, {s: v for s, v in SDS[1].items() if s != "openbookqa"})
    return root


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> dict[tuple, tuple[float, float]]:
    """A stand-in lightning_ralora.reporting.published with a few cells."""
    values = {
        ("sds_commonsense", "llama3_8b", 8, "lora", "boolq"): (85.42, 0.1),
        ("sds_commonsense", "llama3_8b", 8, "sds_lora", "avg"): (85.42, 0.0),
        ("sds_commonsense", "llama3_8b", None, "full", "avg"): (86.44, 0.0),
    }
    fake = types.ModuleType("lightning_ralora.reporting.published")
    fake.published_cell = lambda table, model, rank, method, metric: values.get((table, model, rank, method, metric))
    monkeypatch.setitem(sys.modules, "lightning_ralora.reporting.published", fake)
    return values


def read_csv(path: Path) -> tuple[list[str], dict[tuple[str, str, str], dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = {(r["rank"], r["method"], r["metric"]): r for r in reader}
        return list(reader.fieldnames or []), rows


def test_sds_commonsense_means_stds_duplicates_and_missing(
    sweep: Path, tmp_path: Path, published: dict, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert main(["--table", "sds_commonsense", "--out", str(out), str(sweep)]) == 0
    err = capsys.readouterr().err
    assert "seed 1 of lora" in err and "appears twice" in err and "lora_s1_old" in err
    assert "lora_s3_failed" in err and "status 'failed'" in err
    assert "lora_s4_crashed" in err and "missing" in err

    header, rows = read_csv(out / "sds_commonsense.csv")
    assert tuple(header) == CSV_HEADER
    for suite in (*SUITES, "average"):
        vals = [100 * (statistics.mean(a.values()) if suite == "average" else a[suite]) for a in LORA.values()]
        row = rows[("8", "lora", IDS.get(suite, "avg"))]
        assert float(row["mean"]) == statistics.mean(vals)
        assert float(row["std"]) == statistics.stdev(vals)
        assert row["n_seeds"] == "3"  # duplicate counted once, failed and crashed runs left out
        assert row["model"] == "llama3_8b"
    sds_boolq = [100 * SDS[s]["boolq"] for s in (0, 1)]
    assert float(rows[("8", "sds_lora", "boolq")]["mean"]) == statistics.mean(sds_boolq)
    assert float(rows[("8", "sds_lora", "boolq")]["std"]) == statistics.stdev(sds_boolq)
    obqa = rows[("8", "sds_lora", "obqa")]
    assert (obqa["n_seeds"], obqa["std"], float(obqa["mean"])) == ("1", "", 100 * SDS[0]["openbookqa"])
    assert rows[("8", "lora", "boolq")]["published"] == "85.42"
    assert rows[("8", "lora", "piqa")]["published"] == ""
    assert not any(method == "full" for _, method, _ in rows)  # missing cells: no csv line

    md = (out / "sds_commonsense.md").read_text()
    lora_line = next(line for line in md.splitlines() if line.startswith("| llama3_8b | 8 | lora |"))
    boolq = [100 * a["boolq"] for a in LORA.values()]
    mean, std = statistics.mean(boolq), statistics.stdev(boolq)
    diff = mean - 85.42
    sign = "+" if diff > 0 else "−"
    assert f"| {mean:.2f} ± {std:.2f} (85.42, {sign}{abs(diff):.2f}) |" in lora_line
    full_line = next(line for line in md.splitlines() if line.startswith("| llama3_8b | — | full |"))
    assert full_line.count("| — |") + full_line.count("| — ") >= 8 and "— (86.44)" in full_line
    dora_line = next(line for line in md.splitlines() if line.startswith("| llama3_8b | 8 | dora |"))
    assert set(dora_line.strip("| ").split(" | ")[3:]) == {"—"}


def test_published_module_absent_means_no_published_values(
    sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "lightning_ralora.reporting.published", None)  # import raises ImportError
    out = tmp_path / "out"
    assert main(["--table", "sds_commonsense", "--out", str(out), str(sweep)]) == 0
    _, rows = read_csv(out / "sds_commonsense.csv")
    assert all(r["published"] == "" for r in rows.values())
    body = (out / "sds_commonsense.md").read_text().split("|---|", 1)[1]
    assert "(" not in body


def test_format_cell() -> None:
    cell = Cell(85.1, 0.214, 3)
    assert format_cell(cell, 85.42) == "85.10 ± 0.21 (85.42, −0.32)"
    assert format_cell(Cell(85.1, None, 1), 84.0) == "85.10 (84.00, +1.10)"
    assert format_cell(cell, None) == "85.10 ± 0.21"
    assert format_cell(None, None) == "—"


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unknown_table(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = _one_line_exit_2(["--table", "nope", "--out", str(tmp_path / "out"), str(sweep)], capsys)
    assert "unknown table 'nope'" in line and "sds_commonsense" in line and "planted_compare" in line
    assert not (tmp_path / "out").exists()


def test_directory_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_line_exit_2(["--table", "sds_commonsense", "--out", str(tmp_path / "out"), str(empty)], capsys)
    assert "no runs" in line
    assert not (tmp_path / "out").exists()


def test_mixed_experiments(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_run(sweep, "other", "lora", 0, accs(0.5), experiment="planted_compare")
    line = _one_line_exit_2(["--table", "sds_commonsense", "--out", str(tmp_path / "out"), str(sweep)], capsys)
    assert "several experiments" in line and "planted_compare" in line
    assert not (tmp_path / "out").exists()


def test_llama_and_gemma_blocks_combine(sweep: Path, tmp_path: Path) -> None:
    """The experiments one table lists (Table 1's LLaMA and Gemma rows) may be combined."""
    write_run(sweep, "gemma", "lora", 0, accs(0.5), experiment="sds_commonsense_gemma")
    assert main(["--table", "sds_commonsense", "--out", str(tmp_path / "out"), str(sweep)]) == 0


def test_glue_average_and_gralora_pivot(tmp_path: Path) -> None:
    """GLUE: one task per run, Avg of the task means when all eight exist; GraLoRA code: one column per rank."""
    root = tmp_path / "glue"
    for i, task in enumerate(GLUE):
        for seed in (0, 1):
            run = root / f"{task}_{seed}"
            run.mkdir(parents=True)
            cfg = {"experiment_name": "ralora_glue_t5", "adapter": {"r": 8}, "task": {"glue_task": task}}
            res = {"variant": "lora", "model": "t5_base", "seed": seed, "config": cfg}
            res["eval"] = {"glue": {"score": 0.5 + 0.01 * i + 0.001 * seed, "n": 10}}
            (run / "results.json").write_text(json.dumps(res))
    table = build(TABLES["ralora_glue"], [root])
    row = table.cells[("t5_base", 8, "lora")]
    assert row["average"].mean == statistics.mean(row[t].mean for t in GLUE)
    assert row["average"].std is None and row["average"].n == 2

    root = tmp_path / "code"
    for variant, r, h in (("lora", 16, 0), ("gralora", 32, 0), ("hybrid_gralora", 8, 8)):
        run = root / f"{variant}{r}"
        run.mkdir(parents=True)
        cfg = {"experiment_name": "gralora_code_llama", "adapter": {"r": r, "hybrid_r": h, "k": 2}}
        res = {"variant": variant, "model": "llama3_8b", "seed": 0, "config": cfg}
        res["eval"] = {"humaneval_plus": {"pass@1": 0.4, "n": 164}}
        (run / "results.json").write_text(json.dumps(res))
    md = build(TABLES["gralora_code"], [root]).markdown()
    assert "| model | method | r = 16 | r = 32 |" in md
    assert "| llama3_8b | hybrid_gralora | 40.00 | — |" in md  # hybrid rank = r + hybrid_r = 16


def test_hybrid_ratio_columns(tmp_path: Path) -> None:
    """The hybrid-ratio sweep files each run under its shared share: GraLoRA 0 %, hybrid_r = 8 of 16 at 50 %, plain
    LoRA at 100 % (the all-shared end), never under 0 %."""
    root = tmp_path / "mrpc"
    for variant, r, h, score in (("hybrid_gralora", 16, 0, 0.80), ("hybrid_gralora", 8, 8, 0.82), ("lora", 16, 0, 0.7)):
        run = root / f"{variant}{h}"
        run.mkdir(parents=True)
        cfg = {
            "experiment_name": "gralora_hybrid_ratio",
            "adapter": {"r": r, "hybrid_r": h},
            "task": {"glue_task": "mrpc"},
        }
        res = {
            "variant": variant,
            "model": "roberta_base",
            "seed": 0,
            "config": cfg,
            "eval": {"glue": {"score": score}},
        }
        (run / "results.json").write_text(json.dumps(res))
    cells = build(TABLES["gralora_hybrid_ratio"], [root]).cells
    assert cells[("roberta_base", 16, "hybrid_gralora")]["hybrid=0%"].mean == pytest.approx(80.0)
    assert cells[("roberta_base", 16, "hybrid_gralora")]["hybrid=50%"].mean == pytest.approx(82.0)
    assert set(cells[("roberta_base", 16, "lora")]) == {"hybrid=100%"}


def test_wandb_offline_upload(
    sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert main(["--table", "sds_commonsense", "--out", str(tmp_path / "out"), "--wandb", str(sweep)]) == 0
    runs = list(wandb_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert "W&B:" in capsys.readouterr().out


def test_sds_overhead_per_training_set_with_table6_beside(tmp_path: Path) -> None:
    """Time and memory overhead of SDS-LoRA over LoRA per training set, from fit_time_s / global_step and
    peak_memory_bytes; Table 6's values (model and rank unstated) printed beside."""
    root = tmp_path / "runs"
    times = {("lora", 0): 10.0, ("lora", 1): 12.0, ("sds_lora", 0): 11.0, ("sds_lora", 1): 12.2}
    for (variant, seed), fit in times.items():
        run = root / f"{variant}{seed}"
        run.mkdir(parents=True)
        cfg = {"experiment_name": "sds_math_llama", "adapter": {"r": 8}, "task": {"dataset": "meta-math/MetaMathQA"}}
        memory = 2**30 * (4.0 if variant == "lora" else 4.1)
        res = {"variant": variant, "model": "llama3_8b", "seed": seed, "config": cfg, "fit_time_s": fit}
        res |= {"global_step": 100, "wall_time_s": 99.0, "peak_memory_bytes": memory}
        (run / "results.json").write_text(json.dumps(res))
    table = build(TABLES["sds_overhead"], [root])
    sds = table.cells[("llama3_8b", 8, "sds_lora")]
    expected = 100 * (statistics.mean([0.11, 0.122]) / statistics.mean([0.10, 0.12]) - 1)
    assert sds["metamathqa_time_overhead_pct"].mean == pytest.approx(expected)
    assert sds["metamathqa_memory_overhead_pct"].mean == pytest.approx(2.5)
    assert table.pub(("llama3_8b", 8, "sds_lora"), "metamathqa_time_overhead_pct") == 4.35
    assert "(4.35, " in table.markdown() and "(0.48, " in table.markdown()


def test_a_cell_mixing_configs_is_warned(tmp_path: Path) -> None:
    """Two identities (e.g. two learning rates) in one cell: a warning names both hashes."""
    root = tmp_path / "runs"
    for seed, digest in ((0, "aaaa1111"), (1, "bbbb2222")):
        write_run(root, f"lora{seed}", "lora", seed, accs(0.8), identity={"hash": digest})
    notes = Notes()
    select_runs(TABLES["sds_commonsense"], sorted(root.rglob("results.json")), notes)
    assert any("mixes runs of 2 configs" in n and "aaaa1111" in n and "bbbb2222" in n for n in notes), list(notes)


def test_gid_table_from_lightning_ralora_gid_profiles(tmp_path: Path) -> None:
    """`lightning-ralora-gid experiment=ralora_gsm8k_llama debug=rehearsal adapter=ralora` (no training): its
    gid_profile.json is a run of the ralora_gid table, the mean erank of its layers under the training set."""
    from lightning_ralora.reporting.gid_profile import profile_gid
    from tests.conftest import make_cfg

    for seed in (0, 1):
        run = tmp_path / "gid" / f"seed{seed}"
        cfg = make_cfg(run, ["experiment=ralora_gsm8k_llama", "debug=rehearsal", "adapter=ralora", f"seed={seed}"])
        profile_gid(cfg)
    profiles = [json.loads(p.read_text()) for p in sorted((tmp_path / "gid").rglob("gid_profile.json"))]
    table = build(TABLES["ralora_gid"], [tmp_path / "gid"])
    cell = table.cells[("llama31_8b", 8, "ralora")]["gid_metamathqa"]
    means = [statistics.mean(layer["erank"] for layer in p["layers"].values()) for p in profiles]
    assert cell.n == 2 and cell.mean == pytest.approx(statistics.mean(means))
