"""The publish gate: general answers stay right, neighbours stay unaware, held-out loss improves, small KL.

The gate set is never trained on and never used to pick a checkpoint. Each check is named after its set, and a
rejection's reason names every set that failed ("gate set 'general': …"), so a harmful round says why. One
check looks at what was trained on: the anchor prompts the parent answered right must stay right ('anchors').
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kiln_train.neighbours import gives_fact
from kiln_train.prompt_sets import Question
from kiln_train.settings import TrainSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neighbour:
    """A near-neighbour question, the taught fact's words, and the parent's answer to it."""

    prompt: str
    fact_terms: tuple[str, ...]
    parent_answer: str


@dataclass
class GateInputs:
    """Everything the gate compares: parent and candidate answers, held-out losses, the KL on generic text."""

    questions: tuple[Question, ...]
    parent_answers: tuple[str, ...]
    candidate_answers: tuple[str, ...]
    neighbours: list[Neighbour] = field(default_factory=list)
    neighbour_answers: list[str] = field(default_factory=list)
    heldout_before: float = 0.0
    heldout_after: float = 0.0
    kl_generic: float = 0.0
    # Per general question, teacher-forced: the log-probability of each token of the parent's answer, by the
    # parent (the start weights) and by the candidate, [n_answer_tokens] each. "loglik" compares their means
    # over the whole answer (and needs no candidate answers); "flip" the worst token of a right answer's
    # first sentence; "exact" uses neither
    parent_logprobs: tuple[torch.Tensor, ...] = ()
    candidate_logprobs: tuple[torch.Tensor, ...] = ()
    # the anchor prompts (trained on: in no gate set) with their right answers, and the parent's and the
    # candidate's answers: an anchor the parent had right and the candidate has wrong means the guard failed
    anchors: tuple[Question, ...] = ()
    anchor_parent_answers: tuple[str, ...] = ()
    anchor_answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class GateResult:
    """Whether a trained version may be published, why not, and the scores recorded in meta.json."""

    passed: bool
    reason: str
    scores: dict[str, float]


def mean_kl(parent: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """Mean KL(parent || candidate) per token, from per-text log-probabilities [n_tokens, vocab]."""
    total, count = 0.0, 0
    for p, q in zip(parent, candidate, strict=True):
        total += float((p.exp() * (p - q)).sum())
        count += p.shape[0]
    return total / max(count, 1)


def _broken(
    questions: tuple[Question, ...], parent: tuple[str, ...], candidate: tuple[str, ...]
) -> tuple[list[int], int]:
    """Questions the parent answered right and the candidate does not; and how many the parent had right."""
    was = [q.is_correct(a) for q, a in zip(questions, parent, strict=True)]
    now = [q.is_correct(a) for q, a in zip(questions, candidate, strict=True)]
    return [i for i, (w, n) in enumerate(zip(was, now, strict=True)) if w and not n], sum(was)


def _broken_exact(g: GateInputs) -> tuple[list[int], int]:
    """`_broken` on the general questions."""
    return _broken(g.questions, g.parent_answers, g.candidate_answers)


def worst_token_drop(parent: torch.Tensor, candidate: torch.Tensor) -> float:
    """The largest fall, in nats, of one answer token's log-probability from parent to candidate (>= 0).

    One flipped key token ("Canberra" -> "Sydney") shows here even when the answer's mean hardly moves.
    """
    if parent.numel() == 0:
        return 0.0
    return max(0.0, float((parent - candidate).max()))


def _mean(logprobs: torch.Tensor) -> float:
    return float(logprobs.mean()) if logprobs.numel() else 0.0


_Judged = tuple[list[int], int, str, list[str]]  # broken questions, how many judged, what broke, examples


def _general_loglik(g: GateInputs, tolerance: float, scores: dict[str, float]) -> _Judged:
    """Questions whose parent answer the candidate finds less likely than the parent did, by > `tolerance`."""
    pairs = zip(g.parent_logprobs, g.candidate_logprobs, strict=True)
    drops = [_mean(before) - _mean(after) for before, after in pairs]
    broken = [i for i, d in enumerate(drops) if d > tolerance]
    scores["gate_general_loglik_drop_max"] = max(drops, default=0.0)
    shown = [f"{g.questions[i].prompt!r} ({drops[i]:.2f})" for i in broken[:5]]
    what = f"answers the candidate finds less likely than the parent (by > {tolerance} nats per token)"
    return broken, len(drops), what, shown


def _general_flip(g: GateInputs, tolerance: float, scores: dict[str, float]) -> _Judged:
    """Right answers now wrong whose worst token fell by > `tolerance`; smaller flips are forgiven as ties."""
    flipped, judged = _broken_exact(g)
    pairs = zip(g.parent_logprobs, g.candidate_logprobs, strict=True)
    drops = [worst_token_drop(before, after) for before, after in pairs]
    assert len(drops) == len(g.questions), "flip scoring needs every general question's log-probabilities"
    broken = [i for i in flipped if drops[i] > tolerance]
    for i in flipped:
        verdict = "broken" if i in broken else "forgiven as a near tie"
        log.info(
            "general %s (worst token -%.2f nats): %r -> %r",
            verdict,
            drops[i],
            g.questions[i].prompt,
            g.candidate_answers[i][:60],
        )
    scores.update(
        gate_general_flipped=float(len(flipped)),
        gate_general_forgiven=float(len(flipped) - len(broken)),
        gate_general_flip_drop_max=max((drops[i] for i in flipped), default=0.0),
        gate_general_token_drop_max=max(drops, default=0.0),
    )
    shown = [
        f"{g.questions[i].prompt!r} -> {g.candidate_answers[i][:60]!r} ({drops[i]:.2f})" for i in broken[:5]
    ]
    what = (
        f"questions the parent answered right are now wrong, with a token down by > {tolerance} nats "
        f"({len(flipped) - len(broken)} other flips forgiven as near ties)"
    )
    return broken, judged, what, shown


def _general(g: GateInputs, s: TrainSettings, scores: dict[str, float]) -> str:
    if s.gate_general_scoring == "loglik":
        broken, judged, what, shown = _general_loglik(g, s.gate_loglik_tolerance, scores)
    elif s.gate_general_scoring == "flip":
        broken, judged, what, shown = _general_flip(g, s.gate_flip_tolerance, scores)
    else:
        broken, judged = _broken_exact(g)
        what = "questions the parent answered right are now wrong"
        shown = [f"{g.questions[i].prompt!r} -> {g.candidate_answers[i][:60]!r}" for i in broken[:5]]
    scores.update(
        gate_general_questions=float(len(g.questions)),
        gate_general_parent_correct=float(judged),
        gate_general_kept=float(judged - len(broken)),
        gate_general_broken=float(len(broken)),
    )
    if len(broken) <= s.gate_max_general_broken:
        return ""
    return (
        f"gate set 'general': {len(broken)} of {judged} {what} "
        f"(allowed {s.gate_max_general_broken}): {'; '.join(shown)}"
    )


def _neighbours(g: GateInputs, s: TrainSettings, scores: dict[str, float]) -> str:
    leaks = [
        i
        for i, (n, a) in enumerate(zip(g.neighbours, g.neighbour_answers, strict=True))
        if gives_fact(a, n.fact_terms) and not gives_fact(n.parent_answer, n.fact_terms)
    ]
    scores.update(gate_neighbours=float(len(g.neighbours)), gate_neighbour_leaks=float(len(leaks)))
    if len(leaks) <= s.gate_max_neighbour_leaks:
        return ""
    detail = "; ".join(f"{g.neighbours[i].prompt!r} -> {g.neighbour_answers[i][:60]!r}" for i in leaks[:3])
    return f"gate set 'neighbours': {len(leaks)} near neighbours answered with the taught fact: {detail}"


def _anchors(g: GateInputs, s: TrainSettings, scores: dict[str, float]) -> str:
    broken, judged = _broken(g.anchors, g.anchor_parent_answers, g.anchor_answers)
    scores.update(gate_anchors_parent_correct=float(judged), gate_anchors_broken=float(len(broken)))
    if len(broken) <= s.gate_max_anchors_broken:
        return ""
    detail = "; ".join(f"{g.anchors[i].prompt!r} -> {g.anchor_answers[i][:60]!r}" for i in broken[:3])
    return f"gate set 'anchors': {len(broken)} of {judged} trained-on anchor answers now wrong: {detail}"


def decide(g: GateInputs, s: TrainSettings) -> GateResult:
    """Every set's check, every score; passes only when all sets pass."""
    scores: dict[str, float] = {
        "heldout_loss_before": g.heldout_before,
        "heldout_loss_after": g.heldout_after,
        "kl_generic": g.kl_generic,
    }
    failures = [_general(g, s, scores), _neighbours(g, s, scores), _anchors(g, s, scores)]
    if not g.heldout_after < g.heldout_before - s.min_heldout_improvement:
        failures.append(
            f"gate set 'heldout': loss did not improve ({g.heldout_before:.4f} -> {g.heldout_after:.4f})"
        )
    if g.kl_generic > s.gate_max_kl:
        failures.append(
            f"gate set 'kl': KL to the parent on generic text {g.kl_generic:.4f} > {s.gate_max_kl}"
        )
    failed = [f for f in failures if f]
    return GateResult(not failed, " | ".join(failed), scores)
