"""`python -m benchmarks.gpu.prepare_wheels [--dest benchmarks/gpu/wheels] [--limit-mib 48]`

On a CPU machine with pip and a package index, fill the ignored wheel folder that travels with the GPU call: this
project's wheel (`pip wheel --no-deps .`) and the packages its acceptance run imports that the GPU image lacks,
for the image's Python (3.12, manylinux x86-64), one version each, pinned to the versions installed here (the ones
the tests ran with). A pure-Python package published only as an sdist (antlr4-python3-runtime 4.9.3) is built here
into a py3-none-any wheel. A manifest records the sources' digest (the run refuses a stale project wheel) and the
sizes; the bundle must stay under the limit (the call carries 64 MiB, the working tree included). Needs no GPU.

Not bundled: wandb, datasets, lion-pytorch, math-verify, lm-eval (dependencies of the project that the acceptance
run never imports: W&B is off, no hub data, AdamW, no lm-eval suites); torch, Lightning, transformers, peft,
torchmetrics, PyYAML are in the image.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu.acceptance import MANIFEST, REPO, WHEELS, source_digest

GPU_PYTHON = "3.12"  # the GPU image's python3 (3.12.3, /opt/torch/.venv)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
# the acceptance run's imports missing from the GPU image (Hydra composes the configs; omegaconf needs antlr4)
PACKAGES = ("hydra-core", "omegaconf", "antlr4-python3-runtime")
LIMIT_MIB = 48.0  # of the call's 64 MiB; the rest is the working tree


def pinned(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """`name==version` of each package as installed here."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in packages]


def download_cmd(requirement: str, dest: Path) -> list[str]:
    """pip download of one binary wheel for the GPU machine's Python and platform, without dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    cmd += ["--python-version", GPU_PYTHON, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return [*cmd, requirement]


def build_cmd(target: str, dest: Path) -> list[str]:
    """pip wheel of a pure-Python package or of this project (no dependencies, this machine's setuptools)."""
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), target]


def check_bundle(sizes: dict[str, int], limit_mib: float) -> list[str]:
    """Problems with the bundle: a wheel that is not for any Python 3 / the GPU's Python, two versions of one
    package, the total over `limit_mib`."""
    problems = []
    names: dict[str, str] = {}
    for wheel in sizes:
        parts = wheel.removesuffix(".whl").split("-")
        if len(parts) < 5:
            problems.append(f"{wheel}: not a wheel file name")
            continue
        python = parts[-3]
        if not (python.startswith("py3") or f"cp{GPU_PYTHON.replace('.', '')}" in python or python == "abi3"):
            problems.append(f"{wheel}: built for {python}, not Python {GPU_PYTHON}")
        name = parts[0].lower().replace("_", "-")
        if name in names:
            problems.append(f"two versions of {name}: {names[name]} and {wheel}")
        names[name] = wheel
    total = sum(sizes.values()) / 2**20
    if total > limit_mib:
        problems.append(f"the bundle is {total:.1f} MiB, over the {limit_mib:g} MiB limit")
    return problems


def prepare(dest: Path, limit_mib: float) -> dict:
    """Empty `dest`, fetch or build every wheel into it, write the manifest; raises SystemExit on a problem."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    subprocess.run(build_cmd(str(REPO), dest), check=True)
    for requirement in pinned():
        if subprocess.run(download_cmd(requirement, dest)).returncode:
            print(f"[wheels] no binary wheel of {requirement}: building it (pure Python)", file=sys.stderr)
            subprocess.run(build_cmd(requirement, dest), check=True)
    sizes = {p.name: p.stat().st_size for p in sorted(dest.glob("*.whl"))}
    problems = check_bundle(sizes, limit_mib)
    manifest = {"source_digest": source_digest(), "python": GPU_PYTHON, "wheels": sizes, "total": sum(sizes.values())}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if problems:
        raise SystemExit("wheel bundle problems:\n" + "\n".join(f"- {p}" for p in problems))
    return manifest


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.prepare_wheels", description=__doc__)
    p.add_argument("--dest", type=Path, default=WHEELS)
    p.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    args = p.parse_args(argv)
    manifest = prepare(args.dest, args.limit_mib)
    for name, size in manifest["wheels"].items():
        print(f"{size / 2**20:8.2f} MiB  {name}")
    print(f"{manifest['total'] / 2**20:8.2f} MiB  total in {args.dest}")
    return manifest


if __name__ == "__main__":
    main()
