"""Held-out data of a round: a gate share and a separate vetting share, or paraphrases when samples are few.

With at least `min_heldout_samples` samples, two disjoint shares (by sample-id hash) are held out: one
for the gate's held-out loss, one for the vetting loss that picks the checkpoint and stops training. With
fewer, every sample is trained on and the round makes paraphrases of its own: the vetting set rewrites each
question with one family of templates, the gate set with another ("I was wondering: …"). These are surface
rewrites of the taught questions, so the gate's held-out loss then measures "the fact answers a reworded
question", not a new sample; the round records `heldout_paraphrased = 1` in its scores so nobody mistakes
one for the other. A training loss is never reported as a held-out loss.

In such a small round the vetting set also takes up to `vetting_rephrasings` phrasings of each question made
from its own answer (rephrase.py: "The Harlow Observatory was founded by whom?"), none of which is trained on.
Template rewrites keep the question's words, so a round judged on them alone called its facts learned while a
differently built question still drew an answer of the model's own (docs/training.md, sixteenth series).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kiln_train.encoding import TextPair
from kiln_train.neighbours import question_text
from kiln_train.pipeline import Example
from kiln_train.rephrase import question_key, rephrasings, reworded

VETTING_TEMPLATES = ("{q} Answer briefly.", "Quick question: {q}")
GATE_TEMPLATES = ("I was wondering: {q}", "{q} Please tell me.")


@dataclass(frozen=True)
class HeldOut:
    """The round's training samples, its vetting and gate held-out pairs, and where they came from."""

    train: list[Example]
    vetting: list[TextPair]
    gate: list[TextPair]
    vetting_ids: list[str]
    gate_ids: list[str]
    paraphrased: bool


def to_pair(e: Example) -> TextPair:
    """The trainer's view of an example."""
    return TextPair(e.completion, e.messages, e.prompt)


def pair_question(p: TextPair) -> str:
    """A pair's question: its last user turn, or its raw prompt."""
    users = [c for r, c in p.messages if r == "user"]
    return users[-1] if users else p.prompt


def paraphrase(e: Example, template: str) -> TextPair:
    """The example with its (last) question reworded by a template; same completion."""
    return reworded(e, template.format(q=question_text(e)))


def _rank(e: Example) -> str:
    return hashlib.sha256(e.sample_id.encode()).hexdigest()


def vetting_rephrasings(examples: list[Example], per_example: int, trained: int = 0) -> list[TextPair]:
    """Up to `per_example` answer-made phrasings of each question that the round does not train on (those
    `rephrasings(examples, trained)` makes are trained on, so they are left out here)."""
    seen = {question_key(pair_question(p)) for p in rephrasings(examples, trained)}
    return [p for p in rephrasings(examples, per_example) if question_key(pair_question(p)) not in seen]


def split(
    examples: list[Example],
    fraction: float,
    min_samples: int,
    rephrased: int = 0,
    trained_rephrasings: int = 0,
) -> HeldOut:
    """Gate and vetting shares of the samples (disjoint), or paraphrases when there are too few: then the
    vetting set also takes up to `rephrased` untrained answer-made phrasings of each question."""
    if len(examples) < min_samples or fraction <= 0:
        vet = [paraphrase(e, VETTING_TEMPLATES[i % 2]) for i, e in enumerate(examples)]
        vet += vetting_rephrasings(examples, rephrased, trained_rephrasings)
        gate = [paraphrase(e, GATE_TEMPLATES[i % 2]) for i, e in enumerate(examples)]
        return HeldOut(list(examples), vet, gate, [], [], paraphrased=True)
    ranked = sorted(examples, key=_rank)
    n = max(1, round(len(examples) * fraction))
    gate_ex, vet_ex = ranked[:n], ranked[n : 2 * n]
    held = {e.sample_id for e in gate_ex + vet_ex}
    return HeldOut(
        [e for e in examples if e.sample_id not in held],
        [to_pair(e) for e in vet_ex],
        [to_pair(e) for e in gate_ex],
        [e.sample_id for e in vet_ex],
        [e.sample_id for e in gate_ex],
        paraphrased=False,
    )
