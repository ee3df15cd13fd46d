"""What a round learns from, with the parent's answers already in, as the token ids the trainer sees."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from kiln_train.encoding import IGNORE, Encoded, TextPair, encode, prompt_ids
from kiln_train.evaluator import Reference
from kiln_train.fact_tokens import contrast, fact_positions
from kiln_train.gate import Neighbour
from kiln_train.heldout import HeldOut, pair_question, to_pair
from kiln_train.neighbours import answer_terms
from kiln_train.prompt_sets import load_replay_general
from kiln_train.rephrase import rephrasings
from kiln_train.round_data import RoundData


@dataclass
class RoundPlan:
    """What a round learns from and is judged on, with the parent's answers already in."""

    held: HeldOut
    reference: Reference
    negatives: list[TextPair]
    gate_neighbours: list[Neighbour]
    # per negative: its question with the taught answer told of its entity, and the fact's words
    contrasts: list[tuple[TextPair, tuple[str, ...]]]
    # near neighbours the checkpoint vet asks (never trained on, never in the gate; checkpoint_vet.py)
    vetting_neighbours: list[Neighbour] = field(default_factory=list)


def round_data(
    tok: PreTrainedTokenizerBase,
    plan: RoundPlan,
    replay: list[Encoded],
    anchors: list[int],
    rephrasings_per_example: int,
    anchor_watch: list[Encoded] | None = None,
    null_space_questions: int = 0,
) -> RoundData:
    """Token ids of everything the trainer sees: new samples and their rephrasings (rephrase.py), vetting
    pairs, replay, negatives; and the first `null_space_questions` broad general questions' prompts (with an
    open assistant turn, no answer), which only the null-space measurement reads."""
    vetting = [encode(tok, p) for p in plan.held.vetting]
    samples = [to_pair(e) for e in plan.held.train]
    more = rephrasings(plan.held.train, rephrasings_per_example)
    return RoundData(
        train=[encode(tok, p) for p in samples + more],
        vetting=vetting,
        replay=replay,
        negatives=[encode(tok, p) for p in plan.negatives],
        anchors=anchors,
        vetting_facts=[
            fact_positions(tok, e, answer_terms(pair_question(p), p.completion))
            for e, p in zip(vetting, plan.held.vetting, strict=True)
        ],
        contrasts=[c for p, terms in plan.contrasts if (c := contrast(tok, encode(tok, p), terms))],
        samples=len(samples),
        anchor_watch=anchor_watch or [],
        null_space_rows=null_space_rows(tok, null_space_questions),
    )


def null_space_rows(tok: PreTrainedTokenizerBase, questions: int) -> list[Encoded]:
    """The first `questions` broad general questions as rows the null-space measurement reads."""
    return question_rows(tok, load_replay_general(questions)) if questions > 0 else []


def question_rows(tok: PreTrainedTokenizerBase, questions: tuple[str, ...]) -> list[Encoded]:
    """Each question as served (an open assistant turn, no answer), its labels marking what the null-space
    measurement reads: every token after the prefix all of them share (the template's system turn)."""
    ids = [prompt_ids(tok, TextPair("", (("user", q),))) for q in questions]
    shared = 0
    while ids and all(len(i) > shared + 1 and i[shared] == ids[0][shared] for i in ids):
        shared += 1
    return [Encoded(i, [IGNORE] * shared + i[shared:]) for i in ids]
