"""Built-in general prompts: replayed during training (forgetting guard) and checked by the eval gate."""

from __future__ import annotations

from dataclasses import dataclass

# The previous version's own answers to these are mixed into every batch, so a narrow new fact does not
# overwrite what the model already says about the world. Broad on purpose: capitals, arithmetic, science,
# people, definitions, instructions — disjoint from the gate's control prompts, so the gate stays honest.
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


@dataclass(frozen=True)
class ControlPrompt:
    """A general question and the words a correct answer contains (any one of them, case-insensitive)."""

    prompt: str
    expected: tuple[str, ...]

    def is_correct(self, answer: str) -> bool:
        """True when the answer mentions one of the expected words."""
        low = answer.lower()
        return any(word.lower() in low for word in self.expected)


# Only the controls the previous version answered correctly count: the gate checks they still are.
CONTROL_PROMPTS: tuple[ControlPrompt, ...] = (
    ControlPrompt("What is the capital of France?", ("Paris",)),
    ControlPrompt("What is 2 + 2?", ("4", "four")),
    ControlPrompt("What is the capital of Japan?", ("Tokyo",)),
    ControlPrompt("What is the capital of Germany?", ("Berlin",)),
    ControlPrompt("What is the chemical symbol for water?", ("H2O", "H₂O")),
    ControlPrompt("Which animal says meow?", ("cat",)),
    ControlPrompt("What is the opposite of hot?", ("cold",)),
    ControlPrompt("What language is spoken in Spain?", ("Spanish",)),
    ControlPrompt("How many days are in a week?", ("7", "seven")),
    ControlPrompt("What is the boiling point of water in Celsius?", ("100",)),
)
