"""lightning_ralora: LoRA-variant research on Lightning."""
