"""The published-number yamls hold every cell of the paper tables (re-parsed here from tests/fixtures/paper_tables)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_ralora.reporting.published import PAPERS, load_published, published_cell, published_tables

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "paper_tables"
COLOR = "\\cellcolororange!25"
CELL = re.compile(r"^(\d+\.\d\d) ?(\d+\.\d\d)?$")  # the seed copies run mean and std together: 96.000.57
MODEL = {"Gemma-2B": "gemma_2b", "LLaMA3-8B": "llama3_8b", "ViT-Base": "vit_base", "ViT-Large": "vit_large"}
METHOD = {
    "Full FT.": "full",
    "LoRA": "lora",
    "rsLoRA": "rslora",
    "LoRA+": "lora_plus",
    "PiSSA": "pissa",
    "DoRA": "dora",
    "SDS-LoRA": "sds_lora",
    "LoRA-GA": "lora_ga",
    "LoRA-Pro": "lora_pro",
    "rsLoRA + ScaledAdamW": "rslora_scaled_adamw",
    "AltLoRA": "altlora",
    "MoRA": "mora",
    "RSLoRA": "rslora",
    "LS-LoRA": "ls_lora",
    "RaLoRA": "ralora",
    "RaLoRA-Pro": "ralora_pro",
    "FFT": "full",
}
NLG = [(m, k) for m in ("gemma_2b", "llama3_8b") for k in ("math", "gsm8k", "humaneval")]
Key = tuple[str, int | None, str, str]
Cells = dict[Key, tuple[float, float | None]]


def fixture_lines(name: str) -> list[str]:
    """A fixture's table lines, after its citation header."""
    lines = (FIXTURES / name).read_text().splitlines()
    assert lines[0].startswith("# Source: ") and re.search(r"[Tt]able|claims", lines[0]), name
    return lines[1:]


def split_row(line: str) -> tuple[list[str], list[tuple[float, float | None]]]:
    """Label tokens and (mean, std) value tokens of a '|' row."""
    tokens = [t.replace(COLOR, "").strip() for t in line.split("|")]
    tokens = [t for t in tokens if t]
    values: list[tuple[float, float | None]] = []
    while tokens and (m := CELL.match(tokens[-1])):
        values.insert(0, (float(m.group(1)), float(m.group(2)) if m.group(2) else None))
        tokens.pop()
    return tokens, values


def parse_grid(
    name: str,
    columns: list[tuple[str | None, str]],
    model: str | None = None,
    rank: int | None = None,
    methods: list[str] | None = None,
    fixed_rank: int | None = None,
) -> Cells:
    """Parse a '|' table: model / method / rank labels carry down the rows; `methods` names label-less rows in order."""
    out: Cells = {}
    data_rows = 0
    for line in fixture_lines(name):
        labels, values = split_row(line)
        if len(values) != len(columns):
            assert not values, line
            continue
        method = None
        for token in labels:
            if token in MODEL:
                model = MODEL[token]
            elif token in METHOD:
                method = METHOD[token]
            elif token == "-" or token.isdigit():
                rank = None if token == "-" else int(token)
        if methods is not None:
            method = methods[data_rows]
        data_rows += 1
        assert method is not None, line
        r = None if method == "full" else (fixed_rank if fixed_rank is not None else rank)
        for (col_model, metric), (mean, std) in zip(columns, values, strict=True):
            key = (col_model or model, r, method, metric)
            assert key not in out, key
            out[key] = (mean, std)
    return out


def parse_overhead() -> Cells:
    """Table 6: plain numbers, the SDS-LoRA row printed 'warm-up + main (+x%)'."""
    out: Cells = {}
    for line in fixture_lines("sds_lora_table6_overhead.txt"):
        nums = [float(x) for x in re.findall(r"\d+\.\d+", line)]
        if line.startswith("| LoRA |"):
            names = ["metamathqa_time_h", "metamathqa_memory_gb", "code_feedback_time_h", "code_feedback_memory_gb"]
            out.update({("unspecified", None, "lora", n): (v, None) for n, v in zip(names, nums, strict=True)})
        elif line.startswith("| SDS-LoRA |"):
            names = [
                f"{d}_{m}"
                for d in ("metamathqa", "code_feedback")
                for m in ("warmup_time_h", "time_h", "time_overhead_pct", "memory_gb", "memory_overhead_pct")
            ]
            out.update({("unspecified", None, "sds_lora", n): (v, None) for n, v in zip(names, nums, strict=True)})
    return out


