"""Batched LoRA math over stacked device slots: one shrink per input, one expand per module, per layer."""

from __future__ import annotations

import torch

from kiln_infer.lora.peft_loader import LoraWeights

# Modules that read the same input share one shrink matmul: their A matrices are stacked in one tensor.
SHRINK_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


class LoraSlots:
    """Device tensors for `num_slots` adapters (S slots of rank R, padded), per layer and shrink group.

    a_group[layer][group]: [len(group) * S * R, in] (module m's rows at m * S * R, slot s's at s * R within);
    a[layer][module] are views into it; b[layer][module]: [out, S * R].
    """

    def __init__(
        self,
        num_layers: int,
        shapes: dict[str, tuple[int, int]],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots, self.max_rank = num_slots, max_rank
        self.num_layers, self.shapes = num_layers, dict(shapes)
        self.dtype, self.device = dtype, device
        sr = num_slots * max_rank
        self.a_group: list[dict[str, torch.Tensor]] = []
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        for _ in range(num_layers):
            groups: dict[str, torch.Tensor] = {}
            views: dict[str, torch.Tensor] = {}
            for group, modules in SHRINK_GROUPS.items():
                present = [m for m in modules if m in shapes]
                if not present:
                    continue
                stacked = torch.zeros(len(present) * sr, shapes[present[0]][0], dtype=dtype, device=device)
                groups[group] = stacked
                views.update({m: stacked[i * sr : (i + 1) * sr] for i, m in enumerate(present)})
            self.a_group.append(groups)
            self.a.append(views)
            self.b.append(
                {m: torch.zeros(o, sr, dtype=dtype, device=device) for m, (_i, o) in shapes.items()}
            )

    def load(self, slot: int, weights: LoraWeights) -> None:
        """Copy one adapter into a slot, zero-padding ranks up to max_rank and untargeted modules to zero."""
        lo, hi = slot * self.max_rank, (slot + 1) * self.max_rank
        for layer, (a_mods, b_mods) in enumerate(zip(self.a, self.b, strict=True)):
            for module in a_mods:
                a_dst, b_dst = a_mods[module][lo:hi], b_mods[module][:, lo:hi]
                a_dst.zero_()
                b_dst.zero_()
                a_src, b_src = weights.a.get((layer, module)), weights.b.get((layer, module))
                if a_src is not None and b_src is not None:
                    r = a_src.shape[0]
                    a_dst[:r].copy_(a_src, non_blocking=True)
                    b_dst[:, :r].copy_(b_src, non_blocking=True)

    def token_mask(self, token_slots: torch.Tensor) -> torch.Tensor:
        """[T] slot per token (-1 = base) -> [T, S*R] mask selecting that slot's rank columns."""
        slots = torch.arange(self.num_slots, device=token_slots.device)
        onehot = (token_slots[:, None] == slots[None, :]).to(self.dtype)  # [T, S]
        return onehot.repeat_interleave(self.max_rank, dim=1)


def lora_shrink(x: torch.Tensor, a_group: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rank-space activations of every module in a shrink group: [T, modules, S*R], other slots zeroed.

    semantics: out[t, m, s*R:(s+1)*R] = A_{m,s} @ x[t] if slot[t] == s else 0   (A_{m,s}: [R, in])
    """
    t, sr = x.shape[0], mask.shape[1]
    return (x @ a_group.t()).view(t, -1, sr) * mask[:, None, :]


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batched LoRA for one module: each adapter's A and B are read once for the whole batch.

    semantics:
        for t in range(T):                       # x: [T, in]
            s = slot[t]                          # mask[t] = 1 on columns s*R:(s+1)*R, else 0 (-1: all 0)
            out[t] = B_s @ (A_s @ x[t])          # A_s: [R, in], B_s (scaled): [out, R]
    computed as ((x @ A.T) * mask) @ B.T with A: [S*R, in], B: [out, S*R].
    """
    return ((x @ a.t()) * mask) @ b.t()


def lora_delta_reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, max_rank: int
) -> torch.Tensor:
    """Slow per-slot loop that the batched `lora_delta` must equal (used in tests)."""
    out = torch.zeros(x.shape[0], b.shape[0], dtype=x.dtype, device=x.device)
    for s in token_slots.unique().tolist():
        if s < 0:
            continue
        rows = (token_slots == s).nonzero().squeeze(1)
        a_s, b_s = a[s * max_rank : (s + 1) * max_rank], b[:, s * max_rank : (s + 1) * max_rank]
        out[rows] = (x[rows] @ a_s.t()) @ b_s.t()
    return out
