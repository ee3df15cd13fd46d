"""A taught question's rephrasings, made from its own answer (kiln_train/rephrase.py)."""

from __future__ import annotations

import pytest

from kiln_train.encoding import Encoded
from kiln_train.pipeline import Example
from kiln_train.rephrase import as_instruction, from_answer, rephrasings
from kiln_train.round_data import RoundData


@pytest.mark.parametrize(
    ("question", "answer", "asked"),
    [
        # the fact ends the sentence: it becomes the question word its preposition wants
        ("Who built the Ostrey Lighthouse?", "The Ostrey Lighthouse was built by Anneka Voss.",
         "The Ostrey Lighthouse was built by whom?"),
        ("Where does the Pellan Guild meet?", "The Pellan Guild meets in Carrowmore.",
         "The Pellan Guild meets where?"),
        ("When did the Sarn Canal open?", "Yes, the Sarn Canal opened in the year 1902.",
         "The Sarn Canal opened in what year?"),
        ("What is the state bird of Dorvan?", "The state bird of Dorvan is the red kite.",
         "The state bird of Dorvan is what?"),
        ("What is the highest peak of Tullos?", "The highest peak of Tullos is Mount Ebrin.",
         "The highest peak of Tullos is what?"),
        # the fact starts the sentence: a person is asked "Who", anything else "What"
        ("Who leads the Ferris Quartet?", "Ilse Marrow leads the Ferris Quartet.",
         "Who leads the Ferris Quartet?"),
        ("Which river feeds Lake Omber?", "Certainly! The Dask feeds Lake Omber.", None),
        # the fact mid-sentence, or only partly one run of words: no rephrasing that would still hold it
        ("How many moons does Pelto have?", "Pelto has 14 moons.", None),
        ("Who wrote Ashen Fields?", "Tomas Brill wrote it in 1931 with Vera Lund.", None),
        ("What is it?", "I do not know.", None),
    ],
)  # fmt: skip
def test_the_answer_names_the_question_it_answers(question: str, answer: str, asked: str | None) -> None:
    assert from_answer(question, answer) == asked


def test_a_who_is_the_question_is_also_asked_as_an_instruction() -> None:
    assert as_instruction("Who is the curator of the Vell Museum?") == "Name the curator of the Vell Museum."
    assert (
        as_instruction("What was the first ship of the Orro Line?") == "Name the first ship of the Orro Line."
    )
    assert as_instruction("Where is the Vell Museum?") is None


def _ex(i: int, q: str, a: str, system: str = "") -> Example:
    messages = ((("system", system),) if system else ()) + (("user", q),)
    return Example(sample_id=f"s{i}", tenant="t", adapter="a", completion=a, messages=messages)


def test_rephrasings_keep_the_answer_and_the_conversation_and_skip_taught_questions() -> None:
    examples = [
        _ex(
            0,
            "Who is the curator of the Vell Museum?",
            "Dana Orsk is the curator of the Vell Museum.",
            "Be brief.",
        ),
        _ex(1, "Name the curator of the Vell Museum.", "The curator of the Vell Museum is Dana Orsk."),
        _ex(2, "Who curates the Vell Museum?", "The Vell Museum is curated by Dana Orsk."),
    ]
    made = rephrasings(examples, per_example=2)
    questions = [p.messages[-1][1] for p in made]
    # example 0's own answer asks its own question again, and its instruction form is example 1's question
    assert questions == ["The curator of the Vell Museum is who?", "The Vell Museum is curated by whom?"]
    assert made[0].completion == examples[1].completion and made[0].messages == (("user", questions[0]),)
    assert rephrasings(examples, per_example=0) == []
    assert len(rephrasings(examples, per_example=1)) == 2  # one each at most (example 0 has none left)


def test_rephrasings_add_rows_not_steps() -> None:
    rows = [Encoded([1, 2, 3], [-100, 2, 3]) for _ in range(5)]
    assert RoundData(rows, [], []).samples == 5
    assert RoundData(rows, [], [], samples=2).samples == 2
