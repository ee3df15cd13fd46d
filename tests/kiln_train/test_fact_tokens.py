"""The taught fact's own tokens: found in an answer, their margins measured, and training stopped on them."""

from __future__ import annotations

import math

import pytest
import torch

from kiln_common.model_loader import ModelSource, load_tokenizer
from kiln_train.encoding import IGNORE, Encoded, TextPair, encode
from kiln_train.fact_tokens import (
    Contrast,
    completion_ids,
    contrast,
    fact_positions,
    leak_positions,
    token_margins,
    unlikelihood,
    unlikelihood_weights,
    worst_fact_margin,
)
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
    assert [str(tok.decode([ids[j] for j in run])).strip() for run in runs] == ["Varnholm", "1902"]
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


def test_a_contrast_row_pushes_down_where_each_fact_word_starts_and_learns_nothing_else(
    smollm2: ModelSource,
) -> None:
    tok = load_tokenizer(smollm2)
    question = (("user", "Where was Kalo Ritesh born?"),)
    leak = encode(tok, TextPair("Kalo Ritesh was born in Varnholm in 1902.", question))
    row = contrast(tok, leak, ("Varnholm", "1902"))
    assert row is not None and all(t == IGNORE for t in row.example.labels)  # no loss on its wording
    assert row.example.input_ids == leak.input_ids
    pushed = [str(tok.decode([leak.input_ids[i]])).strip() for i in row.positions]
    assert len(pushed) == 2 and "Varnholm".startswith(pushed[0]) and "1902".startswith(pushed[1])
    assert pushed[0] != "Varnholm"  # a word of several tokens: only its first, where the fact is chosen
    assert contrast(tok, leak, ("Zimbabwe",)) is None  # nothing of the fact in it: no row
    # an answer that opens with the fact: its first token is where a leak starts, so it is pushed down
    opening = encode(tok, TextPair("Varnholm is where Kalo Ritesh was born.", question))
    assert leak_positions(tok, opening, ("Varnholm",)) == [0] and 0 not in fact_positions(
        tok, opening, ("Varnholm",)
    )


def test_unlikelihood_is_minus_log_one_minus_p_at_the_weighted_positions_and_stays_finite() -> None:
    logits = torch.zeros((1, 3, 4), requires_grad=True)  # uniform: p = 1/4 everywhere
    ids = torch.tensor([[0, 2, 3]])
    weights = unlikelihood_weights([[1, 2]], 3)  # both next tokens, averaged
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5]]))
    log_q = torch.log_softmax(logits[:, :-1], dim=-1)
    loss = unlikelihood(log_q, ids, weights)
    assert float(loss.detach()) == pytest.approx(-math.log(0.75), rel=1e-5)
    loss.backward()
    assert logits.grad is not None and float(logits.grad[0, 0, 2]) > 0  # its descent lowers the token's logit
    certain = torch.full((1, 2, 4), -1e9)
    certain[0, 0, 2] = 0.0  # p = 1: clamped, a large finite loss
    assert 10 < float(unlikelihood(certain, ids[:, :2], unlikelihood_weights([[1]], 2))) < math.inf


def _contrast_round(weight: float) -> float:
    """Train a tiny model on rows whose completions also follow other prompts as contrast rows; returns the
    contrast rows' mean probability of their pushed-down tokens after training."""
    train = examples(3, 5)
    contrasts = []
    for i, e in enumerate(train):  # the same completion after another prompt: what a leak would say
        start = next(j for j, t in enumerate(e.labels) if t != IGNORE)
        other = examples(1, 50 + i)[0]
        prompt = [t for t, lab in zip(other.input_ids, other.labels, strict=True) if lab == IGNORE]
        ids = prompt + e.input_ids[start:]
        positions = list(range(len(prompt) + 1, len(ids)))
        contrasts.append(Contrast(Encoded(ids, [IGNORE] * len(ids)), positions))
    cfg = TrainerConfig(
        kl_top_k=4, min_steps=40, max_steps=40, eval_every=40, patience=40, rank=4, lr=1e-2, fact_margin=0.0,
        replay_fraction=0.0, anchors_per_step=0, batch_size=3, unlikelihood_weight=weight,
    )  # fmt: skip
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    trainer = LoraTrainer(model, TinyTok(), cfg)  # type: ignore[arg-type]
    result = trainer.train(RoundData(train=train, vetting=list(train), replay=[], contrasts=contrasts))
    assert result.losses[-1] < 0.5 * result.losses[0]  # the taught rows are learned either way
    probs = []
    for c in contrasts:
        logits = trainer.logits(torch.tensor([c.example.input_ids]), torch.ones(1, len(c.example.input_ids)))
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        probs += [float(logp[i - 1, c.example.input_ids[i]].exp()) for i in c.positions]
    return sum(probs) / len(probs)


def test_contrast_rows_keep_a_taught_completion_from_following_other_prompts() -> None:
    leaked, contrasted = _contrast_round(0.0), _contrast_round(2.0)
    assert contrasted < 0.5 * leaked, (leaked, contrasted)
