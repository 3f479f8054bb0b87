"""`debug=rehearsal`: every experiment shrinks to a tiny model of its family with fixture data in the real formats,
trains a few CPU steps, evaluates a few examples, and `lightning-ralora-tables` fills its cells (one method, 2 seeds
per experiment; every method of the SDS commonsense table; MT-Bench scored by a local stub judge)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_ralora.cli.tables import main as tables_main
from lightning_ralora.reporting.tables.render import MISSING
from lightning_ralora.reporting.tables.spec import TABLES
from lightning_ralora.run.catalog import sweep_configs
from lightning_ralora.run.job import train
from tests.conftest import make_cfg
from tests.helpers import serve_judge

EXPERIMENTS = sorted(sweep_configs())
GLUE = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")  # one run per GLUE task (no WNLI)
SDS_IMAGE = ("cars", "cub200", "dtd", "food101", "sun397")  # the SDS-LoRA vision table's data sets
SEEDS = (0, 1)

# experiment -> (the method rehearsed, {table id: the metric ids the experiment fills in that table})
PLAN: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "claims": ("ralora", {"claims": ("gap:block",)}),
    "claims_oracle": ("ralora", {"claims_oracle": ("gap:block", "n:block")}),
    "gralora_code_llama": ("gralora", {"gralora_code": ("pass@1",)}),
    "gralora_hybrid_ratio": ("hybrid_gralora", {"gralora_hybrid_ratio": ("hybrid=50%",)}),
    "gralora_k_sweep": ("gralora", {"gralora_k_sweep": ("k=4",)}),
    "planted_compare": ("ralora", {"planted_compare": ("gap_closed", "kl")}),
    "ralora_chat_llama": ("lora", {"ralora_nlg": ("mt_bench",)}),
    "ralora_code_llama": ("ralora_pro", {"ralora_nlg": ("humaneval",), "ralora_gid": ("gid_code_feedback",)}),
    "ralora_glue_t5": ("ralora", {"ralora_glue": ("sst2",)}),
    "ralora_image_clip": ("ralora", {"ralora_image": ("cars",)}),
    "ralora_gsm8k_llama": ("ralora", {"ralora_nlg": ("gsm8k",), "ralora_gid": ("gid_metamathqa",)}),
    "ralora_rank_ablation": ("ls_lora", {"ralora_rank_ablation": ("gsm8k",)}),
    "ralora_rank_ablation_code": ("ls_lora", {"ralora_rank_ablation": ("humaneval",)}),
    "sds_code_gemma": ("dora", {"sds_nlg": ("humaneval",)}),
    "sds_code_llama": ("lora_plus", {"sds_nlg": ("humaneval",)}),
    "sds_commonsense_gemma": ("sds_lora", {"sds_commonsense": tuple(m.id for m in TABLES["sds_commonsense"].metrics)}),
    "sds_commonsense_llama": ("full", {"sds_commonsense": tuple(m.id for m in TABLES["sds_commonsense"].metrics)}),
    "sds_image_vit": ("sds_lora", {"sds_image": ("cars",)}),
    "sds_math_gemma": ("pissa", {"sds_nlg": ("gsm8k", "math")}),
    "sds_math_llama": (
        "rslora",
        {"sds_nlg": ("gsm8k", "math"), "sds_overhead": ("metamathqa_s_per_step", "metamathqa_peak_memory_gib")},
    ),
}


@pytest.fixture(scope="module")
def judge_url() -> Iterator[str]:
    """The base URL of a local stub judge (rates every answer [[5]]), served for the module's tests."""
    with serve_judge() as server:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"


def rehearse(runs: Path, experiment: str | None, method: str, seed: int, judge_url: str, *extra: str) -> Path:
    """Train + evaluate one rehearsal run (in-process) below `runs`; its run directory."""
    run_dir = runs / f"{method}_seed{seed}"
    overrides = [*([f"experiment={experiment}"] if experiment else []), "debug=rehearsal", f"adapter={method}"]
    if experiment and "eval.allow_code_execution=true" in sweep_configs()[experiment].read_text():
        overrides.append("eval.allow_code_execution=true")  # as the experiment's own command (the real run needs it)
    overrides += [f"seed={seed}", f"eval.judge.base_url={judge_url}", "eval.judge.model=judge-model", *extra]
    overrides += ["wandb.mode=disabled"]
    train(make_cfg(run_dir, overrides, fast=False))
    assert json.loads((run_dir / "results.json").read_text()).get("status", "completed") == "completed"
    return run_dir


