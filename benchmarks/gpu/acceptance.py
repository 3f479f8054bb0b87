"""`python -m benchmarks.gpu.acceptance --out DIR [--dry-run] [--budget-s 480] [--wheels benchmarks/gpu/wheels]`

The one-call GPU acceptance run. On a bare one-GPU machine (torch, Lightning, transformers, peft, torchmetrics
installed; no package index) it first installs the wheels `benchmarks/gpu/prepare_wheels.py` put in the ignored
wheel folder (`pip install --no-index --no-deps --target`), then measures every section of
`benchmarks/gpu/sections.py` within the time budget and writes DIR/acceptance.json and DIR/acceptance.md.
`--dry-run`: CPU, tiny shapes, bf16 autocast, no wheel install: the same code path in seconds (CI runs it).

This module imports only the standard library: the measuring code (`benchmarks.gpu.measure`) needs the carried
packages (hydra-core, omegaconf, this project) and is imported after they are installed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHEELS = Path(__file__).resolve().parent / "wheels"
SITE = Path("/tmp/lightning_ralora_acceptance_site")
MANIFEST = "manifest.json"
SOURCE_DIRS = ("lightning_ralora", "conf", "experiments")


def source_digest(root: Path = REPO) -> str:
    """sha256 over the project's package sources (*.py, *.yaml, *.md under SOURCE_DIRS): the wheel folder's
    manifest records it, so a wheel older than the working tree is caught before it shadows the sources."""
    h = hashlib.sha256()
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in (".py", ".yaml", ".md") and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def install_wheels(wheels: Path, site: Path = SITE) -> list[str]:
    """pip-install every wheel of `wheels` into `site` (no index, no dependency resolution) and put `site` first
    on sys.path and PYTHONPATH: the project's wheel then serves `lightning_ralora` (with its `conf` package) in
    place of the source folder. Returns notes; raises SystemExit on a stale or failed bundle."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        return [f"no wheels in {wheels}: using the packages already importable"]
    manifest = json.loads((wheels / MANIFEST).read_text()) if (wheels / MANIFEST).exists() else {}
    if manifest.get("source_digest") not in (None, source_digest()):
        raise SystemExit(f"{wheels} holds a project wheel older than the sources: rerun benchmarks/gpu/prepare_wheels")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)]
    subprocess.run(cmd, check=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    return [f"installed {len(found)} wheels from {wheels} into {site}: {', '.join(p.name for p in found)}"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu.acceptance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="folder for acceptance.json and acceptance.md")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no wheel install (CI)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget; late sections are skipped")
    p.add_argument("--wheels", type=Path, default=WHEELS, help="the carried wheel folder")
    p.add_argument("--sections", default=None, help="comma-separated subset of the sections (default: all)")
    p.add_argument("--device", default="cuda", help="device of a real run (default cuda)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Install the carried wheels (not on --dry-run), then run and report the sections."""
    start = time.perf_counter()
    args = parse_args(argv)
    # nothing can be reached from the GPU machine: no hub look-ups (they retry for tens of seconds), no W&B
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("WANDB_MODE", "disabled")):
        os.environ.setdefault(key, value)
    notes = ["dry run: no wheel install"] if args.dry_run else install_wheels(args.wheels)
    measure = importlib.import_module("benchmarks.gpu.measure")  # after the install: it imports hydra, omegaconf
    return measure.main(args, start, notes)


if __name__ == "__main__":
    main()
