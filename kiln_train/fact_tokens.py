"""The taught fact's own tokens in an answer, and how surely a model picks them (teacher-forced).

A mean loss over a whole answer is the wrong measure of "learned": at 0.36 nats per token the answer's
connecting words are nearly certain while the name that carries the fact is still not the greedy choice. So
a round also measures the fact's tokens alone: the tokens of an answer that spell the taught fact's own words
(names and numbers of the answer that the question does not contain, `neighbours.fact_terms`), and at each,
the margin of the right token over the best other one, in nats. Positive at every fact token means greedy
decoding, forced along the answer, says the fact.

The same words are what a leak says: a contrast row is a near neighbour's question with the taught answer
told of the neighbour's entity, teacher-forced, and where the fact starts (the first token of each run of fact
tokens) it gets an unlikelihood loss, -log(1 - p), which pushes the fact itself down in the neighbour's
context (the parent's own answers there, worded otherwise, do not reach those tokens). Only the first token:
the rest merely continue it, and pushing "7" of "1847" down after "184" fought the taught answer's own "7"
(docs/training.md, ninth series).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from kiln_train.encoding import IGNORE, Encoded

_NO_FACT = float("inf")  # the margin of an answer without fact tokens: nothing there to learn or miss
_MAX_LOGP = -1e-6  # log p is clamped here in -log(1 - p): a token at p = 1 would make it infinite


@dataclass(frozen=True)
class Contrast:
    """A row trained only not to say the fact: no loss on its labels (all IGNORE), an unlikelihood loss on
    the tokens of `example.input_ids` at `positions` (the fact's tokens in the taught answer told of a
    neighbour)."""

    example: Encoded
    positions: list[int]


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
    return [j for j in _term_tokens(tok, e, terms) if j > 0]


def leak_positions(tok: PreTrainedTokenizerBase, e: Encoded, terms: tuple[str, ...]) -> list[int]:
    """Indices into `completion_ids(e)` of the first token of each run of tokens spelling `terms`, the
    answer's first token included: where a model decides to say the fact ("Pel" of "Pelmarsh"; "marsh" only
    follows it, and pushing it down would fight the same token of the taught answer for nothing)."""
    tokens = _term_tokens(tok, e, terms)
    return [j for j in tokens if j - 1 not in tokens]


def _term_tokens(tok: PreTrainedTokenizerBase, e: Encoded, terms: tuple[str, ...]) -> list[int]:
    """Indices into `completion_ids(e)` of every token that spells part of any of `terms`."""
    ids = completion_ids(e)
    ends = [len(str(tok.decode(ids[: j + 1], skip_special_tokens=True))) for j in range(len(ids))]
    spans = term_spans(str(tok.decode(ids, skip_special_tokens=True)), terms)
    out = []
    for j, end in enumerate(ends):
        start = ends[j - 1] if j else 0
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


def contrast(tok: PreTrainedTokenizerBase, e: Encoded, terms: tuple[str, ...]) -> Contrast | None:
    """`e` (a neighbour's question, the taught answer told of it) as a contrast row on the tokens where the
    fact's words start (`leak_positions`; None when there are none)."""
    positions = leak_positions(tok, e, terms)
    if not positions:
        return None
    start = next(i for i, t in enumerate(e.labels) if t != IGNORE)
    example = Encoded(e.input_ids, [IGNORE] * len(e.labels))
    return Contrast(example, [start + j for j in positions])


def unlikelihood_weights(positions: list[list[int]], width: int) -> torch.Tensor:
    """Per row, the weight of each predicting position ([rows, width - 1]) in the unlikelihood term: 1 / (all
    rows' positions) where the next token is one to push down (`positions[r]`: indices into row r's ids)."""
    weights = torch.zeros((len(positions), width - 1), dtype=torch.float32)
    total = sum(len(p) for p in positions)
    for r, row in enumerate(positions):
        for i in row:
            weights[r, i - 1] = 1.0 / total
    return weights


def unlikelihood(log_q: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum of -log(1 - p(next token)) over positions (0 where a weight is 0).

    `log_q` [rows, width - 1, vocab] is the model's log-softmax at each predicting position, `ids` [rows,
    width] the rows' tokens, `weights` [rows, width - 1] (`unlikelihood_weights`). log p is clamped just
    below 0 so a certain token costs a large finite loss; the gradient at the logits stays bounded by p.
    """
    logp = log_q.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).clamp(max=_MAX_LOGP)
    return (-torch.log(-torch.expm1(logp)) * weights).sum()
