"""Sampler: filtering equals a naive reference, seeded noise ignores the batch, penalties follow HF."""

from __future__ import annotations

import pytest
import torch

from kiln_infer.engine.sampler import (
    SamplingBatch,
    _candidates,
    apply_repetition_penalty,
    sample,
)
from kiln_infer.engine.types import SamplingParams
from kiln_infer.kernels.argmax import greedy_tokens
from kiln_infer.model.weights import fuse_if_adjacent


def naive_keep(logits: torch.Tensor, k: int, p: float) -> tuple[set[int], set[int]]:
    """Tokens a textbook top-k then top-p filter keeps for one row, and those within rounding of the edge."""
    order = logits.argsort(descending=True).tolist()
    if k > 0:
        order = order[:k]
    probs = logits[order].double().softmax(-1)
    keep, edge, mass = [], set(), 0.0
    for token, prob in zip(order, probs.tolist(), strict=True):
        if abs(mass - p) < 1e-5:
            edge.add(token)
        if mass > p and keep:
            continue
        keep.append(token)
        mass += prob
    return set(keep), edge


def test_filtering_matches_naive_reference() -> None:
    torch.manual_seed(0)
    peaked = torch.randn(3, 5000) * 4  # nucleus in the head: the fast path
    flat = torch.stack([torch.randperm(5000) for _ in range(3)]).float() * 1e-3  # past the head: full sort
    for logits in (peaked, flat):
        for k, p in ((0, 0.9), (20, 1.0), (50, 0.5), (0, 0.3)):
            values, ids = _candidates(logits, [k] * 3, [p] * 3)
            for row in range(3):
                kept = set(ids[row][values[row] > float("-inf")].tolist())
                expected, edge = naive_keep(logits[row], k, p)
                assert kept ^ expected <= edge


def test_seeded_sampling_ignores_batch_composition() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 1000)
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(4)]
    together = sample(logits.clone(), SamplingBatch(params, [0, 1, 2, 3], [5] * 4, [[]] * 4)).token_ids
    alone = [
        sample(logits[i : i + 1].clone(), SamplingBatch([params[i]], [i], [5], [[]])).token_ids[0]
        for i in range(4)
    ]
    assert together == alone
    draws = {
        sample(logits[:1].clone(), SamplingBatch(params[:1], [0], [step], [[]])).token_ids[0]
        for step in range(30)
    }
    assert len(draws) > 5  # the step changes the noise


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    params = [SamplingParams(temperature=1.0)]
    counts = torch.zeros(3)
    for step in range(3000):
        counts[sample(logits.clone(), SamplingBatch(params, [42], [step], [[]])).token_ids[0]] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_repetition_penalty_hf_semantics() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    apply_repetition_penalty(logits, [[0, 1, 1]], [2.0])
    assert logits.tolist() == [[1.0, -4.0, 1.0]]


def test_fused_views_only_for_adjacent_weights() -> None:
    storage = torch.randn(10, 4)
    q, k, v = storage[:6], storage[6:8], storage[8:]
    fused = fuse_if_adjacent([q, k, v])
    assert fused is not None and fused.data_ptr() == storage.data_ptr() and torch.equal(fused, storage)
    assert fuse_if_adjacent([q, torch.randn(2, 4), v]) is None
    assert fuse_if_adjacent([k, q]) is None


def test_two_level_argmax_matches_argmax_with_ties() -> None:
    """The chunked greedy path picks the first index of the maximum, like torch.argmax."""
    gen = torch.Generator().manual_seed(0)
    for vocab in (49152, 50000, 128256, 700, 37):
        logits = torch.randint(-3, 4, (5, vocab), generator=gen).float()  # many exact ties
        logits[1] = -1.0
        logits[2, -1] = 10.0  # the maximum in the tail after the last whole chunk
        logits[3, 0] = 10.0
        logits[3, -1] = 10.0  # a tie between the first and the last index
        assert torch.equal(greedy_tokens(logits, two_level=True), logits.argmax(dim=-1)), vocab
        assert torch.equal(greedy_tokens(logits.bfloat16(), two_level=True), logits.argmax(dim=-1)), vocab


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)")
def test_two_level_argmax_on_cuda_matches_argmax_with_ties() -> None:
    """The CUDA path (Triton when installed) keeps torch.argmax's first-index rule, also on strided rows."""
    gen = torch.Generator().manual_seed(1)
    for vocab in (128256, 49152, 4097, 37):
        logits = torch.randint(-3, 4, (6, vocab), generator=gen).float()
        logits[2, -1] = 10.0
        logits[3, 0] = 10.0
        logits[3, -1] = 10.0
        logits[4, 4096:] = 5.0  # ties across chunks: the first chunk holding the maximum wins
        expected = logits.argmax(dim=-1)
        for t in (logits.cuda(), logits.cuda().bfloat16(), torch.cat([logits, logits], 1).cuda()[:, :vocab]):
            assert torch.equal(greedy_tokens(t, two_level=True).cpu(), expected), vocab
