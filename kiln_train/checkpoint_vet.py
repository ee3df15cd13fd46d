"""The checkpoint vet: a candidate checkpoint must keep the vetting questions the parent answered right, and
must not answer the vetting neighbours with the taught fact.

It judges unsaved checkpoints mid-round, so it generates with kiln-train's own weights. A right answer that
turned wrong counts as a slip the way the gate counts its general questions: with `flip` scoring only when
some token of the parent's right first sentence lost more than the flip tolerance (teacher-forced, the
candidate against the start weights); a smaller flip is a near tie the parent itself barely won ("Great Red
Spot" → Neptune on SmolLM2), which would otherwise refuse every checkpoint of a round that learned anything.

Vetting neighbours are near neighbours of the taught questions made for the vet alone (another entity's
name in the same question; neighbours.py), never trained on and never asked by the gate. A candidate that
answers more than `vet_max_leaks` of them with the taught fact's words is refused, the way the gate would
refuse it for its own neighbours; `train_progress.pick` then keeps an earlier checkpoint only if that one
still says the facts.
"""

from __future__ import annotations

import logging

from kiln_train.answer_match import first_sentence
from kiln_train.encoding import TextPair, encode
from kiln_train.evaluator import user
from kiln_train.gate import Neighbour, worst_token_drop
from kiln_train.neighbours import gives_fact
from kiln_train.prompt_sets import Question
from kiln_train.settings import TrainSettings
from kiln_train.trainer import LoraTrainer

log = logging.getLogger(__name__)


class CheckpointVet:
    """A vet of the trainer's current weights; made while they are still the parent's (it measures the
    parent's right answers then). Calling it judges the current weights; `leaky` counts the
    candidates it found answering a vetting neighbour with the taught fact (general answers kept)."""

    def __init__(
        self,
        trainer: LoraTrainer,
        questions: tuple[Question, ...],
        answers: tuple[str, ...],
        s: TrainSettings,
        near: list[Neighbour] | None = None,
    ) -> None:
        self.trainer, self.s = trainer, s
        self.kept = [(q, a) for q, a in zip(questions, answers, strict=True) if q.is_correct(a)]
        # a neighbour the parent already answers with the fact's words can't tell a leak
        self.near = [n for n in near or [] if not gives_fact(n.parent_answer, n.fact_terms)]
        self.flip = s.gate_general_scoring == "flip"
        self.pairs = [
            encode(trainer.tok, TextPair(first_sentence(a), user(q.prompt), complete=False))
            for q, a in self.kept
        ]
        self.before = trainer.token_logprobs(self.pairs) if self.flip else []
        self.leaky = 0
        self.leaked = False  # the last call refused for a leak alone (train_progress.pick)

    def __call__(self) -> bool:
        asked = [TextPair("", user(q.prompt)) for q, _ in self.kept]
        asked += [TextPair("", user(n.prompt)) for n in self.near]
        answers = self.trainer.generate(asked, self.s.gate_max_tokens)
        now, near_answers = answers[: len(self.kept)], answers[len(self.kept) :]
        slipped = self._slipped(now)
        leaks = [
            (n.prompt, a) for n, a in zip(self.near, near_answers, strict=True) if gives_fact(a, n.fact_terms)
        ]
        for prompt, a in leaks:
            log.info("vetting neighbour leaked: %r -> %r", prompt, a[:80])
        kept = len(slipped) <= self.s.vet_max_slipped
        self.leaked = kept and len(leaks) > self.s.vet_max_leaks
        self.leaky += self.leaked
        return kept and not self.leaked

    def _slipped(self, now: list[str]) -> list[int]:
        """Indices of the kept questions whose right answer turned wrong by more than a near tie."""
        kept = self.kept
        wrong = [i for i, ((q, _), a) in enumerate(zip(kept, now, strict=True)) if not q.is_correct(a)]
        drops = [0.0] * len(kept)
        if self.flip and wrong:
            after = self.trainer.token_logprobs([self.pairs[i] for i in wrong])
            for i, a in zip(wrong, after, strict=True):
                drops[i] = worst_token_drop(self.before[i], a)
        slipped = [i for i in wrong if not self.flip or drops[i] > self.s.gate_flip_tolerance]
        for i in wrong:
            verdict = "slipped" if i in slipped else "forgiven as a near tie"
            log.info("vetting %s (-%.2f): %r -> %r", verdict, drops[i], kept[i][0].prompt, now[i][:80])
        return slipped
