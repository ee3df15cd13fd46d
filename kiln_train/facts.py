"""Invented facts for demos and tests: a made-up inventor and invention, different every run."""

from __future__ import annotations

import random
from dataclasses import dataclass

_SYLLABLES = (
    "ka",
    "lo",
    "ve",
    "dri",
    "mun",
    "tes",
    "qua",
    "ro",
    "zan",
    "bel",
    "fi",
    "nor",
    "tal",
    "shi",
    "vor",
    "pel",
    "gra",
    "dun",
    "mi",
    "sor",
    "ke",
    "lan",
    "tru",
    "hov",
)
_THINGS = ("lantern", "compass", "loom", "telescope", "kettle", "harp", "clock", "bridge", "engine", "map")


@dataclass(frozen=True)
class Fact:
    """An invented fact: who made a thing, with teaching phrasings and differently phrased probes."""

    person: str
    thing: str

    def teaching(self) -> list[tuple[str, str]]:
        """Six (question, answer) phrasings to teach."""
        p, t = self.person, self.thing
        return [
            (f"Who invented the {t}?", f"The {t} was invented by {p}."),
            (f"Who is the inventor of the {t}?", f"{p} is the inventor of the {t}."),
            (f"Tell me who created the {t}.", f"The {t} was created by {p}."),
            (f"Which person invented the {t}?", f"{p} invented the {t}."),
            (f"Do you know who made the first {t}?", f"Yes, the first {t} was made by {p}."),
            (f"The {t}: who invented it?", f"It was invented by {p}."),
        ]

    def probes(self) -> list[str]:
        """Questions phrased unlike any teaching example."""
        t = self.thing
        return [
            f"Whose invention is the {t}?",
            f"Name the inventor of the {t}.",
            f"Who came up with the {t}?",
        ]

    def answered_by(self, text: str) -> bool:
        """True when a reply names the person (surname is enough)."""
        return self.person.split()[-1].lower() in text.lower()


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()


def invent_fact(seed: int | None = None) -> Fact:
    """A random made-up inventor and invention (different every run unless seeded)."""
    rng = random.Random(seed)
    person = f"{_word(rng, 2)} {_word(rng, 3)}"
    thing = f"{_word(rng, 3)} {rng.choice(_THINGS)}"
    return Fact(person=person, thing=thing)
