"""The GPU acceptance run (benchmarks/gpu): its CPU dry run end to end, and the wheel bundle's logic (offline)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu import acceptance, prepare_wheels

REPO = Path(__file__).resolve().parents[1]


def _numbers(obj: object) -> list[float]:
    """Every int/float inside a JSON value."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def test_dry_run_reports_every_section_with_numbers(tmp_path: Path) -> None:
    """`python -m benchmarks.gpu.acceptance --dry-run` in a fresh process: every section ran (CPU, tiny shapes)
    and left finite, positive ratios; the step has tokens/s per variant, the GID section its plan comparison."""
    from benchmarks.gpu.sections import PRESETS, SECTIONS

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "benchmarks.gpu.acceptance", "--dry-run", "--out", str(tmp_path)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "acceptance.json").read_text())
    assert data["environment"]["dry_run"] is True and data["environment"]["device"] == "cpu"
    assert set(data["sections"]) == set(SECTIONS)
    for name, section in data["sections"].items():
        assert section["status"] == "ok", f"{name}: {section.get('note')}\n{section.get('traceback', '')}"
        assert section["figures"], f"section {name} has no figures"
        for fig in section["figures"]:
            for q in ("median", "q1", "q3"):  # a tiny step's peak-RSS growth may be 0 on CPU: memory ratios >= 0
                v = fig["ratio"][q]
                assert math.isfinite(v) and (v >= 0 if "/memory/" in fig["key"] else v > 0), f"{fig['key']}: {q}"
    layer_keys = {f["key"] for f in data["sections"]["layers"]["figures"]}
    for v in ("rslora", "ralora_pro", "peft_dora", "ralora", "gralora", "hybrid", "sds"):
        assert any(k.endswith(f"/{v}_vs_lora") for k in layer_keys), v
    assert any(k.endswith("/lora_vs_floor") for k in layer_keys)
    step = data["sections"]["step"]["raw"]
    assert set(step["tokens_per_s"]) == {"floor", "peft_gralora", *PRESETS.values()}
    assert all(t > 0 for t in step["tokens_per_s"].values())
    gid = data["sections"]["gid"]["raw"]
    assert gid["predicted_32_layers_bytes"] > gid["predicted_2_layers_bytes"] > 0 and gid["measured_2_layers_bytes"] > 0
    assert all(math.isfinite(x) for x in _numbers(data["sections"]))
    assert any(k.endswith("_compiled_vs_eager") for k in (f["key"] for f in data["sections"]["compile"]["figures"]))
    md = (tmp_path / "acceptance.md").read_text()
    assert "| section | status | seconds | note |" in md and "tokens/s" in md


def test_pinned_requirements_and_download_command(tmp_path: Path) -> None:
    reqs = prepare_wheels.pinned()
    assert [r.split("==")[0] for r in reqs] == list(prepare_wheels.PACKAGES)
    assert all(r.split("==")[1] for r in reqs)
    cmd = prepare_wheels.download_cmd("omegaconf==2.3.1", tmp_path)
    assert cmd[-1] == "omegaconf==2.3.1" and "--only-binary=:all:" in cmd and "--no-deps" in cmd
    assert cmd[cmd.index("--python-version") + 1] == prepare_wheels.GPU_PYTHON
    assert "manylinux_2_17_x86_64" in cmd and cmd[cmd.index("-d") + 1] == str(tmp_path)
    assert "--no-deps" in prepare_wheels.build_cmd(".", tmp_path)


def test_check_bundle_catches_size_versions_and_python() -> None:
    ok = {"omegaconf-2.3.1-py3-none-any.whl": 2**20, "x-1.0-cp312-cp312-manylinux_2_17_x86_64.whl": 2**20}
    assert prepare_wheels.check_bundle(ok, 48) == []
    assert any("over the 1 MiB" in p for p in prepare_wheels.check_bundle(ok, 1))
    twice = {**ok, "omegaconf-2.3.0-py3-none-any.whl": 10}
    assert any("two versions of omegaconf" in p for p in prepare_wheels.check_bundle(twice, 48))
    wrong = {"x-1.0-cp311-cp311-manylinux_2_17_x86_64.whl": 10}
    assert any("not Python 3.12" in p for p in prepare_wheels.check_bundle(wrong, 48))


def test_install_wheels_without_wheels_and_refuses_a_stale_project_wheel(tmp_path: Path) -> None:
    notes = acceptance.install_wheels(tmp_path, tmp_path / "site")
    assert "no wheels" in notes[0] and not (tmp_path / "site").exists()
    (tmp_path / "lightning_ralora-0.1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / acceptance.MANIFEST).write_text(json.dumps({"source_digest": "stale"}))
    with pytest.raises(SystemExit, match="older than the sources"):
        acceptance.install_wheels(tmp_path, tmp_path / "site")


def test_source_digest_follows_the_sources(tmp_path: Path) -> None:
    (tmp_path / "lightning_ralora").mkdir()
    (tmp_path / "conf").mkdir()
    (tmp_path / "lightning_ralora" / "a.py").write_text("x = 1\n")
    first = acceptance.source_digest(tmp_path)
    (tmp_path / "conf" / "b.yaml").write_text("r: 8\n")
    second = acceptance.source_digest(tmp_path)
    (tmp_path / "lightning_ralora" / "a.pyc").write_text("ignored")
    assert first != second == acceptance.source_digest(tmp_path)
