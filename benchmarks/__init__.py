"""Benchmarks of the fused kernels and of one QLoRA training step (run as ``python -m benchmarks.<name>``)."""
