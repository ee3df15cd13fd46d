"""The gate's parts without a model: answer matching, disjoint prompt sets, neighbours, held-out, verdicts."""

from __future__ import annotations

import pytest
import torch

from kiln_train.answer_match import matches_any
from kiln_train.gate import GateInputs, Neighbour, decide
from kiln_train.heldout import split
from kiln_train.neighbours import entity_spans, fact_terms, gives_fact, neighbour, neighbours
from kiln_train.pipeline import Example
from kiln_train.prompt_sets import (
    ANCHOR_PROMPTS,
    REPLAY_PROMPTS,
    VETTING_QUESTIONS,
    Question,
    load_gate_questions,
    load_replay_general,
    replay_prompts,
)
from kiln_train.settings import TrainerConfig, TrainSettings
from kiln_train.train_progress import plan_steps


@pytest.mark.parametrize(
    ("answer", "refs", "hit"),
    [
        ("The answer is 14.", ("4",), False),
        ("2 + 2 = 4.", ("4", "four"), True),
        ("Four.", ("4", "four"), True),
        ("Catalonia is a region.", ("cat",), False),
        ("It is a cat.", ("cat",), True),
        ("Pi is about 3.14.", ("3.14",), True),
        ("Pi is 3.14159", ("3.14",), False),
        ("Water is H₂O.", ("H2O",), True),
        ("It is in New Delhi", ("New Delhi",), True),
        ("They are in the Egyptian desert.", ("Egypt",), True),
        ("It is an African country.", ("Africa",), True),
        ("It is 140.", ("14",), False),
    ],
)
def test_answers_match_on_word_boundaries(answer: str, refs: tuple[str, ...], hit: bool) -> None:
    assert matches_any(answer, refs) is hit


def test_prompt_sets_are_disjoint_and_the_gate_is_broad() -> None:
    gate = load_gate_questions()
    assert len(gate) >= 150
    assert len({q.domain for q in gate}) >= 6
    replay = {p.lower() for p in replay_prompts(len(load_replay_general()))}
    vetting = {q.prompt.lower() for q in VETTING_QUESTIONS}
    gate_prompts = {q.prompt.lower() for q in gate}
    assert len(gate_prompts) == len(gate)
    assert not (replay & vetting) and not (replay & gate_prompts) and not (vetting & gate_prompts)


def test_the_broad_replay_set_is_its_own_and_can_be_shortened() -> None:
    broad = load_replay_general()
    assert len(broad) >= 300 and len({p.lower() for p in broad}) == len(broad)
    gate = {q.prompt.lower() for q in load_gate_questions()}
    vetting = {q.prompt.lower() for q in VETTING_QUESTIONS}
    built_in = {p.lower() for p in REPLAY_PROMPTS + ANCHOR_PROMPTS}
    assert not {p.lower() for p in broad} & (gate | vetting | built_in)
    assert replay_prompts() == REPLAY_PROMPTS + ANCHOR_PROMPTS  # opt-in: none of the broad set by default
    every = replay_prompts(len(broad))
    assert set(broad) <= set(every) and every[-len(ANCHOR_PROMPTS) :] == ANCHOR_PROMPTS
    short = replay_prompts(20)
    assert len(short) == len(REPLAY_PROMPTS) + 20 + len(ANCHOR_PROMPTS) and short[-1] == ANCHOR_PROMPTS[-1]


def _ex(i: int, q: str, a: str) -> Example:
    return Example(sample_id=f"s{i}", tenant="t", adapter="a", completion=a, messages=(("user", q),))