def parse_update_interval() -> Cells:
    """Table 7: rows named by their printed share of refresh steps (formulas lost in the copy)."""
    by_share = {
        "1": "sds_lora_uniform1",
        "0.5": "sds_lora_uniform2",
        "0.33": "sds_lora_uniform3",
        "0.61": "sds_lora_k3",
        "0.52": "sds_lora_k4",
        "0.46": "sds_lora",
        "0.41": "sds_lora_k6",
        "0.37": "sds_lora_k7",
    }
    out: Cells = {}
    for line in fixture_lines("sds_lora_table7_update_interval.txt"):
        tokens = [t.replace(COLOR, "").strip() for t in line.split("|") if t.strip()]
        if len(tokens) < 3 or tokens[-3] not in by_share:  # header rows; a share like 0.33 also looks like a mean
            continue
        for metric, token in zip(("math", "gsm8k"), tokens[-2:], strict=True):
            m = CELL.match(token)
            out[("llama3_8b", 32, by_share[tokens[-3]], metric)] = (float(m.group(1)), float(m.group(2)))
    assert len(out) == 16
    return out


def parse_ralora_main() -> dict[str, Cells]:
    """The RaLoRA summary table: 'Task Metric LoRA Best (Name) RaLoRA RaLoRA-Pro [FFT]', whitespace separated."""
    rows = {
        "GLUE": ("ralora_glue", "t5_base", "glue_avg"),
        "MT-Bench": ("ralora_nlg", "llama31_8b", "mt_bench"),
        "GSM8K": ("ralora_nlg", "llama31_8b", "gsm8k"),
        "HumanEval": ("ralora_nlg", "llama31_8b", "humaneval"),
        "Image Cls": ("ralora_image", "clip_vit_b16", "image_avg7"),
    }
    out: dict[str, Cells] = {"ralora_glue": {}, "ralora_nlg": {}, "ralora_image": {}}
    for line in fixture_lines("ralora_main_results.txt")[1:]:
        task = next(t for t in rows if line.startswith(t + " "))
        table, model, metric = rows[task]
        best = METHOD[re.search(r"\((\S+)\)", line).group(1)]
        nums = [float(x) for x in re.findall(r"\b\d+\.\d\d\b", line)]
        for method, v in zip(["lora", best, "ralora", "ralora_pro", "full"], nums, strict=False):
            out[table][(model, None if method == "full" else 8, method, metric)] = (v, None)
    return out


def parse_ralora_ablation() -> Cells:
    """'Rank Method GSM8K HumanEval' rows."""
    out: Cells = {}
    for line in fixture_lines("ralora_rank_ablation.txt")[1:]:
        words = line.split()
        rank, method = int(words[0]), METHOD[words[1]]
        out[("llama31_8b", rank, method, "gsm8k")] = (float(words[-2]), None)
        out[("llama31_8b", rank, method, "humaneval")] = (float(words[-1]), None)
    return out


def parse_ralora_gid() -> Cells:
    """'WizardLM \\(\\approx 404\\)' in the prose."""
    text = " ".join(fixture_lines("ralora_gid.txt"))
    found = re.findall(r"([A-Za-z-]+) \\\(\\approx (\d+)\\\)", text)
    return {("llama31_8b", None, "full", "gid_" + n.lower().replace("-", "_")): (float(v), None) for n, v in found}


