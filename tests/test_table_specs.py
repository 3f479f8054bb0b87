"""The paper-table folders: every table's columns are produced by the experiments that fill it, composed as the
README runs them (no debug overlay), and `debug=rehearsal` changes only scale and location.

The first property derives, for every table, the suites its column sources read (`[eval, <suite>, <metric>]` in its
table.yaml) and checks that the union of its experiments' composed `eval.suites` contains each one; the second
composes every experiment (with each method of its `methods:` table) with and without `debug=rehearsal` and fails on
any changed key outside the scale/location allowlist below."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from lightning_ralora.reporting.published import published_cell
from lightning_ralora.reporting.tables.spec import TABLES
from lightning_ralora.run.catalog import sweep_configs, table_docs
from lightning_ralora.run.methods import apply_method_settings
from tests.conftest import make_cfg

EXPERIMENTS = sorted(sweep_configs())

# what debug=rehearsal may change (full-match regexes over dotted keys): scale and location only
REHEARSAL_MAY_CHANGE = {
    r"model\..*": "model size, weights, dtype and its tokenizer (a tiny model of the family, built from a config)",
    r"trainer\..*": "steps, epochs, accumulation, intervals, devices, precision, accelerator",
    r"logger\..*": "loggers (CSV only)",
    r"callbacks\.checkpoint\.every_n_train_steps": "checkpoint interval",
    r"rehearsal\..*": "the rehearsal's own lookup tables",
    r"overrides(\.\d+)?": "the command line itself (it has debug=rehearsal)",
    r"task\.(dataset|dataset_config|data_files|data_dir|train_split|val_split|val_fraction)": "data source",
    r"task\.(max_samples|batch_size|train_size|val_size|seq_len|num_labels|image_size)": "data scale (fixtures)",
    r"eval\.(max_samples|max_new_tokens|batch_size|data_files(\..*)?|data_dir|split)": "eval scale and data",
    r"eval\.judge\.reference_answers": "eval data (MT-Bench reference answers fixture)",
}
# keys that no overlay may touch, whatever the allowlist says (the protocol)
PROTOCOL = re.compile(
    r"(adapter|optim|methods)(\..*)?|eval\.(suites|template|extract|num_beams|samples|temperature|top_p|k|mode)(\..*)?"
    r"|task\.(template|prompt_key|response_key|add_special_tokens)"
)


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value} of a plain container."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    if isinstance(node, list) and any(isinstance(v, dict | list) for v in node):
        out = {}
        for i, v in enumerate(node):
            out.update(flat(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): node}


def composed(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """The config train() runs for these overrides: composed as the CLI does, the methods table applied, resolved."""
    cfg = apply_method_settings(make_cfg(run_dir, overrides, fast=False))
    return OmegaConf.to_container(cfg, resolve=True)


def methods_of(experiment: str, tmp_path: Path) -> list[str]:
    """The rows of the experiment's `methods:` table (the adapters it runs), else its default adapter."""
    cfg = make_cfg(tmp_path / "m", [f"experiment={experiment}"], fast=False)
    return [m for m, v in (cfg.get("methods") or {}).items() if v is not None] or [cfg.adapter.name]


def suites_of(experiment: str, tmp_path: Path) -> set[str]:
    """The suites the experiment's real run evaluates (the README's command: no debug overlay)."""
    method = methods_of(experiment, tmp_path)[0]
    cfg = composed(tmp_path / experiment, [f"experiment={experiment}", f"adapter={method}"])
    return set(cfg["eval"]["suites"] or [])


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_table_column_is_produced_by_its_experiments(table: str, tmp_path: Path) -> None:
    """Each `[eval, suite, ...]` source of the table is in the composed suites of one of the table's experiments."""
    spec = TABLES[table]
    assert spec.experiments, f"{table}: no experiment fills it"
    for name in spec.experiments:
        assert name in sweep_configs(), f"{table}: experiment {name} has no sweep config"
    produced = set().union(*(suites_of(e, tmp_path) for e in spec.experiments)) if spec.experiments else set()
    needed = {src[1] for src in spec.sources if src[0] == "eval"}
    assert needed <= produced, f"{table}: reads {sorted(needed)}, its experiments evaluate {sorted(produced)}"


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_published_column_has_a_source(table: str) -> None:
    """A published cell of the table names a column the table builds, or one its table.yaml lists as `not_measured`
    with the reason (a dynamic table's columns come from the runs)."""
    spec = TABLES[table]
    _, doc = table_docs()[table]
    cells = (doc.get("published") or {}).get("cells", [])
    published = {c["metric"] for c in cells} - set(doc.get("not_measured") or {})
    ours = {spec.published_ids.get(m.id, m.id) for m in spec.metrics}
    if spec.dynamic is None:
        assert published <= ours, f"{table}: published columns {sorted(published - ours)} have no column"
    for cell in cells[:3]:
        assert published_cell(table, cell["model"], cell["rank"], cell["method"], cell["metric"])[0] == cell["mean"]


