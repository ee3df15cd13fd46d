"""Benchmarks and probes run on the GPU, outside the packages: `python -m benchmarks.<name>`."""
