"""The gate's general check that forgives near ties: a flip counts only when an answer token was lost."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kiln_train.gate import GateInputs, GateResult, decide, worst_token_drop
from kiln_train.prompt_sets import Question, anchor_checks
from kiln_train.settings import TrainSettings

QUESTIONS = (
    Question("What is 9 + 8?", ("17",)),
    Question("What is the capital of Australia?", ("Canberra",)),
    Question("What color is the sky?", ("blue",)),
)
PARENT = ("9 + 8 = 17.", "The capital of Australia is Canberra.", "The sky is blue.")
FLIP = TrainSettings(gate_general_scoring="flip", gate_flip_tolerance=1.0)


def _lp(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def _inputs(
    candidate: tuple[str, ...], parent_lp: list[torch.Tensor], cand_lp: list[torch.Tensor]
) -> GateInputs:
    return GateInputs(
        QUESTIONS,
        PARENT,
        candidate,
        heldout_before=3.0,
        heldout_after=1.0,
        parent_logprobs=tuple(parent_lp),
        candidate_logprobs=tuple(cand_lp),
    )


# "9 + 8 = 17." : the first token was a near tie for the parent ("9" -0.65 against "To" -0.75)
ARITHMETIC = _lp(-0.65, -0.1, -0.05, -0.02, -0.3, -0.01)
# "The capital of Australia is Canberra." : confident everywhere; the key token is the 6th
CAPITAL = _lp(-0.3, -0.05, -0.01, -0.01, -0.02, -0.2, -0.01)
SKY = _lp(-0.4, -0.1, -0.1, -0.2)


def test_the_worst_token_drop_is_the_largest_fall_never_a_gain() -> None:
    assert worst_token_drop(_lp(-0.1, -0.2, -0.3), _lp(-0.1, -2.7, -0.1)) == pytest.approx(2.5)
    assert worst_token_drop(_lp(-1.0, -2.0), _lp(-0.5, -0.5)) == 0.0  # more likely everywhere
    assert worst_token_drop(_lp(), _lp()) == 0.0  # no answer to judge (the parent had it wrong)


def test_a_near_tie_that_tipped_over_is_forgiven() -> None:
    # "9" fell from -0.65 to -0.85 and "To" won: the answer changed, the knowledge did not
    tipped = ARITHMETIC - _lp(0.2, 0.0, 0.05, 0.0, 0.1, 0.0)
    g = _inputs(
        ("To add 9 and 8, we can use", PARENT[1], PARENT[2]),
        [ARITHMETIC, CAPITAL, SKY],
        [tipped, CAPITAL, SKY],
    )
    verdict = decide(g, FLIP)
    assert verdict.passed, verdict.reason
    scores = verdict.scores
    assert (
        scores["gate_general_flipped"],
        scores["gate_general_forgiven"],
        scores["gate_general_broken"],
    ) == (1, 1, 0)
    assert scores["gate_general_kept"] == 3 and scores["gate_general_flip_drop_max"] == pytest.approx(0.2)
    assert not decide(
        g, TrainSettings(gate_general_scoring="exact")
    ).passed  # exact match rejects the same round


def test_one_collapsed_key_token_is_caught_where_the_mean_hides_it() -> None:
    # "Canberra" falls by 2.8 nats while every other token gets a little likelier: the mean moves < 0.5
    collapsed = CAPITAL + _lp(0.25, 0.04, 0.0, 0.0, 0.01, -2.8, 0.0)
    assert (CAPITAL.mean() - collapsed.mean()).item() < 0.5
    g = _inputs(
        (PARENT[0], "The capital of Australia is Sydney.", PARENT[2]),
        [ARITHMETIC, CAPITAL, SKY],
        [ARITHMETIC, collapsed, SKY],
    )
    loglik = TrainSettings(gate_general_scoring="loglik", gate_loglik_tolerance=0.5)
    assert decide(g, loglik).passed  # why a mean over the answer is not the default
    verdict = decide(g, FLIP)
    assert not verdict.passed and verdict.scores["gate_general_broken"] == 1
    assert (
        "gate set 'general'" in verdict.reason
        and "Australia" in verdict.reason
        and "(2.80)" in verdict.reason
    )


def test_a_flip_with_a_big_drop_counts_and_a_kept_answer_never_does() -> None:
    lost = ARITHMETIC - _lp(1.5, 0.2, 0.0, 0.0, 0.0, 0.0)
    faded_sky = SKY - _lp(0.0, 0.0, 0.0, 3.0)  # much less sure of "blue", but still says it
    g = _inputs(("It is 18.", PARENT[1], "Blue."), [ARITHMETIC, CAPITAL, SKY], [lost, CAPITAL, faded_sky])
    verdict = decide(g, FLIP)
    assert not verdict.passed and "What is 9 + 8?" in verdict.reason and "sky" not in verdict.reason
    assert "(0 other flips forgiven as near ties)" in verdict.reason
    scores = verdict.scores
    assert (scores["gate_general_flipped"], scores["gate_general_broken"], scores["gate_general_kept"]) == (
        1,
        1,
        2,
    )
    assert scores["gate_general_token_drop_max"] == pytest.approx(3.0)  # recorded, not judged
    assert decide(g, TrainSettings(gate_general_scoring="flip", gate_flip_tolerance=1.6)).passed


def test_the_tolerance_is_a_bound_in_nats_at_the_worst_token() -> None:
    drop = _lp(0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    g = _inputs(
        (PARENT[0], "It is Sydney.", PARENT[2]), [ARITHMETIC, CAPITAL, SKY], [ARITHMETIC, CAPITAL - drop, SKY]
    )
    assert decide(g, TrainSettings(gate_general_scoring="flip", gate_flip_tolerance=1.01)).passed
    assert not decide(g, TrainSettings(gate_general_scoring="flip", gate_flip_tolerance=0.99)).passed
    allowed = TrainSettings(gate_general_scoring="flip", gate_flip_tolerance=0.5, gate_max_general_broken=1)
    assert decide(g, allowed).passed


def test_flip_scoring_is_the_default_and_its_settings_are_checked() -> None:
    s = TrainSettings.from_environ({})
    assert (s.gate_general_scoring, s.gate_flip_tolerance) == ("flip", 1.0)
    s = TrainSettings.from_environ(
        {"KILN_TRAIN_GATE_GENERAL_SCORING": "exact", "KILN_TRAIN_GATE_FLIP_TOLERANCE": "0.7"}
    )
    assert (s.gate_general_scoring, s.gate_flip_tolerance) == ("exact", 0.7)
    for value in ("-0.1", "nan"):
        with pytest.raises(ValueError, match="KILN_TRAIN_GATE_FLIP_TOLERANCE must be >= 0"):
            TrainSettings.from_environ({"KILN_TRAIN_GATE_FLIP_TOLERANCE": value})
    with pytest.raises(ValueError, match="KILN_TRAIN_GATE_FLIP_TOLERANCE=.*abc"):
        TrainSettings.from_environ({"KILN_TRAIN_GATE_FLIP_TOLERANCE": "abc"})
    with pytest.raises(ValueError, match="exact, flip, loglik.*'Flip'"):
        TrainSettings(gate_general_scoring="Flip")


def test_a_trained_on_anchor_the_parent_had_right_must_stay_right() -> None:
    # the end-to-end run that motivated it: a published round answered an anchor with nonsense
    replay = [
        "What is the capital of France?",
        "Who wrote Hamlet?",
        "What is 2 + 2?",
        "What is the opposite of hot?",
    ]
    parent = ["The capital of France is Paris.", "Shakespeare.", "2 + 2 = 5.", "Cold."]  # "5": wrong already
    anchors, anchor_parent = anchor_checks(replay, parent)
    assert [q.prompt for q in anchors] == [replay[0], replay[2], replay[3]]  # "Hamlet" is replay, not anchor
    lp = [ARITHMETIC, CAPITAL, SKY]

    def gate(*answers: str, allowed: int = 0) -> GateResult:
        g = replace(
            _inputs(PARENT, lp, lp),
            anchors=anchors,
            anchor_parent_answers=anchor_parent,
            anchor_answers=answers,
        )
        return decide(g, replace(FLIP, gate_max_anchors_broken=allowed))

    kept = gate("Paris is the capital.", "It is 4.", "The opposite of hot is cold.")
    assert (
        kept.passed and kept.scores["gate_anchors_parent_correct"] == 2
    )  # the parent's wrong one not judged
    broken = gate("L'Étoile, la Marseillaise, la femme", "4", "cold")
    assert not broken.passed and broken.scores["gate_anchors_broken"] == 1
    assert broken.reason.startswith("gate set 'anchors': 1 of 2") and "capital of France" in broken.reason
    assert gate("L'Étoile", "4", "cold", allowed=1).passed
