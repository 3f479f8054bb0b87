"""The prepared one-GPU acceptance run (`python -m benchmarks.gpu.acceptance`) and its wheel bundle
(`python -m benchmarks.gpu.prepare_wheels`); see docs/benchmarks.md."""
