"""Batched LoRA math over stacked device slots: one shrink and one expand per module per layer."""

from __future__ import annotations

import torch

from kiln_infer.lora.peft_loader import LoraWeights


class LoraSlots:
    """Device tensors for `num_slots` adapters: per layer and module, A [S*R, in] and B [out, S*R]."""

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
        self.dtype, self.device = dtype, device
        sr = num_slots * max_rank
        # a[layer][module]: [S*R, in]; b[layer][module]: [out, S*R]; slot s owns rows/cols s*R:(s+1)*R.
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        for _ in range(num_layers):
            self.a.append(
                {m: torch.zeros(sr, i, dtype=dtype, device=device) for m, (i, _o) in shapes.items()}
            )
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


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batched LoRA: each adapter's A and B are read once for the whole batch.

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