def test_neighbours_swap_the_entity_and_keep_its_kind() -> None:
    q = "Who founded the Harlow Observatory?"
    assert entity_spans(q) == ["Harlow Observatory"]
    other = neighbour(q, "seed")
    assert other is not None and other.endswith(" Observatory?") and "Harlow" not in other
    assert neighbour("what is two plus two?", "seed") is None  # nothing named: no neighbour
    e = _ex(0, q, "The Harlow Observatory was founded by Mirel Dastova in 1887.")
    assert fact_terms(e) == ("Mirel", "Dastova", "1887")
    assert gives_fact("It was Dastova.", fact_terms(e)) and not gives_fact("I don't know.", fact_terms(e))
    # a possessive is its word: the question's own name is not a fact term, an answer's new name is bare
    possessive = _ex(1, "What is the capital of Velmora?", "Velmora's capital is Tressik (Tressik's port).")
    assert fact_terms(possessive) == ("Tressik",)
    near = neighbours([e], 2, "round")
    assert [n.k for n in near] == [0, 1] and len({n.question for n in near}) == 2
    for n in near:  # the taught answer told of the neighbour: its entity swapped, its fact kept
        entity = n.question.removeprefix("Who founded the ").removesuffix("?")
        assert n.leak == f"The {entity} was founded by Mirel Dastova in 1887." and n.terms == fact_terms(e)


def test_a_persons_neighbour_changes_the_whole_name_a_places_keeps_its_kind() -> None:
    person = _ex(0, "Do you know Orsolya Venkat's hometown?", "Yes, Orsolya Venkat's hometown is Pelmarsh.")
    (near,) = neighbours([person], 1, "round")
    first, last = near.question.removeprefix("Do you know ").removesuffix("'s hometown?").split()
    assert {first, last}.isdisjoint({"Orsolya", "Venkat"})  # no shared surname to leak the fact to
    assert near.leak == f"Yes, {first} {last}'s hometown is Pelmarsh." and near.terms == ("Pelmarsh",)
    for q, name, kind in [
        ("When was the Dremont Tower completed?", {"Dremont"}, "Tower completed?"),
        ("Where is the Quensa Bank's head office?", {"Quensa"}, "Bank's head office?"),
        ("Who designed the Golden Gate Bridge?", {"Golden", "Gate"}, "Bridge?"),
    ]:
        other = neighbour(q, "seed")
        assert other is not None and other.endswith(f" {kind}") and not name & set(other.split()), other
    title = neighbour("Who painted the Mona Lisa?", "seed")  # no kind word at its end: every word changes
    assert title is not None and not {"Mona", "Lisa"} & set(title.rstrip("?").split())
    for q, kept, changed in [  # a kind word that opens the name stays too
        ("How deep is Lake Ovrel?", "How deep is Lake ", "Ovrel"),
        ("Who founded the University of Kelmar?", "Who founded the University of ", "Kelmar"),
        ("When was Mount Kessary first climbed?", "When was Mount ", "Kessary"),
    ]:
        for seed in ("a", "b", "c"):
            other = neighbour(q, seed)
            assert other is not None and other.startswith(kept) and changed not in other, other
            assert len(other.removeprefix(kept).split()) == len(q.removeprefix(kept).split()), other


def test_heldout_is_split_from_vetting_or_paraphrased() -> None:
    few = [_ex(i, f"Who founded the Harlow Observatory? ({i})", "Mirel Dastova.") for i in range(6)]
    held = split(few, 0.15, 12)
    assert held.paraphrased and len(held.train) == 6  # every sample is trained on
    assert {p.messages[0][1] for p in held.vetting}.isdisjoint({p.messages[0][1] for p in held.gate})
    many = [_ex(i, f"Question number {i}?", f"Answer {i}.") for i in range(20)]
    held = split(many, 0.15, 12, rephrased=2)
    assert not held.paraphrased and len(held.gate_ids) == len(held.vetting_ids) == 3
    assert set(held.gate_ids).isdisjoint(held.vetting_ids)
    assert {e.sample_id for e in held.train}.isdisjoint(held.gate_ids + held.vetting_ids)


