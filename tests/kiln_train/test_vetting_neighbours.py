"""Vetting neighbours (checkpoint_vet.py): near neighbours made for the checkpoint vet alone, never trained
on and never asked by the gate; a candidate that answers one with the taught fact is refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kiln_common.model_loader import ModelSource, load_tokenizer
from kiln_train.checkpoint_vet import CheckpointVet
from kiln_train.encoding import TextPair
from kiln_train.evaluator import PromptSets, ReferenceCache
from kiln_train.gate import Neighbour
from kiln_train.parent_client import Messages, ParentAnswer
from kiln_train.pipeline import Example
from kiln_train.prompt_sets import Question
from kiln_train.round_record import new_round
from kiln_train.settings import TrainSettings
from kiln_train.train_progress import Candidate, Progress, pick
from kiln_train.training_round import RoundRunner

TERMS = ("Mirel Dastova", "Mirel", "Dastova")


class ScriptedTrainer:
    """The vet's view of a trainer: a tokenizer, and greedy answers looked up by question."""

    def __init__(self, tok: object, said: dict[str, str]) -> None:
        self.tok, self.said = tok, said

    def generate(self, prompts: list[TextPair], max_new_tokens: int) -> list[str]:
        return [self.said.get(p.messages[-1][1], "I don't know.") for p in prompts]


@pytest.fixture(scope="module")
def tok(smollm2: ModelSource) -> object:
    return load_tokenizer(smollm2)


def _vet(tok: object, said: dict[str, str], near: list[Neighbour], max_leaks: int = 0) -> CheckpointVet:
    questions = (Question("What is the capital of Italy?", ("Rome",)),)
    settings = TrainSettings(gate_general_scoring="exact", vet_max_leaks=max_leaks)
    trainer = ScriptedTrainer(tok, said)
    return CheckpointVet(trainer, questions, ("Rome is the capital of Italy.",), settings, near)  # type: ignore[arg-type]


def test_a_candidate_that_gives_the_fact_to_a_vetting_neighbour_is_refused(tok: object) -> None:
    near = [
        Neighbour("Who founded the Tesro Observatory?", TERMS, "I have no information on it."),
        Neighbour("Who founded the Ashcombe Observatory?", TERMS, "It was founded in 1901."),
    ]
    said = {"What is the capital of Italy?": "Rome.", near[0].prompt: "I have no information."}
    vet = _vet(tok, said, near)
    assert vet() and vet.leaky == 0
    said[near[1].prompt] = "The Ashcombe Observatory was founded by Mirel Dastova."
    assert not vet() and vet.leaky == 1
    assert _vet(tok, said, near, max_leaks=1)()  # one leak allowed: accepted


def test_a_neighbour_the_parent_already_answers_with_the_fact_is_not_a_check(tok: object) -> None:
    near = [Neighbour("Who founded the Tesro Observatory?", TERMS, "Mirel Dastova, I believe.")]
    said = {"What is the capital of Italy?": "Rome.", near[0].prompt: "Mirel Dastova founded it."}
    vet = _vet(tok, said, near)
    assert vet.near == [] and vet()


def test_a_general_slip_still_refuses_without_any_leak(tok: object) -> None:
    said = {"What is the capital of Italy?": "Paris."}
    vet = _vet(tok, said, [], max_leaks=0)
    vet.s = replace(vet.s, vet_max_slipped=0)
    assert not vet() and vet.leaky == 0


class CannedParent:
    """The parent's answers without a server: a neighbour question gets a plain "don't know"."""

    def answers(
        self, tenant: str, adapter: str, version: int, prompts: list[Messages], max_tokens: int
    ) -> list[ParentAnswer]:
        return [ParentAnswer("I am not sure about that.", True) for _ in prompts]


def test_vetting_neighbours_are_their_own_set_and_leave_the_others_drawn_as_before(
    tok: object, tmp_path: Path
) -> None:
    taught = [
        ("Who founded the Harlow Observatory?", "The Harlow Observatory was founded by Mirel Dastova."),
        ("Where is the Quensa Bank headquartered?", "The Quensa Bank is headquartered in Torvik."),
        ("When was the Dremont Tower completed?", "The Dremont Tower was completed in 1847."),
    ]
    examples = [
        Example(f"s{i}", "default", "a", a, messages=(("user", q),)) for i, (q, a) in enumerate(taught)
    ]
    references = ReferenceCache(tmp_path, "test", PromptSets.builtin())
    record = new_round("default", "a", 0)

    def plan(vetting: int) -> object:
        settings = TrainSettings(vetting_neighbours_per_example=vetting)
        runner = RoundRunner(None, tok, settings, references, CannedParent())  # type: ignore[arg-type]
        return runner._plan(record, examples)

    with_vetting, without = plan(2), plan(0)
    vetting = {n.prompt for n in with_vetting.vetting_neighbours}  # type: ignore[attr-defined]
    gate = {n.prompt for n in with_vetting.gate_neighbours}  # type: ignore[attr-defined]
    trained = {p.messages[-1][1] for p in with_vetting.negatives}  # type: ignore[attr-defined]
    assert len(vetting) == 6 and len(gate) == 3 and len(trained) == 3
    assert not vetting & gate and not vetting & trained and not gate & trained
    assert without.vetting_neighbours == []  # type: ignore[attr-defined]
    assert [n.prompt for n in without.gate_neighbours] == [n.prompt for n in with_vetting.gate_neighbours]  # type: ignore[attr-defined]
    assert without.negatives == with_vetting.negatives  # type: ignore[attr-defined]


class LeakyVet:
    """A vet that refuses the checkpoints whose single parameter is in `leaking`, for a leak alone."""

    def __init__(self, p: torch.nn.Parameter, leaking: set[float]) -> None:
        self.p, self.leaking, self.leaked = p, leaking, False

    def __call__(self) -> bool:
        self.leaked = float(self.p.detach()) in self.leaking
        return not self.leaked


def _kept(candidates: list[Candidate], leaking: set[float]) -> tuple[int, int]:
    """Which step `pick` keeps, and how many it refused."""
    p = torch.nn.Parameter(torch.zeros(1))
    progress = Progress(1.0, [torch.zeros(1)], 1.0)
    progress.candidates = candidates
    pick([p], progress, LeakyVet(p, leaking), 0.5)
    return progress.best_step, progress.refused


def test_a_leaking_checkpoint_gives_way_only_to_one_that_still_says_the_facts() -> None:
    def at(step: int, margin: float, loss: float) -> Candidate:
        return Candidate(loss, margin, step, [torch.full((1,), float(step))])

    learned, saying, unlearned = at(20, 0.8, 0.2), at(18, 0.1, 0.25), at(15, -11.0, 0.3)
    assert _kept([unlearned, saying, learned], leaking={20.0}) == (18, 1)
    # the only earlier checkpoints have not learned the facts: keep the leaking one, the gate judges it
    assert _kept([unlearned, learned], leaking={20.0}) == (20, 0)
    assert _kept([unlearned, saying, learned], leaking={20.0, 18.0}) == (18, 1)
