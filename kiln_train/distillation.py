"""The parent's next-token distributions on its own answers, and the candidate's divergence from them.

Replaying the parent's greedy answers (cross-entropy on one token per position) pins only the argmax; the
rest of the distribution drifts, and that drift is what later turns a right answer wrong. So the parent's
top-k distribution at every completion position of the replayed answers is kept at the start of a round,
and each step adds the candidate's divergence from it to the loss: the KL divergence over k + 1 outcomes,
the parent's top k tokens and "any other token" (semantics, per example with n completion tokens):

    p = exp(parent_topk_logp);  p_rest = 1 - sum_k p                       # [n, k], [n]
    q = exp(log_softmax(candidate_logits)[pos].gather(ids));  q_rest = 1 - sum_k q
    divergence = mean_n( sum_k p * log(p / q) + p_rest * log(p_rest / q_rest) )
                                                     # >= 0; 0 when the candidate matches the parent
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln_train.encoding import IGNORE, Encoded, collate


@dataclass(frozen=True)
class ParentTargets:
    """The parent's top-k next tokens at each completion position of one example."""

    ids: torch.Tensor  # [n_completion_tokens, k]
    logp: torch.Tensor  # [n_completion_tokens, k]


def completion_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a completion token (the logits that predict it). labels: [seq]."""
    return (labels[1:] != IGNORE).nonzero().squeeze(-1)


Logits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, attention_mask) -> logits


def model_logits(model: torch.nn.Module) -> Logits:
    """A model's eager forward pass as a `Logits` function."""
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


@torch.no_grad()
def parent_targets(
    logits_of: Logits, data: list[Encoded], k: int, pad_id: int, device: torch.device, batch_size: int = 8
) -> list[ParentTargets]:
    """The current model's top-k log-probabilities on each example's completion tokens."""
    out: list[ParentTargets] = []
    for i in range(0, len(data), batch_size):
        batch = collate(data[i : i + batch_size], pad_id, device)
        logits = logits_of(batch["input_ids"], batch["attention_mask"])
        for row, labels in zip(logits, batch["labels"], strict=True):
            pos = completion_positions(labels)
            logp = torch.log_softmax(row[pos].float(), dim=-1)  # [n, vocab]
            top = logp.topk(k, dim=-1)
            out.append(ParentTargets(top.indices, top.values))
    return out


def rest_mass(log_p: torch.Tensor) -> torch.Tensor:
    """Probability of every token outside the k given ones, [n] (kept above 0 for the logarithm)."""
    return (1.0 - log_p.exp().sum(-1)).clamp(min=1e-6)


def divergence(
    logits: torch.Tensor, labels: torch.Tensor, targets: list[ParentTargets | None]
) -> torch.Tensor | None:
    """Mean divergence from the parent over the rows that have targets (None when no row has).

    logits: [batch, seq, vocab] of a collated batch; labels: [batch, seq]; targets: one per row.
    """
    terms: list[torch.Tensor] = []
    for row, row_labels, target in zip(logits, labels, targets, strict=True):
        if target is None:
            continue
        pos = completion_positions(row_labels)
        n = min(len(pos), target.ids.shape[0])
        if n == 0:
            continue
        log_q = torch.log_softmax(row[pos[:n]].float(), dim=-1).gather(-1, target.ids[:n])  # [n, k]
        log_p = target.logp[:n]
        p_rest = rest_mass(log_p)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1) + p_rest * (p_rest.log() - rest_mass(log_q).log())
        terms.append(kl.mean())
    return torch.stack(terms).mean() if terms else None
