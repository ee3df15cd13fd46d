"""The taught fact's own tokens in an answer, and how surely a model picks them (teacher-forced).

A mean loss over a whole answer is the wrong measure of "learned": at 0.36 nats per token the answer's
connecting words are nearly certain while the name that carries the fact is still not the greedy choice. So
a round also measures the fact's tokens alone: the tokens of an answer that spell the taught fact's own words
(names and numbers of the answer that the question does not contain, `neighbours.fact_terms`), and at each,
the margin of the right token over the best other one, in nats. Positive at every fact token means greedy
decoding, forced along the answer, says the fact.
"""

from __future__ import annotations

import re

import torch
from transformers import PreTrainedTokenizerBase

from kiln_train.encoding import IGNORE, Encoded

_NO_FACT = float("inf")  # the margin of an answer without fact tokens: nothing there to learn or miss


def completion_ids(e: Encoded) -> list[int]:
    """The token ids the loss is on (the completion, with its end-of-turn tokens if any)."""
    return [t for t in e.labels if t != IGNORE]


def term_spans(text: str, terms: tuple[str, ...]) -> list[tuple[int, int]]:
    """Character spans of the terms in `text`, as whole words (case-insensitive)."""
    spans: list[tuple[int, int]] = []
    for term in terms:
        if term:
            pattern = rf"(?<!\w){re.escape(term)}(?!\w)"
            spans += [m.span() for m in re.finditer(pattern, text, flags=re.IGNORECASE)]
    return spans


def fact_positions(tok: PreTrainedTokenizerBase, e: Encoded, terms: tuple[str, ...]) -> list[int]:
    """Indices into `completion_ids(e)` of the tokens that spell any of `terms` (none: []).

    The answer's first token is left out even when it starts a fact word ("Mirel Dastova is the founder…"):
    there the model chooses how to word the answer ("The founder is…" is as right), not the fact.
    """
    ids = completion_ids(e)
    ends = [len(str(tok.decode(ids[: j + 1], skip_special_tokens=True))) for j in range(len(ids))]
    spans = term_spans(str(tok.decode(ids, skip_special_tokens=True)), terms)
    out = []
    for j in range(1, len(ids)):
        start, end = ends[j - 1], ends[j]
        if end > start and any(a < end and start < b for a, b in spans):
            out.append(j)
    return out


def token_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per position: log-probability of the label minus the best other token's, [batch, seq - 1].

    `logits` [batch, seq, vocab] predict the next token; `labels` [batch, seq] (IGNORE where not scored:
    those positions get 0). Positive where greedy decoding picks the label.
    """
    shifted = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [batch, seq - 1, vocab]
    target = shifted.clamp(min=0).unsqueeze(-1)
    picked = logp.gather(-1, target).squeeze(-1)
    rivals = logp.scatter(-1, target, float("-inf")).max(dim=-1).values
    return torch.where(shifted != IGNORE, picked - rivals, torch.zeros_like(picked))


def worst_fact_margin(margins: torch.Tensor, positions: list[int]) -> float:
    """The smallest margin among an answer's fact tokens (`margins`: its completion tokens' margins)."""
    chosen = [margins[j] for j in positions if j < margins.numel()]
    return float(torch.stack(chosen).min()) if chosen else _NO_FACT
