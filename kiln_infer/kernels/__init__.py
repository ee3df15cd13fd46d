"""Kernels with their torch references (each module), the one Triton import, and the backend chosen once."""
