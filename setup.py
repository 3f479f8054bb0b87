"""Packages: lightning_ralora and its subpackages, plus the top-level experiments/ folder (one folder per paper
table) installed as `lightning_ralora.experiments` (pyproject.toml holds everything else)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["lightning_ralora*"]), "lightning_ralora.experiments"],
    package_dir={"lightning_ralora.experiments": "experiments"},
)
