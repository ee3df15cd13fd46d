"""The batched LoRA computation equals the per-slot reference loop; slots and the LRU behave."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln_infer.kernels.backend import TORCH_KERNELS, TRITON_KERNELS, Kernels
from kiln_infer.lora.adapter_manager import AdapterManager
from kiln_infer.lora.errors import AdapterLoadError
from kiln_infer.lora.layers import (
    LoraBatch,
    LoraSlots,
    add_lora,
    columns_side_by_side,
    lora_delta_reference,
)
from kiln_infer.lora.peft_loader import LoraWeights, load_peft_adapter
from kiln_infer.lora.random_adapter import write_random_adapter
from tests.kiln_infer.lora.test_peft_loader import CONFIG

SHAPES = {
    "q_proj": (32, 32),
    "k_proj": (32, 16),
    "v_proj": (32, 16),
    "o_proj": (32, 32),
    "gate_proj": (32, 64),
    "up_proj": (32, 64),
    "down_proj": (64, 32),
}


def cpu_slots(num_slots: int, kernels: Kernels = TORCH_KERNELS) -> LoraSlots:
    """Two layers of fp32 CPU slots of rank 8 for SHAPES."""
    return LoraSlots(2, SHAPES, num_slots, 8, torch.float32, torch.device("cpu"), kernels)


def adapter(tmp_path: Path, name: str, rank: int, seed: int) -> LoraWeights:
    """A random adapter of CONFIG's shape."""
    return load_peft_adapter(name, write_random_adapter(tmp_path / name, CONFIG, rank=rank, seed=seed), 8)


def test_batched_delta_equals_reference_with_mixed_ranks(tmp_path: Path) -> None:
    slots = cpu_slots(3)
    for slot, (rank, seed) in enumerate([(2, 0), (8, 1), (5, 2)]):
        slots.load(slot, adapter(tmp_path, f"a{slot}", rank, seed))
    token_slots = torch.tensor([-1, 0, 2, 2, 1, -1, 0, 1])
    x = torch.randn(8, 64)
    a, b = slots.a[1]["down_proj"], slots.b[1]["down_proj"]
    fast = add_lora(x, [torch.zeros(8, 32)], 1, "down", LoraBatch.dense(slots, token_slots))[0]
    slow = lora_delta_reference(x, a, b, token_slots, max_rank=8)
    assert torch.allclose(fast, slow, atol=1e-6)
    assert fast[0].abs().max() == 0 and fast[1].abs().max() > 0
    # each row equals its own adapter's B @ A @ x
    w = adapter(tmp_path, "a2", 5, 2)
    assert torch.allclose(fast[2], w.b[(1, "down_proj")] @ (w.a[(1, "down_proj")] @ x[2]), atol=1e-6)


def test_in_use_slot_is_never_evicted(tmp_path: Path) -> None:
    slots = cpu_slots(2)
    manager = AdapterManager(slots, max_cpu_loras=3)
    a0, a1, a2 = (adapter(tmp_path, f"a{i}", 4, i) for i in range(3))
    s0, s1 = manager.acquire(a0), manager.acquire(a1)
    assert {s0, s1} == {0, 1}
    assert manager.acquire(a2) is None and not manager.can_acquire(a2.key)
    assert manager.acquire(a0) == s0  # already resident: shares the slot
    manager.release(s1)  # type: ignore[arg-type]
    assert manager.acquire(a2) == s1  # the free LRU slot is reused
    assert set(manager.resident()) == {a0.key, a2.key} and manager.refcounts()[s0] == 2  # type: ignore[index]


def test_host_cache_is_lru(tmp_path: Path) -> None:
    slots = cpu_slots(1)
    manager = AdapterManager(slots, max_cpu_loras=2)
    paths = [write_random_adapter(tmp_path / f"h{i}", CONFIG, rank=4, seed=i) for i in range(3)]
    first = manager.get_host("h0", paths[0])
    manager.get_host("h1", paths[1])
    assert manager.get_host("h0", paths[0]) is first  # a hit, no reload
    manager.get_host("h2", paths[2])  # evicts h1, the least recently used
    assert manager.host_keys() == ["h0", "h2"]


def test_adapter_for_another_model_is_refused(tmp_path: Path) -> None:
    slots = cpu_slots(1)
    manager = AdapterManager(slots, max_cpu_loras=2)
    wider = CONFIG.__class__(**{**CONFIG.to_dict(), "hidden_size": 48})
    path = write_random_adapter(tmp_path / "wide", wider, rank=4, seed=0)
    with pytest.raises(AdapterLoadError, match="does not fit the base model"):
        manager.get_host("t/wide@v1", path)
    deeper = CONFIG.__class__(**{**CONFIG.to_dict(), "num_hidden_layers": 3})
    with pytest.raises(AdapterLoadError, match="layer 2"):
        manager.get_host("t/deep@v1", write_random_adapter(tmp_path / "deep", deeper, rank=4, seed=0))
    assert manager.host_keys() == []


