"""The three disjoint prompt sets of a round: replay/anchor (trained on), vetting (picks checkpoints), gate.

Each set has one purpose and they never mix: the replay set's prompts (`REPLAY_PROMPTS`, the broad
`data/replay_general.jsonl` and the `ANCHOR_PROMPTS` subset) are trained on with the parent's own answers; the
vetting set picks the checkpoint and stops training early; the gate set (`data/gate_general.jsonl`, plus near
neighbours of the round's topic) decides publishing and is never trained on nor used for selection.
`tests/kiln_train/test_gate_sets.py` checks that no prompt is in two sets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from kiln_train.answer_match import matches_any


@dataclass(frozen=True)
class Question:
    """A general question and its short reference answers (any one, matched on word boundaries)."""

    prompt: str
    answers: tuple[str, ...]
    domain: str = ""

    def is_correct(self, answer: str) -> bool:
        """True when the answer mentions one of the reference answers as whole words."""
        return matches_any(answer, self.answers)


# Replayed with the parent's own answers in every round (the forgetting guard's broad side).
REPLAY_PROMPTS: tuple[str, ...] = (
    "What is the capital of Spain?",
    "What is the capital of Canada?",
    "What is the capital of the United Kingdom?",
    "What is the capital of Egypt?",
    "Who was the first president of the United States?",
    "Who painted the Mona Lisa?",
    "Who discovered penicillin?",
    "Who wrote Hamlet?",
    "Who invented the light bulb?",
    "Who developed the theory of relativity?",
    "What is 3 + 5?",
    "What is 6 times 7?",
    "What is 12 divided by 4?",
    "What is photosynthesis?",
    "Why is the sky blue?",
    "What is the largest ocean on Earth?",
    "How many hours are in a day?",
    "What is the tallest mountain in the world?",
    "What gas do humans need to breathe?",
    "What is the main ingredient in bread?",
    "Name three fruits.",
    "What is a noun?",
    "Give me a tip for sleeping better.",
    "Write one sentence about the ocean.",
    "What does a thermometer measure?",
    "Which planet is known as the Red Planet?",
    "What is the currency of Japan?",
    "Who wrote the Harry Potter books?",
    "What is the fastest land animal?",
    "What is the plural of mouse?",
    "How many sides does a triangle have?",
)

# Part of the replay set, and also a loss term of their own every step (short factual answers slip first).
ANCHOR_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "What is 2 + 2?",
    "What is the capital of Japan?",
    "What is the capital of Germany?",
    "What is the chemical symbol for water?",
    "Which animal says meow?",
    "What is the opposite of hot?",
    "What language is spoken in Spain?",
    "How many days are in a week?",
    "What is the boiling point of water in Celsius?",
)

# The anchors' right answers. Anchors are trained on, so no gate set may hold them, and a kept anchor proves
# little; but a broken one proves the guard failed, so the gate also checks these (its set 'anchors').
ANCHOR_ANSWERS: dict[str, tuple[str, ...]] = {
    "What is the capital of France?": ("Paris",),
    "What is 2 + 2?": ("4", "four"),
    "What is the capital of Japan?": ("Tokyo",),
    "What is the capital of Germany?": ("Berlin",),
    "What is the chemical symbol for water?": ("H2O",),
    "Which animal says meow?": ("cat", "cats"),
    "What is the opposite of hot?": ("cold",),
    "What language is spoken in Spain?": ("Spanish",),
    "How many days are in a week?": ("7", "seven"),
    "What is the boiling point of water in Celsius?": ("100",),
}

# Vet each new best checkpoint: those the parent answers right must stay right, or it is refused.
VETTING_QUESTIONS: tuple[Question, ...] = (
    Question("What is the capital of Scotland?", ("Edinburgh",)),
    Question("What is 4 + 4?", ("8", "eight")),
    Question("What is the capital of Switzerland?", ("Bern", "Berne")),
    Question("What color are most leaves in summer?", ("green",)),
    Question("Which animal says quack?", ("duck",)),
    Question("What is the opposite of cold?", ("hot", "warm")),
    Question("How many wheels does a bicycle have?", ("two", "2")),
    Question("What is the capital of Brazil?", ("Brasilia", "Brasília")),
    Question("Who wrote Macbeth?", ("Shakespeare",)),
    Question("What do fish use to breathe?", ("gills",)),
    Question("What is 6 + 3?", ("9", "nine")),
    Question("What planet is known for its Great Red Spot?", ("Jupiter",)),
)

# Generic text on which the candidate's next-token distribution is compared with the parent's (KL).
GENERIC_TEXTS: tuple[str, ...] = (
    "The weather today is mild, with a light breeze coming in from the west.",
    "To make a cup of tea, boil water, pour it over the tea leaves and wait a few minutes.",
    "Many people enjoy reading books in the evening before they go to sleep.",
    "The train to the city leaves every hour from the main station.",
    "Exercise and a balanced diet are important for a healthy life.",
    "Computers store information as sequences of ones and zeros.",
    "The river flows through the valley and into the sea.",
    "She opened the window to let some fresh air into the room.",
)


def load_gate_questions() -> tuple[Question, ...]:
    """The gate's broad general questions (kiln_train/data/gate_general.jsonl)."""
    text = resources.files("kiln_train").joinpath("data/gate_general.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return tuple(Question(r["question"], tuple(r["answers"]), r.get("domain", "")) for r in rows)


def load_replay_general(limit: int = 0) -> tuple[str, ...]:
    """The broad replay questions (kiln_train/data/replay_general.jsonl; its first `limit` if > 0)."""
    text = resources.files("kiln_train").joinpath("data/replay_general.jsonl").read_text()
    prompts = tuple(json.loads(line)["question"] for line in text.splitlines() if line.strip())
    return prompts[:limit] if limit > 0 else prompts


def replay_prompts(general: int = 0) -> tuple[str, ...]:
    """Every replayed prompt: the built-in ones, the broad file's first `general`, the anchors last."""
    broad = load_replay_general(general) if general > 0 else ()
    return REPLAY_PROMPTS + broad + ANCHOR_PROMPTS


def anchor_checks(
    prompts: Sequence[str], answers: Sequence[str]
) -> tuple[tuple[Question, ...], tuple[str, ...]]:
    """The anchors among replay `prompts` as questions with their right answers, and the parent's `answers`
    to them (the replay set's reference answers, in the same order as `prompts`)."""
    found = [(p, a) for p, a in zip(prompts, answers, strict=True) if p in ANCHOR_ANSWERS]
    return tuple(Question(p, ANCHOR_ANSWERS[p], "anchor") for p, _ in found), tuple(a for _, a in found)