def test_the_rank_ablation_has_both_columns(tmp_path: Path) -> None:
    """The RaLoRA rank ablation prints GSM8K and HumanEval: one experiment produces each."""
    assert suites_of("ralora_rank_ablation", tmp_path) == {"gsm8k"}
    assert suites_of("ralora_rank_ablation_code", tmp_path) == {"humaneval"}
    rows = set(methods_of("ralora_rank_ablation", tmp_path))
    assert set(methods_of("ralora_rank_ablation_code", tmp_path)) == rows == {"lora", "ls_lora", "ralora", "ralora_pro"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_rehearsal_changes_only_scale_and_location(experiment: str, tmp_path: Path) -> None:
    """With and without debug=rehearsal, for every method of the experiment: only allowlisted keys differ."""
    for method in methods_of(experiment, tmp_path):
        base = [f"experiment={experiment}", f"adapter={method}"]
        real = flat(composed(tmp_path / method, base))
        shrunk = flat(composed(tmp_path / method, [*base, "debug=rehearsal"]))
        changed = sorted(k for k in real.keys() | shrunk.keys() if real.get(k, "<absent>") != shrunk.get(k, "<absent>"))
        protocol = [k for k in changed if PROTOCOL.fullmatch(k)]
        assert not protocol, f"{experiment}/{method}: the rehearsal changes protocol keys {protocol}"
        other = [k for k in changed if not any(re.fullmatch(p, k) for p in REHEARSAL_MAY_CHANGE)]
        shown = [(k, real.get(k), shrunk.get(k)) for k in other]
        assert not other, f"{experiment}/{method}: the rehearsal changes {shown}"
        assert shrunk["trainer.accelerator"] == "cpu" and shrunk["model.pretrained"] is None


def test_the_allowlist_can_fail(tmp_path: Path) -> None:
    """The diff sees a protocol change: an overlay that swaps the suites or the template is caught."""
    base = ["experiment=sds_math_llama", "adapter=lora"]
    real = flat(composed(tmp_path, base))
    changed = flat(composed(tmp_path, [*base, "eval.suites=[gsm8k]", "task.template=alpaca", "eval.num_beams=2"]))
    diff = {k for k in real.keys() | changed.keys() if real.get(k) != changed.get(k)} - {"overrides"}
    assert {k for k in diff if PROTOCOL.fullmatch(k)} >= {"task.template", "eval.num_beams"}
    assert any(k.startswith("eval.suites") for k in diff)


CARD_FIELDS = ("Training data", "Evaluation", "Metric", "Reference")


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_table_has_a_protocol_card_listed_in_the_index(table: str) -> None:
    """Each table folder holds protocol.md with the protocol's fields, and docs/protocols.md links it."""
    folder = table_docs()[table][0]
    card = (folder / "protocol.md").read_text()
    planted = "planted" in card  # our CPU test beds have a task, not training data
    for name in CARD_FIELDS:
        assert f"| {name}" in card or (planted and name == "Training data"), f"{table}: card lacks {name}"
    index = (Path(__file__).resolve().parents[1] / "docs" / "protocols.md").read_text()
    rel = folder.relative_to(folder.parents[1])
    assert f"experiments/{rel.as_posix()}/protocol.md" in index, f"docs/protocols.md does not link {table}'s card"
