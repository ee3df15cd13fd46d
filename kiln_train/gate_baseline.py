"""The gate's "before" measures that depend only on the parent version, measured once per version.

The gate compares the candidate with its parent on generic text (next-token distributions, for the KL) and on
the parent's own answers to the general questions (per-token log-probabilities, for `flip` and `loglik`
scoring). Both depend on the parent's weights and its reference answers alone, not on the round's samples, so
a round whose parent was measured before (every adapter's first round shares the base model's; kiln-train
measures it before its first round on a GPU) skips them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from kiln_train.answer_match import first_sentence
from kiln_train.encoding import Encoded, TextPair, encode
from kiln_train.evaluator import PromptSets, Reference, user
from kiln_train.prompt_sets import GENERIC_TEXTS
from kiln_train.trainer import LoraTrainer

Key = tuple[str, str, int, str]  # tenant, adapter, version, general scoring ("", "", 0, scoring: the base)


@dataclass(frozen=True)
class Baseline:
    """The parent's next-token log-probs on GENERIC_TEXTS, and on its general answers (`pairs`, see
    general_pairs), which the candidate is then measured on."""

    generic: list[torch.Tensor]
    general: tuple[torch.Tensor, ...]
    pairs: list[Encoded]


def general_pairs(
    tok: PreTrainedTokenizerBase, sets: PromptSets, reference: Reference, scoring: str
) -> list[Encoded]:
    """The gate's general questions with the parent's answers to teacher-force (none for "exact").

    "loglik": every whole answer; "flip": the first sentence of each right answer (what exact match judges),
    "" for a wrong one.
    """
    if scoring == "exact":
        return []
    pairs = []
    for q, a in zip(sets.gate, reference.gate, strict=True):
        if scoring == "flip":
            a = first_sentence(a) if q.is_correct(a) else ""
        pairs.append(encode(tok, TextPair(a, user(q.prompt), complete=False)))
    return pairs


def measure(trainer: LoraTrainer, pairs: list[Encoded]) -> Baseline:
    """The measures by the trainer's current weights (the candidate's "after" is measured the same way)."""
    generic = trainer.next_token_logprobs(list(GENERIC_TEXTS))
    return Baseline(generic, tuple(trainer.token_logprobs(pairs)), pairs)


class Baselines:
    """Measured baselines by parent version, the `keep` most recent (each holds a vocabulary-wide
    distribution per generic token: tens of MB on a large vocabulary)."""

    def __init__(self, keep: int = 2) -> None:
        self._keep = keep
        self._by_key: OrderedDict[Key, Baseline] = OrderedDict()

    @staticmethod
    def key(tenant: str, adapter: str, version: int, scoring: str) -> Key:
        """Version 0 is the base model, the same for every adapter."""
        return ("", "", 0, scoring) if version <= 0 else (tenant, adapter, version, scoring)

    def get(self, key: Key, trainer: LoraTrainer, pairs: Callable[[], list[Encoded]]) -> Baseline:
        """The baseline for `key`, measured now by `trainer` (at the parent's weights) if not yet."""
        found = self._by_key.get(key)
        if found is None:
            found = measure(trainer, pairs())
            self._by_key[key] = found
            while len(self._by_key) > self._keep:
                self._by_key.popitem(last=False)
        self._by_key.move_to_end(key)
        return found

    def __contains__(self, key: Key) -> bool:
        return key in self._by_key
