"""The configs ship inside the package: composition (groups, inheritance, debug options, user search path), the
run/sweep directories, loggers and optimizer from `_target_` yamls, and a wheel that trains outside the repo."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from lightning_ralora.run.build import build_loggers, trainer_kwargs
from lightning_ralora.run.catalog import experiments_dir
from lightning_ralora.run.compose import CONF_DIR, compose_config
from lightning_ralora.run.identity import identity_record

REPO = Path(__file__).resolve().parents[1]

ADAPTERS_BEFORE = {  # conf/adapter/* as composed before the yamls inherited, resolved
    "dora": {
        "alpha": 16,
        "dropout": 0.0,
        "kind": "peft",
        "name": "dora",
        "peft": {"use_dora": True},
        "r": 8,
        "target_modules": None,
    },
    "full": {"kind": "full", "name": "full", "target_modules": None},
    "gralora": {
        "alpha": 64,
        "dropout": 0.0,
        "hybrid_r": 0,
        "k": 2,
        "kind": "gralora",
        "name": "gralora",
        "r": 32,
        "target_modules": None,
    },
    "hybrid_gralora": {
        "alpha": 32,
        "dropout": 0.0,
        "hybrid_r": 8,
        "k": 2,
        "kind": "gralora",
        "name": "hybrid_gralora",
        "r": 8,
        "target_modules": None,
    },
    "lora": {
        "alpha": 16,
        "dropout": 0.0,
        "kind": "lora",
        "lr_ratio_B": 1.0,
        "name": "lora",
        "r": 8,
        "rslora": False,
        "scale": None,
        "target_modules": None,
    },
    "lora_plus": {
        "alpha": 16,
        "dropout": 0.0,
        "kind": "lora",
        "lr_ratio_B": 16.0,
        "name": "lora_plus",
        "r": 8,
        "rslora": False,
        "scale": None,
        "target_modules": None,
    },
    "ls_lora": {
        "alpha": 16,
        "dropout": 0.0,
        "gid_batches": 8,
        "kind": "ralora",
        "lr_ratio_B": 1.0,
        "n_max": 1,
        "name": "ls_lora",
        "needs_gid": True,
        "r": 8,
        "r_max": 64,
        "r_min": 1,
        "r_ref": 8,
        "scale": "alpha/r_ref",
        "smoothing": "sqrt",
        "target_modules": None,
    },
    "peft_lora": {
        "alpha": 16,
        "dropout": 0.0,
        "kind": "peft",
        "name": "peft_lora",
        "peft": {},
        "r": 8,
        "target_modules": None,
    },
    "pissa": {
        "alpha": 8,
        "dropout": 0.0,
        "kind": "peft",
        "name": "pissa",
        "peft": {"init_lora_weights": "pissa"},
        "r": 8,
        "target_modules": None,
    },
    "ralora": {
        "alpha": 16,
        "dropout": 0.0,
        "gid_batches": 8,
        "kind": "ralora",
        "lr_ratio_B": 1.0,
        "n_max": 8,
        "name": "ralora",
        "needs_gid": True,
        "r": 8,
        "r_max": 64,
        "r_min": 1,
        "r_ref": 8,
        "scale": "alpha/r_ref",
        "smoothing": "sqrt",
        "target_modules": None,
    },
    "ralora_pro": {
        "alpha": 16,
        "dropout": 0.0,
        "gid_batches": 8,
        "kind": "ralora",
        "lr_ratio_B": 1.0,
        "n_max": 8,
        "name": "ralora_pro",
        "needs_gid": True,
        "r": 8,
        "r_max": 64,
        "r_min": 1,
        "r_ref": 8,
        "scale": "alpha/r_ref",
        "smoothing": "sqrt",
        "target_modules": None,
    },
    "rslora": {
        "alpha": 16,
        "dropout": 0.0,
        "kind": "lora",
        "lr_ratio_B": 1.0,
        "name": "rslora",
        "r": 8,
        "rslora": True,
        "scale": None,
        "target_modules": None,
    },
    "sds_lora": {
        "K": 5,
        "alpha": 4,
        "dropout": 0.0,
        "kind": "sds",
        "name": "sds_lora",
        "r": 8,
        "target_modules": None,
        "warmup_steps": 10,
    },
}


def test_conf_and_experiments_are_top_level_folders_installed_into_the_package() -> None:
    """The repository's conf/ and experiments/ are what an editable install reads (the wheel test checks the copy)."""
    assert Path(CONF_DIR) == REPO / "conf" and (REPO / "conf" / "config.yaml").is_file()
    assert not (REPO / "lightning_ralora" / "conf").exists()
    assert experiments_dir() == REPO / "experiments"
    toml = (REPO / "pyproject.toml").read_text()
    assert '"lightning_ralora.conf" = ["*.yaml", "**/*.yaml"]' in toml  # every yaml of every group ships


