"""The checkpoint vet: a candidate checkpoint must keep the vetting questions the parent answered right.

It judges unsaved checkpoints mid-round, so it generates with kiln-train's own weights. A right answer that
turned wrong counts as a slip the way the gate counts its general questions: with `flip` scoring only when
some token of the parent's right first sentence lost more than the flip tolerance (teacher-forced, the
candidate against the start weights); a smaller flip is a near tie the parent itself barely won ("Great Red
Spot" → Neptune on SmolLM2), which would otherwise refuse every checkpoint of a round that learned anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kiln_train.answer_match import first_sentence
from kiln_train.encoding import TextPair, encode
from kiln_train.evaluator import user
from kiln_train.gate import worst_token_drop
from kiln_train.prompt_sets import Question
from kiln_train.settings import TrainSettings
from kiln_train.trainer import LoraTrainer

log = logging.getLogger(__name__)


def checkpoint_vet(
    trainer: LoraTrainer, questions: tuple[Question, ...], answers: tuple[str, ...], s: TrainSettings
) -> Callable[[], bool]:
    """A vet of the trainer's current weights; call it while they are still the parent's (it measures the
    parent's right answers then)."""
    kept = [(q, a) for q, a in zip(questions, answers, strict=True) if q.is_correct(a)]
    flip = s.gate_general_scoring == "flip"
    pairs = [
        encode(trainer.tok, TextPair(first_sentence(a), user(q.prompt), complete=False)) for q, a in kept
    ]
    before = trainer.token_logprobs(pairs) if flip else []

    def vetted() -> bool:
        now = trainer.generate([TextPair("", user(q.prompt)) for q, _ in kept], s.gate_max_tokens)
        wrong = [i for i, ((q, _), a) in enumerate(zip(kept, now, strict=True)) if not q.is_correct(a)]
        drops = [0.0] * len(kept)
        if flip and wrong:
            after = trainer.token_logprobs([pairs[i] for i in wrong])
            for i, a in zip(wrong, after, strict=True):
                drops[i] = worst_token_drop(before[i], a)
        slipped = [i for i in wrong if not flip or drops[i] > s.gate_flip_tolerance]
        for i in wrong:
            verdict = "slipped" if i in slipped else "forgiven as a near tie"
            log.info("vetting %s (-%.2f): %r -> %r", verdict, drops[i], kept[i][0].prompt, now[i][:80])
        return len(slipped) <= s.vet_max_slipped

    return vetted
