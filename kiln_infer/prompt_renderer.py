"""The prompt renderer kiln-infer serves with (defined in kiln_common, shared with training)."""

from __future__ import annotations

from kiln_common.prompt import PromptRenderer

__all__ = ["PromptRenderer"]
