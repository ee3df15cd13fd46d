"""The divergence from the parent: zero for the parent itself, growing as the candidate moves away."""

from __future__ import annotations

import torch

from kiln_train.distillation import ParentTargets, divergence
from kiln_train.encoding import IGNORE


def _targets(logits: torch.Tensor, labels: torch.Tensor, k: int) -> ParentTargets:
    pos = (labels[1:] != IGNORE).nonzero().squeeze(-1)
    top = torch.log_softmax(logits[pos], dim=-1).topk(k, dim=-1)
    return ParentTargets(top.indices, top.values)


def test_divergence_is_zero_for_the_parent_and_grows_with_drift() -> None:
    gen = torch.Generator().manual_seed(0)
    parent = torch.randn(2, 6, 50, generator=gen)  # [batch, seq, vocab]
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, 5, 6], [IGNORE, 7, 8, IGNORE, IGNORE, IGNORE]])
    targets: list[ParentTargets | None] = [_targets(parent[0], labels[0], 8), None]
    same = divergence(parent, labels, targets)
    assert same is not None and abs(float(same)) < 1e-5
    small = divergence(parent + 0.1 * torch.randn(2, 6, 50, generator=gen), labels, targets)
    large = divergence(parent + 2.0 * torch.randn(2, 6, 50, generator=gen), labels, targets)
    assert small is not None and large is not None and 0 < float(small) < float(large)
    assert divergence(parent, labels, [None, None]) is None  # no row to stay near
