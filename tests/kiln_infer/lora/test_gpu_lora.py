"""BGMV LoRA kernels (Triton) against the per-slot reference loop and the dense path; GPU only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln_infer.kernels.backend import TRITON_KERNELS
from kiln_infer.kernels.bgmv import bgmv_expand_add, bgmv_shrink
from kiln_infer.kernels.lora_segments import BLOCK_M, SlotSegments, segment_tokens
from kiln_infer.kernels.triton_import import triton_available
from kiln_infer.lora.layers import LoraBatch, LoraSlots, add_lora, lora_delta_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)"
    ),
    pytest.mark.skipif(not triton_available(), reason="needs Triton"),
]

# Llama-like proportions, small; the qkv sizes are not multiples of the kernels' 128-column tiles, so tiles
# straddle module boundaries.
SHAPES = {
    "q_proj": (256, 200),
    "k_proj": (256, 72),
    "v_proj": (256, 72),
    "o_proj": (200, 256),
    "gate_proj": (256, 384),
    "up_proj": (256, 384),
    "down_proj": (384, 256),
}


@pytest.fixture
def device() -> torch.device:
    """The CUDA device (the kernels also run on CPU tensors under TRITON_INTERPRET=1)."""
    return torch.device("cuda")


def random_slots(
    num_slots: int,
    max_rank: int,
    dtype: torch.dtype,
    device: torch.device,
    shapes: dict[str, tuple[int, int]] = SHAPES,
) -> LoraSlots:
    """Two layers of slots holding random adapters of mixed ranks (zero-padded up to max_rank)."""
    gen = torch.Generator().manual_seed(num_slots * 1000 + max_rank)
    slots = LoraSlots(2, shapes, num_slots, max_rank, dtype, device, TRITON_KERNELS)
    for s in range(num_slots):
        rank = [max_rank, 1, max_rank // 2 + 1, 3][s % 4]
        for layer in range(2):
            for m, (i, o) in shapes.items():
                slots.a[layer][m][s * max_rank : s * max_rank + rank] = (
                    torch.randn(rank, i, generator=gen) / i**0.5
                )
                slots.b[layer][m][:, s * max_rank : s * max_rank + rank] = torch.randn(o, rank, generator=gen)
        slots.ranks[s] = rank
    return slots


def token_slots(num_tokens: int, num_slots: int, device: torch.device) -> torch.Tensor:
    """Random slots in [-1, num_slots), with -1 and slot 0 present."""
    gen = torch.Generator().manual_seed(num_tokens)
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen)
    slots[0], slots[-1] = -1, 0
    return slots.to(device)


def reference(
    x: torch.Tensor, slots: LoraSlots, layer: int, modules: list[str], ts: torch.Tensor
) -> torch.Tensor:
    """fp32 LoRA deltas of `modules`, side by side, by the per-slot loop."""
    r = slots.max_rank
    parts = [
        lora_delta_reference(x.float(), slots.a[layer][m].float(), slots.b[layer][m].float(), ts, r)
        for m in modules
    ]
    return torch.cat(parts, dim=1)


def assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    scale = expected.abs().max().item()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert (out.float() - expected).abs().max().item() <= tol * scale


@pytest.mark.parametrize("num_tokens", [1, 37, 256])
@pytest.mark.parametrize("num_slots", [1, 4, 16, 64])
def test_segments_group_tokens_by_slot(device: torch.device, num_tokens: int, num_slots: int) -> None:
    ts = token_slots(num_tokens, num_slots, device)
    seg = segment_tokens(ts, num_slots)
    order, (slot, start, length) = seg.order.tolist(), seg.blocks.tolist()
    assert sorted(order) == list(range(num_tokens))
    covered: list[int] = []
    for s, b, n in zip(slot, start, length, strict=True):
        if n:
            assert 0 < n <= 16 and all(ts[t].item() == s for t in order[b : b + n])
            covered += order[b : b + n]
    assert sorted(covered) == list(range(num_tokens))  # every token in exactly one block


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_slots", [1, 4, 16, 64])
@pytest.mark.parametrize("num_tokens", [1, 37, 256])
def test_kernels_match_reference(
    device: torch.device, dtype: torch.dtype, num_slots: int, num_tokens: int
) -> None:
    max_rank = 16
    slots = random_slots(num_slots, max_rank, dtype, device)
    ts = token_slots(num_tokens, num_slots, device)
    seg = segment_tokens(ts, num_slots)
    for group, modules in slots.groups.items():
        x = torch.randn(num_tokens, SHAPES[modules[0]][0], dtype=dtype, device=device)
        sizes = [SHAPES[m][1] for m in modules]
        base = torch.randn(num_tokens, sum(sizes), dtype=dtype, device=device)
        shrunk = bgmv_shrink(x, slots.a_group[1][group], seg, len(modules), max_rank)
        # shrink alone: each token's own A rows, zeros for base tokens
        a = slots.a_group[1][group].float().view(len(modules), num_slots, max_rank, -1)
        want = torch.einsum("gtri,ti->tgr", a[:, ts.clamp(min=0)], x.float()) * (ts >= 0)[:, None, None]
        assert_close(shrunk.sum(0), want.flatten(1), dtype)
        out = base.clone()
        bgmv_expand_add(shrunk, slots.b_group[1][group], seg, out, sizes, 0, max_rank)
        assert_close(out, base.float() + reference(x, slots, 1, list(modules), ts), dtype)
        assert torch.equal(out[ts < 0], base[ts < 0])  # base tokens untouched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_and_chunked_launches_match_reference(device: torch.device, dtype: torch.dtype) -> None:
    """Input features split 1, 2, 4 and 16 ways (18 k-tiles, so uneven slices), and 1 to 3 column tiles per
    program, give the same sums."""
    max_rank, num_slots, num_tokens = 8, 4, 37
    slots = random_slots(num_slots, max_rank, dtype, device, {"down_proj": (2200, 300)})
    ts = token_slots(num_tokens, num_slots, device)
    seg = segment_tokens(ts, num_slots)
    x = torch.randn(num_tokens, 2200, dtype=dtype, device=device)
    base = torch.randn(num_tokens, 300, dtype=dtype, device=device)
    expected = base.float() + reference(x, slots, 0, ["down_proj"], ts)
    nb = seg.blocks.shape[1]
    for shrink_programs, expand_programs in [(1, 1), (10_000, 10_000), (3 * nb, 2), (4 * nb, 2 * nb)]:
        shrunk = bgmv_shrink(x, slots.a_group[0]["down"], seg, 1, max_rank, shrink_programs)
        assert shrunk.shape[0] == {1: 1, 10_000: 16, 3 * nb: 2, 4 * nb: 4}[shrink_programs]
        out = base.clone()
        bgmv_expand_add(shrunk, slots.b_group[0]["down"], seg, out, [300], 0, max_rank, expand_programs)
        assert_close(out, expected, dtype)


def segments_without_base_blocks(ts: torch.Tensor) -> SlotSegments:
    """Blocks of adapter tokens only, shuffled, plus an unused one: the form of segments built on the host."""
    slots = ts.cpu().numpy()
    order = np.argsort(np.where(slots < 0, slots.max() + 1, slots), kind="stable")
    blocks = [(0, 0, 0)]  # length 0: unused
    for s in np.unique(slots[slots >= 0]):
        first, count = int(np.argmax(slots[order] == s)), int(np.count_nonzero(slots == s))
        blocks += [(s, first + j, min(BLOCK_M, count - j)) for j in range(0, count, BLOCK_M)]
    table = np.array(blocks, dtype=np.int32)[np.random.default_rng(0).permutation(len(blocks))].T
    return SlotSegments(
        torch.from_numpy(order.astype(np.int32)).to(ts.device), torch.from_numpy(table.copy()).to(ts.device)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_tokens", [37, 3000])
def test_segments_without_base_blocks(device: torch.device, dtype: torch.dtype, num_tokens: int) -> None:
    """Prefill-sized steps with no blocks for base tokens: adapter tokens get their deltas, base rows stay."""
    max_rank, num_slots = 16, 4
    slots = random_slots(num_slots, max_rank, dtype, device)
    ts = token_slots(num_tokens, num_slots, device)
    seg = segments_without_base_blocks(ts)
    modules = list(slots.groups["qkv"])
    x = torch.randn(num_tokens, 256, dtype=dtype, device=device)
    base = torch.randn(num_tokens, 344, dtype=dtype, device=device)
    shrunk = bgmv_shrink(x, slots.a_group[0]["qkv"], seg, 3, max_rank)
    out = base.clone()
    bgmv_expand_add(shrunk, slots.b_group[0]["qkv"], seg, out, [200, 72, 72], 0, max_rank)
    assert_close(out, base.float() + reference(x, slots, 0, modules, ts), dtype)
    assert torch.equal(out[ts < 0], base[ts < 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_lora_kernels_equal_dense_path(device: torch.device, dtype: torch.dtype) -> None:
    """Fused q|k|v output (one expand launch) and separate outputs (one each) both match the dense math."""
    slots = random_slots(16, 16, dtype, device)
    ts = token_slots(100, 16, device)
    kernels = LoraBatch.segmented(slots, ts)
    dense = LoraBatch.dense(slots, ts)
    assert kernels.segments is not None and dense.token_slots is not None
    x = torch.randn(100, 256, dtype=dtype, device=device)
    fused = torch.randn(100, 344, dtype=dtype, device=device)
    want = add_lora(x, [p.clone() for p in fused.split([200, 72, 72], dim=1)], 1, "qkv", dense)
    got_fused = add_lora(x, list(fused.clone().split([200, 72, 72], dim=1)), 1, "qkv", kernels)
    got_apart = add_lora(x, [p.clone() for p in fused.split([200, 72, 72], dim=1)], 1, "qkv", kernels)
    for w, f, a in zip(want, got_fused, got_apart, strict=True):
        assert_close(f, w.float(), dtype)
        assert_close(a, w.float(), dtype)


def test_cuda_graph_capture_and_replay(device: torch.device) -> None:
    """Slots, shrink and expand captured once replay correctly for other token slots written in place."""
    dtype, num_slots, max_rank, num_tokens = torch.bfloat16, 16, 16, 256
    slots = random_slots(num_slots, max_rank, dtype, device)
    ts = token_slots(num_tokens, num_slots, device)
    x = torch.randn(num_tokens, 256, dtype=dtype, device=device)
    base = torch.randn(num_tokens, 344, dtype=dtype, device=device)
    out = base.clone()

    def step() -> None:
        out.copy_(base)
        lora = LoraBatch.for_tokens(slots, ts)  # the Triton kernels: 256 tokens on CUDA
        add_lora(x, list(out.split([200, 72, 72], dim=1)), 0, "qkv", lora)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    modules = ["q_proj", "k_proj", "v_proj"]
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        ts.copy_(torch.randint(-1, num_slots, (num_tokens,), generator=gen))
        x.copy_(torch.randn(num_tokens, 256, generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, base.float() + reference(x, slots, 0, modules, ts), dtype)
        assert torch.equal(out[ts < 0], base[ts < 0])
