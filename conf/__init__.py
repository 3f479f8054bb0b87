"""The Hydra configs (installed as `lightning_ralora.conf`; this file only makes the folder a package)."""