@pytest.mark.parametrize("name", sorted(ADAPTERS_BEFORE))
def test_adapter_yamls_keep_their_values(name: str) -> None:
    """Every adapter composes to the values it had before the yamls inherited from each other (keys added later
    are allowed; none removed or changed)."""
    composed = OmegaConf.to_container(compose_config([f"adapter={name}"]).adapter, resolve=True)
    assert {k: composed.get(k, "<missing>") for k in ADAPTERS_BEFORE[name]} == ADAPTERS_BEFORE[name]


def test_inheriting_adapters_follow_their_parent() -> None:
    """An override of the parent's key reaches the child (one place per value)."""
    for child, parent in [
        ("ralora_pro", "ralora"),
        ("ls_lora", "ralora"),
        ("dora", "peft_lora"),
        ("pissa", "peft_lora"),
    ]:
        text = (Path(CONF_DIR) / "adapter" / f"{child}.yaml").read_text()
        assert f"  - {parent}\n" in text, child


def test_run_and_sweep_directories() -> None:
    cfg = compose_config(["experiment=planted_compare", "adapter=ralora", "seed=2"], run_dir="x")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        full = compose(
            "config", overrides=["experiment=planted_compare", "adapter=ralora", "seed=2"], return_hydra_config=True
        )
    label = identity_record(cfg)["label"]  # <variant>-<model>-<task>-<hash of the identity keys>
    assert re.fullmatch(r"ralora-tiny_llama-planted-[0-9a-f]{8}", label)
    assert os.path.normpath(full.hydra.run.dir) == f"outputs/planted_compare/{label}/seed2"
    assert os.path.normpath(full.hydra.sweep.dir) == "multirun/planted_compare"
    assert full.hydra.sweep.subdir == f"{label}/seed2"
    assert full.hydra.job.chdir is False and cfg.run_dir == "x"


@pytest.mark.parametrize(
    ("overrides", "planted_shrunk"),
    [(["debug=fast"], True), (["debug=fast", "task=sft"], False), (["experiment=planted_compare", "debug=fast"], True)],
)
def test_debug_fast(overrides: list[str], planted_shrunk: bool) -> None:
    """debug=fast: 12 steps, CSV only, no bar, over any experiment; tiny data only on task=planted."""
    cfg = compose_config(overrides, run_dir="x")
    assert cfg.trainer.max_steps == 12 and cfg.trainer.enable_progress_bar is False
    assert list(cfg.logger) == ["csv"] and cfg.callbacks.checkpoint.every_n_train_steps == 6
    if planted_shrunk:
        assert (cfg.task.train_size, cfg.task.val_size, cfg.task.batch_size, cfg.task.seq_len) == (64, 16, 8, 16)
    else:
        assert "train_size" not in cfg.task and cfg.task.batch_size == 8
    assert compose_config([*overrides, "task.batch_size=4"]).task.batch_size == 4  # the command line still wins


