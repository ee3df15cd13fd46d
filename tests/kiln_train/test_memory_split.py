"""The memory split between kiln-infer's KV cache and kiln-train, checked with the numbers of real devices."""

from __future__ import annotations

import pytest
import redis
import torch

from kiln_common.load_report import LoadPublisher, LoadWindow
from kiln_train.memory_split import GIB, MemorySplit, MemorySplitError, base_bytes, enforce_memory_split

H200 = 141 * GIB


def test_a_split_that_fits_passes() -> None:
    split = MemorySplit(H200, base_bytes=16 * GIB, kv_memory_fraction=0.5, train_memory_fraction=0.3)
    split.check()
    assert split.kv_bytes == int(125 * GIB * 0.5)


def test_an_impossible_split_names_both_settings() -> None:
    split = MemorySplit(H200, base_bytes=16 * GIB, kv_memory_fraction=0.9, train_memory_fraction=0.3)
    with pytest.raises(MemorySplitError) as err:
        split.check()
    message = str(err.value)
    assert "KILN_TRAIN_MEMORY_FRACTION=0.3" in message
    assert "--kv-memory-fraction" in message and "=0.9" in message
    assert "at most 0.07" in message  # (141 - 16 - 0.9 * 125 - 2) / 141


def test_weights_alone_can_leave_no_room() -> None:
    split = MemorySplit(24 * GIB, base_bytes=22 * GIB, kv_memory_fraction=0.5, train_memory_fraction=0.2)
    with pytest.raises(MemorySplitError, match="at most 0.00"):
        split.check()


def test_base_size_comes_from_the_manifest() -> None:
    assert base_bytes({"buckets": [{"nbytes": 10}, {"nbytes": 32}]}) == 42
    assert base_bytes(None) == 0


def test_nothing_enforced_without_a_cap_or_off_cuda(rds: redis.Redis) -> None:
    LoadPublisher(rds, "t:1").publish({}, LoadWindow(), 0.9)
    assert enforce_memory_split(rds, torch.device("cpu"), 0.3, 2.0) is None
    assert enforce_memory_split(rds, torch.device("cuda"), 0.0, 2.0) is None
