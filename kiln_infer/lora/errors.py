"""Errors raised by adapter loading."""

from __future__ import annotations


class AdapterLoadError(RuntimeError):
    """An adapter could not be loaded (bad files, rank above the server's maximum, wrong target modules)."""
