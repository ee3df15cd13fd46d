"""The one place Triton is imported: `triton` and `tl` are None on installs without it (CPU-only torch)."""

from __future__ import annotations

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the torch references
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None


def triton_available() -> bool:
    """Whether the Triton kernels can be used on this install."""
    return triton is not None
