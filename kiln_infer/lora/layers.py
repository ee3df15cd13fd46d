"""Batched LoRA math over stacked device slots: one shrink per input, one expand per module, per layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln_common.lora_targets import FUSED_GROUPS, TARGET_MODULES
from kiln_infer.kernels.backend import Kernels
from kiln_infer.kernels.bgmv import SHRINK_PROGRAMS, bgmv_expand_add, bgmv_shrink
from kiln_infer.kernels.lora_segments import MAX_TOKENS, SlotSegments, host_segments, segment_tokens
from kiln_infer.lora.peft_loader import LoraWeights


def _shrink_groups() -> dict[str, tuple[str, ...]]:
    """Each fused group, and each other target module alone, in layer order: qkv, o, gate_up, down."""
    groups: dict[str, tuple[str, ...]] = {}
    for module in TARGET_MODULES:
        modules = next((g for g in FUSED_GROUPS if module in g), (module,))
        short = [m.removesuffix("_proj") for m in modules]
        groups.setdefault("".join(short) if all(len(s) == 1 for s in short) else "_".join(short), modules)
    return groups


# Modules that read the same input share one shrink matmul: their A matrices are stacked in one tensor.
SHRINK_GROUPS: dict[str, tuple[str, ...]] = _shrink_groups()


class LoraSlots:
    """Device tensors for `num_slots` adapters (S slots of rank R, padded), per layer and shrink group.

    a_group[layer][group]: [len(group) * S * R, in] (module m's rows at m * S * R, slot s's at s * R within);
    b_group[layer][group]: [sum of the group's out, S * R] (module m's rows after the modules before it, as
    in a fused q|k|v or gate|up output); a[layer][module] and b[layer][module] ([out, S * R]) are views into
    them. ranks: [S] int32, each slot's largest rank (rows and columns past it are zero padding). `kernels`
    (the engine's choice) decides whether steps take the bgmv kernels or the dense math.
    """

    def __init__(
        self,
        num_layers: int,
        shapes: dict[str, tuple[int, int]],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        kernels: Kernels,
    ) -> None:
        self.num_slots, self.max_rank, self.kernels = num_slots, max_rank, kernels
        self.num_layers, self.shapes = num_layers, dict(shapes)
        self.dtype, self.device = dtype, device
        sr = num_slots * max_rank
        groups = {g: tuple(m for m in modules if m in shapes) for g, modules in SHRINK_GROUPS.items()}
        # the shrink groups these slots hold, each with its modules in stacking order
        self.groups = {g: modules for g, modules in groups.items() if modules}
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.host_ranks = [0] * num_slots  # the same on the host: the eager torch math slices to it
        self.a_group: list[dict[str, torch.Tensor]] = []
        self.b_group: list[dict[str, torch.Tensor]] = []
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        for _ in range(num_layers):
            a_groups: dict[str, torch.Tensor] = {}
            b_groups: dict[str, torch.Tensor] = {}
            a_views: dict[str, torch.Tensor] = {}
            b_views: dict[str, torch.Tensor] = {}
            for group, present in self.groups.items():
                stacked = torch.zeros(len(present) * sr, shapes[present[0]][0], dtype=dtype, device=device)
                a_groups[group] = stacked
                a_views.update({m: stacked[i * sr : (i + 1) * sr] for i, m in enumerate(present)})
                outs = [shapes[m][1] for m in present]
                b_stacked = torch.zeros(sum(outs), sr, dtype=dtype, device=device)
                b_groups[group] = b_stacked
                b_views.update(zip(present, b_stacked.split(outs), strict=True))
            self.a_group.append(a_groups)
            self.b_group.append(b_groups)
            self.a.append(a_views)
            self.b.append(b_views)

    def load(self, slot: int, weights: LoraWeights) -> None:
        """Copy one adapter into a slot, zero-padding ranks up to max_rank and untargeted modules to zero."""
        lo, hi = slot * self.max_rank, (slot + 1) * self.max_rank
        rank = 0
        for layer, (a_mods, b_mods) in enumerate(zip(self.a, self.b, strict=True)):
            for module in a_mods:
                a_dst, b_dst = a_mods[module][lo:hi], b_mods[module][:, lo:hi]
                a_dst.zero_()
                b_dst.zero_()
                a_src, b_src = weights.a.get((layer, module)), weights.b.get((layer, module))
                if a_src is not None and b_src is not None:
                    r = a_src.shape[0]
                    rank = max(rank, r)
                    a_dst[:r].copy_(a_src, non_blocking=True)
                    b_dst[:, :r].copy_(b_src, non_blocking=True)
        self.ranks[slot] = rank
        self.host_ranks[slot] = rank


@dataclass
class LoraBatch:
    """Per-step LoRA inputs: the slot tensors and each token's slot, in the form the chosen path reads.

    Exactly one form is set, and in each a token only ever meets its own slot's weights (a bad adapter's
    NaN cannot reach another row): `segments` (tokens grouped by slot, for the kernels), `rows` (each
    slot's token indices, grouped on the host, for the eager torch math) or `token_slots` (the graph-safe
    torch math for CUDA without the kernels: each token gathers its own slot's weights, base tokens zeros).
    """

    slots: LoraSlots
    segments: SlotSegments | None = None
    rows: tuple[tuple[int, torch.Tensor], ...] | None = None  # (slot, int64 token indices), slot >= 0
    token_slots: torch.Tensor | None = None  # [T] slot per token, -1 = base

    @classmethod
    def for_tokens(cls, slots: LoraSlots, token_slots: torch.Tensor) -> LoraBatch:
        """[T] slot per token (-1 = base): the kernels for decode-sized CUDA batches, else the torch math."""
        t = token_slots.shape[0]
        if slots.kernels.triton and token_slots.is_cuda and 0 < t <= MAX_TOKENS:
            return cls.segmented(slots, token_slots)
        return cls.dense(slots, token_slots)

    @classmethod
    def dense(cls, slots: LoraSlots, token_slots: torch.Tensor) -> LoraBatch:
        """The torch math's form: per-slot rows from host slots; a per-token gather for device slots."""
        if token_slots.is_cuda:
            return cls(slots, token_slots=token_slots)  # no host sync: capturable in a CUDA graph
        return cls(slots, rows=slot_rows(token_slots))

    @classmethod
    def segmented(cls, slots: LoraSlots, token_slots: torch.Tensor) -> LoraBatch:
        """The kernels' form, grouped on the device (CUDA, Triton, 1 <= T <= MAX_TOKENS)."""
        return cls(slots, segments=segment_tokens(token_slots, slots.num_slots))

    @classmethod
    def for_host_tokens(cls, slots: LoraSlots, token_slots: np.ndarray, device: torch.device) -> LoraBatch:
        """`for_tokens` for eager steps, from host-side slots: the kernels on CUDA whatever the size (SGMV).

        Prefill chunks are long runs of one slot; grouping them on the host costs a sort of the step's
        slots, and the kernels then read each adapter's weights once per block of 16 tokens instead of
        multiplying every token by every slot's weights as the dense path does.
        """
        if slots.kernels.triton and device.type == "cuda":
            return cls(slots, segments=host_segments(token_slots, device))
        return cls.for_tokens(slots, torch.from_numpy(token_slots).to(device))


def columns_side_by_side(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The [T, sum of widths] tensor whose adjacent column slices `parts` are, else None."""
    first = parts[0]
    if first.dim() != 2 or first.stride(1) != 1:
        return None
    storage = first.untyped_storage()
    ptr = first.data_ptr()
    for p in parts:
        same_rows = p.dim() == 2 and p.shape[0] == first.shape[0] and p.stride() == first.stride()
        if not same_rows or p.dtype != first.dtype or p.data_ptr() != ptr:
            return None
        # separate allocations can sit back to back too: only slices of one storage are one tensor
        if p.untyped_storage().data_ptr() != storage.data_ptr():
            return None
        ptr += p.shape[1] * p.element_size()
    width = sum(p.shape[1] for p in parts)
    rows = first.shape[0]
    if rows > 1 and first.stride(0) < width:
        return None
    end = first.storage_offset() + (rows - 1) * first.stride(0) + width  # elements of the storage touched
    if end * first.element_size() > storage.nbytes():
        return None
    return first.as_strided((rows, width), first.stride())


def add_lora(
    x: torch.Tensor, outs: list[torch.Tensor], layer: int, group: str, lora: LoraBatch
) -> list[torch.Tensor]:
    """Add each token's LoRA delta to the base outputs `outs` of one shrink group's modules, in place.

    Kernel path: one shrink, and one expand into the outputs (a single launch when they are column slices of
    one fused output). Torch paths: per slot present, its rows alone (or, graph-safe, a per-token gather).
    """
    slots = lora.slots
    modules = slots.groups[group]
    assert len(outs) == len(modules)
    if lora.rows is not None:
        for slot, rows in lora.rows:
            _add_slot_rows(x, outs, layer, group, slot, rows, slots)
        return outs
    if lora.token_slots is not None:
        _add_gathered(x, outs, layer, group, lora.token_slots, slots)
        return outs
    assert lora.segments is not None
    r = slots.max_rank
    seg = lora.segments
    programs = SHRINK_PROGRAMS if seg.split_k else 1  # one program per block and module: no split
    shrunk = bgmv_shrink(x, slots.a_group[layer][group], seg, len(modules), r, programs)
    fused = columns_side_by_side(outs)
    if fused is not None:
        sizes = [y.shape[1] for y in outs]
        bgmv_expand_add(shrunk, slots.b_group[layer][group], lora.segments, fused, sizes, 0, r)
    else:
        for i, (y, m) in enumerate(zip(outs, modules, strict=True)):
            bgmv_expand_add(shrunk, slots.b[layer][m], lora.segments, y, [y.shape[1]], i, r)
    return outs


def slot_rows(token_slots: torch.Tensor) -> tuple[tuple[int, torch.Tensor], ...]:
    """[T] slot per token (-1 = base, host tensor) -> (slot, its token indices) for each slot present."""
    order = torch.argsort(token_slots, stable=True)
    present, counts = torch.unique_consecutive(token_slots[order], return_counts=True)
    groups = zip(present.tolist(), order.split(counts.tolist()), strict=True)
    return tuple((slot, rows) for slot, rows in groups if slot >= 0)


def _add_slot_rows(
    x: torch.Tensor,
    outs: list[torch.Tensor],
    layer: int,
    group: str,
    slot: int,
    rows: torch.Tensor,
    slots: LoraSlots,
) -> None:
    """Add one slot's delta to its own rows only: the rows are gathered, multiplied by that slot, scattered.

    semantics: out_m[rows] += B_{m,slot} @ (A_{m,slot} @ x[rows])   (A: [r, in], B: [out_m, r], r = the slot's
    own rank, not max_rank: a rank-8 adapter in rank-64 slots does an eighth of the work)
    """
    rank = slots.host_ranks[slot]  # the slot's own rank: the rows past it are zero padding
    if rank == 0:
        return
    lo = slot * slots.max_rank
    hi = lo + rank
    x_rows = x.index_select(0, rows.to(x.device))  # [n, in]
    for y, m in zip(outs, slots.groups[group], strict=True):
        shrunk = x_rows @ slots.a[layer][m][lo:hi].t()  # [n, R]
        y.index_add_(0, rows.to(y.device), shrunk @ slots.b[layer][m][:, lo:hi].t())


def _add_gathered(
    x: torch.Tensor,
    outs: list[torch.Tensor],
    layer: int,
    group: str,
    token_slots: torch.Tensor,
    slots: LoraSlots,
) -> None:
    """Graph-safe torch math: each token gathers its own slot's A and B; base tokens get zero matrices.

    semantics: out_m[t] += B_{m,slot[t]} @ (A_{m,slot[t]} @ x[t]) for slot[t] >= 0, nothing otherwise
    """
    r, s = slots.max_rank, slots.num_slots
    own = token_slots >= 0  # [T]
    index = token_slots.clamp(min=0)
    for y, m in zip(outs, slots.groups[group], strict=True):
        a = slots.a[layer][m].view(s, r, -1)[index]  # [T, R, in]
        a = torch.where(own[:, None, None], a, torch.zeros((), dtype=a.dtype, device=a.device))
        b = slots.b[layer][m].view(-1, s, r).permute(1, 0, 2)[index]  # [T, out, R]
        b = torch.where(own[:, None, None], b, torch.zeros((), dtype=b.dtype, device=b.device))
        shrunk = torch.bmm(a, x[:, :, None])  # [T, R, 1]
        y.add_(torch.bmm(b, shrunk).squeeze(2))


def lora_delta_reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, max_rank: int
) -> torch.Tensor:
    """Slow per-slot loop that `add_lora` must equal for one module (used in tests)."""
    out = torch.zeros(x.shape[0], b.shape[0], dtype=x.dtype, device=x.device)
    for s in token_slots.unique().tolist():
        if s < 0:
            continue
        rows = (token_slots == s).nonzero().squeeze(1)
        a_s, b_s = a[s * max_rank : (s + 1) * max_rank], b[:, s * max_rank : (s + 1) * max_rank]
        out[rows] = (x[rows] @ a_s.t()) @ b_s.t()
    return out
