"""Benchmarks, probes and GPU checks of Kiln (run as modules: `python -m benchmarks.<name>`)."""
