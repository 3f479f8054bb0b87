"""lightning_ralora: LoRA-variant research on Lightning (the folders are the layers: docs/architecture.md)."""
