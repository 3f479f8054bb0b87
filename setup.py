"""Packages: lightning_ralora and its subpackages, plus the top-level conf/ (the Hydra configs) and experiments/
(one folder per paper table) installed as `lightning_ralora.conf` and `lightning_ralora.experiments`, so a wheel runs
every command and an editable install reads the repository's files (pyproject.toml holds everything else)."""

from setuptools import find_packages, setup

TOP_LEVEL = {"lightning_ralora.conf": "conf", "lightning_ralora.experiments": "experiments"}

setup(packages=[*find_packages(include=["lightning_ralora*"]), *TOP_LEVEL], package_dir=TOP_LEVEL)