@pytest.mark.parametrize(
    ("option", "trainer_args"),
    [
        ("overfit", {"overfit_batches": 1}),
        ("limit", {"limit_train_batches": 10, "limit_val_batches": 2}),
        ("profiler", {}),
    ],
)
def test_debug_options_build_a_trainer(tmp_path: Path, option: str, trainer_args: dict) -> None:
    cfg = compose_config([f"debug={option}"], run_dir=tmp_path)
    kwargs = trainer_kwargs(cfg)
    assert {k: kwargs[k] for k in trainer_args} == trainer_args
    trainer = L.Trainer(**kwargs, logger=False, enable_checkpointing=False)
    if option == "profiler":
        assert type(trainer.profiler).__name__ == "SimpleProfiler"


def test_loggers_from_target_yamls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """logger=default: CSV and W&B (offline without credentials, grouped by run_names); wandb.mode=disabled: CSV."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = build_loggers(compose_config(["seed=3"], run_dir=tmp_path))
    assert [type(lg) for lg in loggers] == [CSVLogger, WandbLogger]
    init = loggers[1]._wandb_init
    label = identity_record(compose_config(["seed=3"], run_dir=tmp_path))["label"]
    assert init["mode"] == "offline" and init["group"] == f"default/{label}" and init["resume"] == "allow"
    assert init["name"] == f"{label}-seed3" and "seed:3" in init["tags"] and len(init["id"]) == 16
    assert init["config"]["seed"] == 3 and isinstance(init["config"], dict)
    assert loggers[0].save_dir == str(tmp_path)
    only_csv = build_loggers(compose_config(["wandb.mode=disabled"], run_dir=tmp_path))
    assert [type(lg) for lg in only_csv] == [CSVLogger]


def test_optimizer_and_schedule_from_target_yamls(tmp_path: Path) -> None:
    """optim/adamw.yaml + optim/scheduler/cosine.yaml give what the former hard-coded AdamW + cosine gave, and a
    plain dict (no `_target_`, e.g. an old checkpoint's hyperparameters) still works."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from lightning_ralora.modules.adapter_module import AdapterModule

    cfg = compose_config(["debug=fast", "optim.lr=1e-2", "optim.weight_decay=0.1", "optim.min_lr_ratio=0.2"], tmp_path)

    class _T:
        estimated_stepping_batches = 40

    def lrs(optim_cfg) -> tuple[list[float], torch.optim.Optimizer]:
        module = AdapterModule(cfg.model, cfg.task, cfg.adapter, optim_cfg)
        module.configure_model()
        module._trainer = _T()
        out = module.configure_optimizers()
        opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
        seen = []
        for _ in range(40):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return seen, opt

    got, opt = lrs(OmegaConf.to_container(cfg.optim, resolve=True))
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.1
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    ref = get_cosine_with_min_lr_schedule_with_warmup(ref_opt, 2, 40, min_lr_rate=0.2)  # warm-up 0.05 x 40
    expected = []
    for _ in range(40):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert got == pytest.approx(expected)
    plain = {"lr": 1e-2, "weight_decay": 0.1, "warmup_ratio": 0.05, "min_lr_ratio": 0.2}
    assert lrs(plain)[0] == pytest.approx(expected)


@pytest.mark.slow
def test_user_config_directory_on_the_search_path(tmp_path: Path) -> None:
    """hydra.searchpath adds a directory of new options (an adapter inheriting from a packaged one, an experiment)."""
    conf = tmp_path / "my_conf"
    (conf / "adapter").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "adapter" / "my_lora.yaml").write_text("defaults:\n  - lora\n  - _self_\nname: my_lora\nr: 4\n")
    (conf / "experiment" / "my_exp.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /adapter: my_lora\nexperiment_name: my_exp\noptim:\n  lr: 1e-3\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "lightning_ralora.cli.train", f"hydra.searchpath=[file://{conf}]", "experiment=my_exp"]
        + ["--cfg", "job", "--resolve"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = OmegaConf.create(res.stdout[res.stdout.index("seed:") :])  # --cfg job prints the composed job config
    assert cfg.adapter.name == "my_lora" and cfg.adapter.r == 4 and cfg.adapter.alpha == 16  # alpha from lora.yaml
    assert cfg.experiment_name == "my_exp" and cfg.optim.lr == 1e-3


def _data_files(folder: Path) -> set[str]:
    """The yaml and markdown files below a folder, relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".yaml", ".md")}


@pytest.mark.slow
def test_wheel_outside_the_repo_runs_every_command(tmp_path: Path) -> None:
    """The wheel, installed into a plain directory and run from elsewhere: it carries every yaml and card of conf/ and
    experiments/, and its console scripts run the default job, compose an experiment (`--cfg job`), build a paper
    table from a rehearsal run and score a completions file."""
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", str(REPO), "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("lightning_ralora-*.whl")
    site = tmp_path / "site"
    inst = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], capture_output=True)
    assert inst.returncode == 0, inst.stderr[-3000:]
    for folder in ("conf", "experiments"):  # the same files as the repository's folders, none left behind
        assert _data_files(site / "lightning_ralora" / folder) == _data_files(REPO / folder)
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled"}

    def command(name: str, *args: str) -> subprocess.CompletedProcess:
        res = subprocess.run(
            [str(site / "bin" / name), *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900
        )
        assert res.returncode == 0, f"{name} {args}: {res.stderr[-3000:]}"
        return res

    where = subprocess.run(
        [sys.executable, "-c", "import lightning_ralora.run.compose as c; print(c.__file__); print(c.CONF_DIR)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    module_file, conf_dir = where.stdout.split()
    assert Path(module_file).is_relative_to(site) and Path(conf_dir) == site / "lightning_ralora" / "conf"

    # the default job, as the quick start runs it
    run = tmp_path / "run"
    res = command("lightning-ralora-train", f"hydra.run.dir={run}")
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["global_step"] == compose_config([], run_dir=run).trainer.max_steps
    assert f"results: {run / 'results.json'}" in res.stdout  # the end-of-run summary

    # an experiment of a paper table, composed from the installed experiments/ folder
    res = command("lightning-ralora-train", "experiment=ralora_glue_t5", "--cfg", "job")
    shown = OmegaConf.create(res.stdout)
    expected = compose_config(["experiment=ralora_glue_t5"], run_dir=run)
    for key in ("experiment_name", "adapter.name", "model.name", "task.name", "optim.lr", "trainer.max_epochs"):
        assert OmegaConf.select(shown, key) == OmegaConf.select(expected, key), key

    # a paper table from a rehearsal run of its experiment
    planted = tmp_path / "planted"
    command("lightning-ralora-train", "experiment=planted_compare", "debug=rehearsal", f"hydra.run.dir={planted}")
    command("lightning-ralora-tables", "--table", "planted_compare", "--out", str(tmp_path / "tables"), str(planted))
    with (tmp_path / "tables" / "planted_compare.csv").open() as f:
        rows = [row for row in csv.DictReader(f) if row["n_seeds"] == "1"]
    variant = json.loads((planted / "results.json").read_text())["variant"]
    assert {row["method"] for row in rows} == {variant} and {row["metric"] for row in rows} >= {"gap_closed", "kl"}

    # a completions file scored without a model (the rehearsal's GSM8K fixture: Tom has i apples and buys 2)
    data = tmp_path / "gsm8k.jsonl"
    questions = [{"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"#### {i + 2}"} for i in range(4)]
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = [2, 4, 4, 5]  # the 2nd is wrong (1 + 2 = 3)
    completions = tmp_path / "completions.jsonl"
    completions.write_text("".join(json.dumps({"completion": f"So.\nThe answer is: {a}"}) + "\n" for a in answers))
    scored = tmp_path / "scored"
    command("lightning-ralora-eval", f"run_dir={scored}", "eval=gsm8k", f"eval.data_files={data}",
            f"eval.completions={completions}")  # fmt: skip
    assert json.loads((scored / "eval.json").read_text()) == {"gsm8k": {"accuracy": 0.75, "n": 4}}
