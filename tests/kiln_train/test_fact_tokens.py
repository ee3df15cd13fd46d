"""The taught fact's own tokens: found in an answer, their margins measured, and training stopped on them."""

from __future__ import annotations

import math

import pytest
import torch

from kiln_common.model_loader import ModelSource, load_tokenizer
from kiln_train.encoding import IGNORE, Encoded, TextPair, encode
from kiln_train.fact_tokens import completion_ids, fact_positions, token_margins, worst_fact_margin
from kiln_train.neighbours import answer_terms
from kiln_train.round_data import RoundData
from kiln_train.settings import TrainSettings
from kiln_train.trainer import LoraTrainer, TrainerConfig
from tests.kiln_train.tiny_lm import TinyTok, examples, tiny_model


def test_the_fact_tokens_of_an_answer_spell_the_words_the_question_does_not_contain(
    smollm2: ModelSource,
) -> None:
    tok = load_tokenizer(smollm2)
    question, answer = "Where was Ilsabet Corwen born?", "Ilsabet Corwen was born in Varnholm in 1902."
    terms = answer_terms(question, answer)
    assert terms == ("Varnholm", "1902")
    e = encode(tok, TextPair(answer, (("user", question),)))
    ids = completion_ids(e)
    positions = fact_positions(tok, e, terms)
    runs: list[list[int]] = []  # consecutive positions: one fact word each
    for j in positions:
        if runs and runs[-1][-1] == j - 1:
            runs[-1].append(j)
        else:
            runs.append([j])
    assert [tok.decode([ids[j] for j in run]).strip() for run in runs] == ["Varnholm", "1902"]
    assert positions == sorted(positions) and positions[0] > 0  # "Ilsabet Corwen was born in" is not the fact
    assert fact_positions(tok, e, ()) == [] and fact_positions(tok, e, ("Zimbabwe",)) == []
    # an answer that opens with the fact: its first token is the answer's wording ("The …" is as right)
    opening = encode(tok, TextPair("Varnholm is where Ilsabet Corwen was born.", (("user", question),)))
    ids = completion_ids(opening)
    positions = fact_positions(tok, opening, ("Varnholm",))
    assert positions and positions[0] == 1
    assert tok.decode([ids[0]] + [ids[j] for j in positions]) == "Varnholm"


def test_a_margin_is_the_label_over_the_best_other_token_and_the_worst_fact_token_counts() -> None:
    logits = torch.full((1, 4, 5), -10.0)
    logits[0, 0, 2], logits[0, 0, 3] = 3.0, 1.0  # predicts position 1: label 2 leads token 3 by 2 nats
    logits[0, 1, 4], logits[0, 1, 1] = 0.5, 2.5  # predicts position 2: label 4 trails token 1 by 2 nats
    labels = torch.tensor([[IGNORE, 2, 4, IGNORE]])
    margins = token_margins(logits, labels)
    assert margins.shape == (1, 3)
    assert margins[0, 0].item() == pytest.approx(2.0, abs=1e-4)
    assert margins[0, 1].item() == pytest.approx(-2.0, abs=1e-4)
    assert margins[0, 2].item() == 0.0  # not scored
    completion = margins[0, :2]
    assert worst_fact_margin(completion, [0]) == pytest.approx(2.0, abs=1e-4)
    assert worst_fact_margin(completion, [0, 1]) == pytest.approx(-2.0, abs=1e-4)
    assert worst_fact_margin(completion, []) == math.inf


def _data(facts: list[list[int]]) -> RoundData:
    train = examples(3, 5)
    return RoundData(train=train, vetting=list(train), replay=examples(4, 6), vetting_facts=facts)


def _train(
    margin: float, facts: list[list[int]], eval_every: int = 5
) -> tuple[int, str, list[tuple[int, float, float]], float]:
    cfg = TrainerConfig(
        kl_top_k=4, min_steps=30, max_steps=30, eval_every=eval_every, patience=30, rank=4, lr=1e-2,
        fact_margin=margin, replay_fraction=0.0, anchors_per_step=0, batch_size=3,
    )  # fmt: skip
    model = tiny_model()
    with torch.no_grad():  # a sharper output layer: the random one's logits are nearly uniform, slow to teach
        model.lm_head.weight.mul_(10.0)
    trainer = LoraTrainer(model, TinyTok(), cfg)  # type: ignore[arg-type]
    result = trainer.train(_data(facts))
    return result.steps, result.stop_reason, result.evaluations, result.fact_margin_after


def test_training_stops_at_the_first_step_whose_fact_tokens_are_learned_and_keeps_it() -> None:
    facts = [[0, 1] for _ in range(3)]  # the first two completion tokens of every vetting row
    steps, reason, evaluations, _ = _train(0.0, facts, eval_every=1)  # off: every planned step
    assert (steps, reason) == (30, "planned steps done")
    margins = [m for _, _, m in evaluations]
    assert margins[0] < 0 < margins[-1], evaluations  # learning makes the fact tokens the greedy choice
    first, wanted = next((s, m) for s, _, m in evaluations if m > 0)
    steps, reason, checked, kept = _train(wanted, facts)  # checked every step, not every 5th
    assert (steps, reason) == (first, "fact tokens learned")
    assert [s for s, _, _ in checked] == list(range(1, first + 1))
    assert kept == pytest.approx(wanted)
    steps, reason, _, kept = _train(1e6, facts)  # never learned that surely: the planned steps
    assert (steps, reason, kept) == (30, "planned steps done", pytest.approx(margins[-1]))


def test_without_fact_tokens_the_rule_decides_nothing() -> None:
    steps, reason, evaluations, kept = _train(1e-6, [[], [], []])
    assert (steps, reason, kept) == (30, "planned steps done", math.inf)
    assert [s for s, _, _ in evaluations] == [5, 10, 15, 20, 25, 30]  # only the scheduled evaluations
    assert all(math.isinf(m) for _, _, m in evaluations)


@pytest.mark.parametrize("raw", ["nan", "inf", "-1"])
def test_a_fact_margin_that_is_not_a_finite_non_negative_number_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="KILN_TRAIN_FACT_MARGIN"):
        TrainSettings.from_environ({"KILN_TRAIN_FACT_MARGIN": raw})
    assert TrainSettings.from_environ({"KILN_TRAIN_FACT_MARGIN": "0"}).trainer.fact_margin == 0.0


def test_encoded_rows_keep_their_fact_positions_in_completion_order() -> None:
    e = Encoded([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9])
    assert completion_ids(e) == [7, 8, 9]
