"""Side-by-side cost benchmarks of every adapter variant against peft and the frozen-base floor.

Run `python -m benchmarks.run` (see benchmarks/run.py). Every figure is a ratio measured in one process run:
the variants are interleaved round-robin over the repeats, so machine noise hits them equally.
"""
