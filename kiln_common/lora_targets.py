"""The LoRA vocabulary of a Llama-family layer, defined once: which projections take an adapter, and how."""

from __future__ import annotations

# Every projection of a Llama-family decoder layer an adapter may target, in the order the weights are laid
# out in memory (q/k/v and gate/up adjacent so they can run as one fused matmul).
TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

# Target module -> its parent in the HF Llama layer (`model.layers.N.<parent>.<module>`).
MODULE_PARENT: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

# Projections that read the same input: run as one matmul over a fused view, and share one LoRA shrink.
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