def table_cells(table: str, runs: Path, out: Path) -> dict[tuple[str, str], dict[str, str]]:
    """Build `table` from `runs` with the CLI's main; {(method, metric): csv row}."""
    assert tables_main(["--table", table, "--out", str(out), str(runs)]) == 0
    with (out / f"{table}.csv").open() as f:
        return {(row["method"], row["metric"]): row for row in csv.DictReader(f)}


def assert_filled(cells: dict[tuple[str, str], dict[str, str]], method: str, metrics: tuple[str, ...]) -> None:
    """Each metric of the method's row has a mean, a std and 2 seeds."""
    for metric in metrics:
        row = cells.get((method, metric))
        assert row is not None, f"{method}/{metric} missing; cells: {sorted(cells)}"
        assert row["mean"] not in ("", MISSING) and row["n_seeds"] == str(len(SEEDS)), row
        if metric not in ("avg", "average"):  # derived cells carry no std
            assert row["std"] not in ("", MISSING), row


def test_every_experiment_has_a_rehearsal_plan_and_composes(tmp_path: Path) -> None:
    """Each experiment (and the default job) composes with debug=rehearsal to a tiny config-built model on CPU."""
    assert sorted(PLAN) == EXPERIMENTS, "add new experiments to PLAN (and debug/rehearsal.yaml's lookup tables)"
    for experiment in [*EXPERIMENTS, None]:
        overrides = ["debug=rehearsal", *([f"experiment={experiment}"] if experiment else [])]
        cfg = make_cfg(tmp_path / str(experiment), overrides, fast=False)
        model = OmegaConf.to_container(cfg.model, resolve=True)
        assert model["pretrained"] is None and model["config"]["model_type"], experiment
        assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_steps <= 8, experiment
        if experiment:
            for table, metrics in PLAN[experiment][1].items():
                assert table in TABLES and metrics, (experiment, table)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_rehearse_experiment(experiment: str, tmp_path: Path, judge_url: str, one_thread: None) -> None:
    """One method of the experiment's table, 2 seeds: its cells of the experiment's table(s) are filled."""
    method, tables = PLAN[experiment]
    runs = tmp_path / "runs"
    for seed in SEEDS:
        rehearse(runs, experiment, method, seed, judge_url)
    for table, metrics in tables.items():
        assert_filled(table_cells(table, runs, tmp_path / "tables"), method, metrics)


@pytest.mark.slow
def test_rehearse_image_second_model_and_set(tmp_path: Path, judge_url: str, one_thread: None) -> None:
    """sds_image_vit with model=vit_large image_set=dtd: Table 9's ViT-L DTD settings, the vit_large row's dtd cell."""
    cfg = make_cfg(tmp_path / "cfg", ["experiment=sds_image_vit", "model=vit_large", "image_set=dtd"], fast=False)
    assert (cfg.optim.lr, cfg.trainer.max_epochs, cfg.task.num_labels) == (1e-3, 7, 47)
    runs = tmp_path / "runs"
    for seed in SEEDS:
        rehearse(runs, "sds_image_vit", "lora", seed, judge_url, "model=vit_large", "image_set=dtd")
    cells = table_cells("sds_image", runs, tmp_path / "tables")
    assert_filled(cells, "lora", ("dtd",))
    assert {row["model"] for row in cells.values()} == {"vit_large"}


@pytest.mark.slow
def test_rehearse_nlg_columns_from_two_experiments(tmp_path: Path, judge_url: str, one_thread: None) -> None:
    """sds_nlg combines the math and code experiments: one lora row with GSM8K, MATH and HumanEval filled."""
    runs = tmp_path / "runs"
    for experiment in ("sds_math_llama", "sds_code_llama"):
        for seed in SEEDS:
            rehearse(runs / experiment, experiment, "lora", seed, judge_url)
    assert_filled(table_cells("sds_nlg", runs, tmp_path / "tables"), "lora", ("gsm8k", "math", "humaneval"))