def test_grouped_b_and_ranks_follow_load(tmp_path: Path) -> None:
    """The kernels read b_group and ranks: load fills them through the per-module views."""
    slots = cpu_slots(2)
    slots.load(1, adapter(tmp_path, "a5", 5, 3))
    assert slots.ranks.tolist() == [0, 5] and slots.host_ranks == [0, 5]
    slots.load(1, adapter(tmp_path, "a2", 2, 4))  # a slot reused by a smaller adapter
    assert slots.ranks.tolist() == [0, 2] and slots.host_ranks == [0, 2]
    assert slots.a[1]["k_proj"][8 + 2 : 16].abs().max() == 0  # the old adapter's rows past rank 2 are gone
    qkv = slots.b_group[1]["qkv"]  # [32 + 16 + 16, S*R]: q's rows, then k's, then v's
    assert torch.equal(qkv[32:48], slots.b[1]["k_proj"]) and qkv[32:48, 8:13].abs().max() > 0
    assert qkv.untyped_storage().data_ptr() == slots.b[1]["v_proj"].untyped_storage().data_ptr()


def test_dense_add_lora_into_fused_output(tmp_path: Path) -> None:
    """add_lora adds in place into column views of one fused q|k|v output, as the reference says."""
    slots = cpu_slots(3, TRITON_KERNELS)
    for slot, (rank, seed) in enumerate([(2, 0), (8, 1), (5, 2)]):
        slots.load(slot, adapter(tmp_path, f"a{slot}", rank, seed))
    token_slots = torch.tensor([-1, 0, 2, 2, 1, -1, 0, 1])
    lora = LoraBatch.for_tokens(slots, token_slots)  # CPU tensors: the torch path even with Triton kernels
    assert lora.rows is not None and lora.segments is None
    x, base = torch.randn(8, 32), torch.randn(8, 64)
    fused = base.clone()
    parts = add_lora(x, list(fused.split([32, 16, 16], dim=1)), 0, "qkv", lora)
    assert columns_side_by_side(parts) is not None
    want = [
        lora_delta_reference(x, slots.a[0][m], slots.b[0][m], token_slots, max_rank=8)
        for m in ("q_proj", "k_proj", "v_proj")
    ]
    assert torch.allclose(fused, base + torch.cat(want, dim=1), atol=1e-5)
    assert torch.equal(fused[0], base[0])


def test_columns_side_by_side_needs_one_storage() -> None:
    """Only column slices of one tensor count as one output, even when separate tensors touch in memory."""
    wide = torch.randn(4, 48)
    assert columns_side_by_side(list(wide.split([16, 32], dim=1))) is not None
    one_row = torch.randn(1, 48)
    assert columns_side_by_side(list(one_row.split([16, 32], dim=1))) is not None
    # separate storages never fuse, whatever their addresses
    assert columns_side_by_side([torch.randn(1, 16), torch.randn(1, 32)]) is None
    # slices that are not adjacent columns of the same rows
    assert columns_side_by_side([wide[:, :16], wide[:, 32:]]) is None


@pytest.mark.parametrize("form", ["rows", "gathered"])
def test_nan_adapter_never_reaches_other_rows(tmp_path: Path, form: str) -> None:
    """A slot full of NaN changes only its own tokens: other adapters' and base tokens stay exact."""
    slots = cpu_slots(3)
    slots.load(0, adapter(tmp_path, "good", 4, 0))
    slots.load(2, adapter(tmp_path, "other", 8, 1))
    for layer in range(2):  # slot 1: a NaN adapter that got in anyway
        for module in slots.a[layer]:
            slots.a[layer][module][8:16].fill_(float("nan"))
            slots.b[layer][module][:, 8:16].fill_(float("nan"))
    slots.ranks[1], slots.host_ranks[1] = 8, 8  # as `load` would record it
    token_slots = torch.tensor([-1, 0, 1, 2, 1, -1, 0])
    gathered = LoraBatch(slots, token_slots=token_slots)  # the CUDA-graph form, here on CPU
    lora = LoraBatch.dense(slots, token_slots) if form == "rows" else gathered
    x, base = torch.randn(7, 32), torch.randn(7, 64)
    out = torch.cat(add_lora(x, [p.clone() for p in base.split([32, 16, 16], dim=1)], 0, "qkv", lora), dim=1)
    bad = token_slots == 1
    assert out[bad].isnan().all() and out[~bad].isfinite().all()
    want = torch.cat(
        [
            lora_delta_reference(x[~bad], slots.a[0][m], slots.b[0][m], token_slots[~bad], max_rank=8)
            for m in ("q_proj", "k_proj", "v_proj")
        ],
        dim=1,
    )
    assert torch.allclose(out[~bad], base[~bad] + want, atol=1e-5)
    assert torch.equal(out[token_slots == -1], base[token_slots == -1])


def test_concurrent_misses_of_one_adapter_read_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    import kiln_infer.lora.adapter_manager as manager_module

    manager = AdapterManager(cpu_slots(2), max_cpu_loras=2)
    path = write_random_adapter(tmp_path / "burst", CONFIG, rank=4, seed=0)
    reads: list[str] = []

    def slow_read(key: str, p: Path, max_rank: int) -> LoraWeights:
        reads.append(key)
        time.sleep(0.2)  # a disk read: the other threads arrive while it is under way
        return load_peft_adapter(key, p, max_rank)

    monkeypatch.setattr(manager_module, "load_peft_adapter", slow_read)
    got: list[LoraWeights] = []

    def ask() -> None:
        got.append(manager.get_host("t/burst@v1", path))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert reads == ["t/burst@v1"] and len(got) == 8 and all(w is got[0] for w in got)

    def broken(*args: object) -> LoraWeights:
        raise OSError("disk gone")

    monkeypatch.setattr(manager_module, "load_peft_adapter", broken)
    with pytest.raises(OSError):
        manager.get_host("t/other@v1", path)  # a failed read raises to its caller and leaves nothing behind
    assert manager._reading == {} and manager.host_keys() == ["t/burst@v1"]