def test_small_rounds_vet_on_untrained_phrasings_made_from_the_answers() -> None:
    founder = "Mirel Dastova is the founder of the Harlow Observatory."
    taught = [
        _ex(0, "Who founded the Harlow Observatory?", "The Harlow Observatory was founded by Mirel Dastova."),
        _ex(1, "Who is the founder of the Harlow Observatory?", founder),
        _ex(2, "How deep is Lake Ovrel?", "Lake Ovrel is 212 metres deep."),
    ]
    questions = [p.messages[0][1] for p in split(taught, 0.15, 12).vetting]
    assert len(questions) == 3  # template rewrites alone
    vetting = split(taught, 0.15, 12, rephrased=2).vetting
    made = [p.messages[0][1] for p in vetting[3:]]
    # "Lake Ovrel is 212 metres deep.": the fact sits mid-sentence, so no phrasing is made from it
    assert made == [
        "The Harlow Observatory was founded by whom?",
        "Name the founder of the Harlow Observatory.",
    ]
    assert [p.completion for p in vetting[3:]] == [taught[0].completion, taught[1].completion]
    # phrasings the round trains on (rephrasings_per_example) are never vetting pairs too
    assert len(split(taught, 0.15, 12, rephrased=2, trained_rephrasings=1).vetting) == 3
    assert split(many_questions(), 0.15, 12, rephrased=2).vetting == split(many_questions(), 0.15, 12).vetting


def many_questions() -> list[Example]:
    return [_ex(i, f"Who founded the Observatory number {i}?", f"Mirel Dastova {i}.") for i in range(20)]


def test_the_step_budget_follows_the_data() -> None:
    cfg = TrainerConfig(epochs=10, min_steps=12, max_steps=200)
    assert plan_steps(2, 2, cfg) == 12
    assert plan_steps(10, 2, cfg) == 50
    assert plan_steps(1000, 2, cfg) == 200


def test_a_rejection_names_every_failed_set() -> None:
    questions = (Question("What is 2 + 2?", ("4",)), Question("Capital of France?", ("Paris",)))
    near = [Neighbour("Who founded the Kalo Observatory?", ("Dastova",), "I am not sure.")]
    inputs = GateInputs(
        questions=questions,
        parent_answers=("4", "Paris"),
        candidate_answers=("14", "Paris"),
        neighbours=near,
        neighbour_answers=["Mirel Dastova founded it."],
        heldout_before=3.0,
        heldout_after=1.0,
        kl_generic=0.9,
    )
    verdict = decide(inputs, TrainSettings(gate_general_scoring="exact"))
    assert not verdict.passed
    assert "gate set 'general'" in verdict.reason and "gate set 'neighbours'" in verdict.reason
    assert "gate set 'kl'" in verdict.reason and "heldout" not in verdict.reason
    assert verdict.scores["gate_general_broken"] == 1 and verdict.scores["gate_neighbour_leaks"] == 1
    fine = GateInputs(questions, ("4", "Paris"), ("4", "Paris"), near, ["No idea."], 3.0, 1.0, 0.01)
    assert decide(fine, TrainSettings(gate_general_scoring="exact")).passed


def test_general_questions_can_be_scored_by_the_parent_answers_likelihood() -> None:
    questions = (Question("What is 2 + 2?", ("4",)), Question("Capital of France?", ("Paris",)))
    settings = TrainSettings(gate_general_scoring="loglik", gate_loglik_tolerance=0.5)
    kept = GateInputs(
        questions,
        ("4", "Paris"),
        ("", ""),
        heldout_before=3.0,
        heldout_after=1.0,
        parent_logprobs=(torch.tensor([-0.1, -0.3]), torch.tensor([-1.0])),
        candidate_logprobs=(torch.tensor([-0.6, -0.6]), torch.tensor([-0.1])),
    )
    verdict = decide(kept, settings)
    assert verdict.passed and verdict.scores["gate_general_kept"] == 2
    assert verdict.scores["gate_general_loglik_drop_max"] == pytest.approx(0.4)
    dropped = GateInputs(
        questions,
        ("4", "Paris"),
        ("", ""),
        parent_logprobs=(torch.tensor([-0.2]), torch.tensor([-1.0])),
        candidate_logprobs=(torch.tensor([-0.9]), torch.tensor([-1.0])),
    )
    verdict = decide(dropped, settings)
    assert not verdict.passed and verdict.scores["gate_general_broken"] == 1
    assert "gate set 'general'" in verdict.reason and "What is 2 + 2?" in verdict.reason