def sweep(experiment: str) -> list[list[str]]:
    """The experiment's whole sweep at one rank and one seed: every method of its `methods:` table (planted_compare:
    its table's rows) times the axis that makes the table's columns (GLUE task, image set, k, hybrid share)."""
    cfg = make_cfg(Path("/tmp/unused"), [f"experiment={experiment}"], fast=False)
    methods = [m for m, v in cfg.methods.items() if v is not None] or list(TABLES["planted_compare"].methods)
    axis: dict[str, list[str]] = {
        "ralora_glue_t5": [f"task.glue_task={t}" for t in GLUE],
        "sds_image_vit": [f"image_set={d}" for d in SDS_IMAGE],
        "ralora_image_clip": [f"image_set={d}" for d in SDS_IMAGE],
    }.get(experiment, [""])
    per_method: dict[str, list[str]] = {
        "gralora_hybrid_ratio": {"hybrid_gralora": [f"adapter.hybrid_r={h}" for h in (0, 4, 8, 12)]},
        "gralora_k_sweep": {"gralora": [f"adapter.k={k}" for k in (1, 2, 4, 8)]},
        "gralora_code_llama": {"lora": ["adapter.r=16"], "gralora": ["adapter.r=16"]},
    }.get(experiment, {})
    return [[f"adapter={m}", *filter(None, [a, b])] for m in methods for a in axis for b in per_method.get(m, [""])]


# table -> the columns a whole sweep fills beyond the default run's (PLAN): every GLUE task / image set, the derived
# Avg; for sds_overhead SDS-LoRA's overhead over LoRA (its row only)
SWEEP_COLUMNS: dict[str, tuple[str, ...]] = {
    "ralora_glue": (*GLUE, "average"),
    "sds_image": (*SDS_IMAGE, "average"),
    "ralora_image": (*SDS_IMAGE, "average"),
    "gralora_hybrid_ratio": ("hybrid=0%", "hybrid=25%", "hybrid=50%", "hybrid=75%"),
    "gralora_k_sweep": ("k=1", "k=2", "k=4", "k=8"),
}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_rehearse_whole_sweep_fills_every_cell(
    experiment: str, tmp_path: Path, judge_url: str, one_thread: None
) -> None:
    """Every method × column of the experiment's sweep (seed 0): every row it ran has every cell the experiment
    fills, no "—" (ralora_gid: the planned variants' rows; the hybrid-ratio LoRA row: its 100 % column)."""
    runs = tmp_path / "runs"
    jobs = sweep(experiment)
    for i, overrides in enumerate(jobs):
        rehearse(runs / str(i), experiment, overrides[0].removeprefix("adapter="), 0, judge_url, *overrides[1:])
    for table, metrics in PLAN[experiment][1].items():
        cells = table_cells(table, runs, tmp_path / "tables")
        methods = {method for method, _ in cells}
        assert methods, table
        if table not in ("ralora_gid", "claims_oracle"):  # GID: planned variants only; oracle: rows per structure
            assert methods == {o[0].removeprefix("adapter=") for o in jobs}, (table, methods)
        for method in methods:
            if table == "claims_oracle" and method != "ralora":
                continue  # fixed structures are rows of their own (gralora_k2, ...), the derived oracle rows too
            expected = SWEEP_COLUMNS.get(table, metrics)
            if table == "sds_overhead" and method == "sds_lora":
                expected = (*metrics, "metamathqa_time_overhead_pct", "metamathqa_memory_overhead_pct")
            if table == "gralora_hybrid_ratio" and method == "lora":
                expected = ("hybrid=100%",)
            if table == "ralora_gid":
                expected = tuple(m for (meth, m) in cells if meth == method)[:1] or metrics
            missing = [m for m in expected if (method, m) not in cells]
            assert not missing, f"{table}: {method} has no {missing}; cells {sorted(cells)}"