CS = [(None, m) for m in ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_c", "arc_e", "obqa", "avg")]
IMG = [(None, m) for m in ("cars", "cub200", "dtd", "food101", "sun397", "avg")]
EXPECTED = {  # table id -> (paper, parser)
    "sds_commonsense": ("sds_lora", lambda: parse_grid("sds_lora_table1_commonsense.txt", CS)),
    "sds_nlg": ("sds_lora", lambda: parse_grid("sds_lora_table2_nlg.txt", NLG)),
    "sds_image": (
        "sds_lora",
        lambda: parse_grid("sds_lora_table3_image.txt", [("vit_base", m) for m in ("cars", "cub200", "sun397")]),
    ),
    "sds_related": ("sds_lora", lambda: parse_grid("sds_lora_table4_related.txt", NLG, fixed_rank=8)),
    "sds_ablation": (
        "sds_lora",
        lambda: parse_grid(
            "sds_lora_table5_ablation.txt",
            NLG,
            fixed_rank=32,
            methods=["full", "rslora", "sds_trainable_uv", "sds_lora"],
        ),
    ),
    "sds_overhead": ("sds_lora", parse_overhead),
    "sds_update_interval": ("sds_lora", parse_update_interval),
    "sds_image_full": ("sds_lora", lambda: parse_grid("sds_lora_table8_image_full.txt", IMG)),
    "ralora_glue": ("ralora", lambda: parse_ralora_main()["ralora_glue"]),
    "ralora_nlg": ("ralora", lambda: parse_ralora_main()["ralora_nlg"]),
    "ralora_image": ("ralora", lambda: parse_ralora_main()["ralora_image"]),
    "ralora_rank_ablation": ("ralora", parse_ralora_ablation),
    "ralora_gid": ("ralora", parse_ralora_gid),
}
SIZES = {
    "sds_commonsense": 234,
    "sds_nlg": 78,
    "sds_image": 39,
    "sds_related": 30,
    "sds_ablation": 24,
    "sds_overhead": 14,
    "sds_update_interval": 16,
    "sds_image_full": 156,
    "ralora_glue": 5,
    "ralora_nlg": 15,
    "ralora_image": 4,
    "ralora_rank_ablation": 14,
    "ralora_gid": 3,
}


def yaml_cells(paper: str, table: str) -> Cells:
    """One table of the package yaml as {key: (mean, std)}."""
    cells = load_published(paper)["tables"][table]["cells"]
    out = {(c["model"], c["rank"], c["method"], c["metric"]): (c["mean"], c.get("std")) for c in cells}
    assert len(out) == len(cells), f"duplicate keys in {table}"
    return out


def test_every_table_is_checked() -> None:
    assert published_tables() == sorted(EXPECTED)
    for paper in PAPERS:
        for table, spec in load_published(paper)["tables"].items():
            assert EXPECTED[table][0] == paper
            assert (FIXTURES / spec["fixture"]).is_file()


@pytest.mark.parametrize("table", sorted(EXPECTED))
def test_every_cell_matches_the_paper_text(table: str) -> None:
    paper, parse = EXPECTED[table]
    parsed, stored = parse(), yaml_cells(paper, table)
    assert len(parsed) == SIZES[table]
    assert set(parsed) == set(stored)
    for key, (mean, std) in parsed.items():
        got_mean, got_std = stored[key]
        assert round(got_mean, 2) == round(mean, 2), key
        assert (got_std is None and std is None) or round(got_std, 2) == round(std, 2), key
        assert published_cell(table, *key) == (mean, std)


@pytest.mark.parametrize("table", ["sds_commonsense", "sds_image_full"])
def test_printed_averages_are_the_mean_of_their_row(table: str) -> None:
    rows: dict[tuple, dict[str, float]] = {}
    for (model, rank, method, metric), (mean, _) in yaml_cells("sds_lora", table).items():
        rows.setdefault((model, rank, method), {})[metric] = mean
    for row, vals in rows.items():
        avg = vals.pop("avg")
        assert abs(sum(vals.values()) / len(vals) - avg) <= 0.011, row


def test_not_reproduced_lists_the_methods_we_lack() -> None:
    ours = {p.stem for p in (REPO / "conf" / "adapter").glob("*.yaml")}
    for paper in PAPERS:
        for table, spec in load_published(paper)["tables"].items():
            methods = {c["method"] for c in spec["cells"]}
            assert set(spec["not_reproduced"]) <= methods, table
            for method in methods - set(spec["not_reproduced"]):
                assert method in ours or re.fullmatch(r"sds_lora_(k\d+|uniform1)", method), (table, method)
            models = {c["model"] for c in spec["cells"]}
            assert models == set(spec["models"]), table


def test_quoted_numbers_are_in_the_yaml() -> None:
    quoted = {
        ("ralora_glue", "t5_base", "glue_avg"): {"lora": 82.08, "ralora": 87.24, "ralora_pro": 87.23, "full": 87.91},
        ("ralora_nlg", "llama31_8b", "gsm8k"): {"lora": 67.78, "ralora": 72.25, "ralora_pro": 73.01, "full": 73.69},
        ("ralora_nlg", "llama31_8b", "humaneval"): {"lora": 43.09, "ralora": 48.78, "ralora_pro": 48.37, "full": 51.63},
    }
    for (table, model, metric), by_method in quoted.items():
        for method, value in by_method.items():
            assert published_cell(table, model, None if method == "full" else 8, method, metric) == (value, None)
    for method, value in {"lora": 67.78, "ls_lora": 70.15, "ralora": 71.42, "ralora_pro": 72.23}.items():
        assert published_cell("ralora_rank_ablation", "llama31_8b", 8, method, "gsm8k") == (value, None)
    for data, value in {"wizardlm": 404, "code_feedback": 269, "metamathqa": 178}.items():
        assert published_cell("ralora_gid", "llama31_8b", None, "full", f"gid_{data}") == (value, None)
    for method, value in {"lora": 83.89, "rslora": 84.60, "sds_lora": 85.42}.items():
        assert published_cell("sds_commonsense", "llama3_8b", 8, method, "avg") == (value, None)
    assert published_cell("sds_commonsense", "llama3_8b", None, "full", "avg") == (86.44, None)
    assert published_cell("sds_overhead", "unspecified", None, "sds_lora", "metamathqa_time_overhead_pct") == (
        4.35,
        None,
    )
    assert published_cell("sds_overhead", "unspecified", None, "sds_lora", "metamathqa_memory_overhead_pct") == (
        0.48,
        None,
    )
    assert published_cell("sds_commonsense", "llama3_8b", 8, "sds_lora", "hellaswag") == (96.00, 0.57)
    assert published_cell("sds_commonsense", "llama3_8b", 8, "sds_lora", "nope") is None


def test_gralora_copy_has_no_tables() -> None:
    gralora = load_published("gralora")
    assert gralora["tables"] == {}
    claims = {c["id"]: c for c in gralora["claims"]}
    text = " ".join(fixture_lines("gralora_summary_claims.txt"))
    assert "up to 8.5% absolute improvement in Pass@1 on HumanEval+" in text
    assert claims["humaneval_plus_max_gain"]["max_abs_gain"] == 8.5
    assert "k=2 for r∈{16,32} and k=4 for r∈{64,128}" in text
    assert claims["k_choice"]["k_by_rank"] == {16: 2, 32: 2, 64: 4, 128: 4}
    assert any(line.startswith('  - "gralora_code') or "gralora_code" in line for line in gralora["not_captured"])


def test_load_published_is_a_copy() -> None:
    data = load_published()
    assert set(data) == set(PAPERS)
    data["ralora"]["tables"].clear()
    assert load_published("ralora")["tables"]
    with pytest.raises(KeyError):
        load_published("nope")


def test_experiments_list_the_methods_they_do_not_reproduce() -> None:
    """Each experiment's `not_reproduced` covers the published table's methods no variant implements (e.g. MoRA)."""
    from lightning_ralora.reporting.tables.spec import TABLES
    from lightning_ralora.run.compose import compose_config

    for paper in ("ralora", "sds_lora"):
        for table, spec in load_published(paper)["tables"].items():
            for experiment in TABLES[table].experiments if table in TABLES else ():
                cfg = compose_config([f"experiment={experiment}"], run_dir="/tmp/unused")
                missing = set(spec.get("not_reproduced") or []) - set(cfg.not_reproduced)
                assert not missing, f"{experiment} ({table}) does not list {sorted(missing)} as not reproduced"
