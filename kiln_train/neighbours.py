"""Near neighbours of a taught example: the same question about another entity, and the fact's own words.

"Who founded the Kessler Observatory?" → "Who founded the Dunmi Observatory?": the capitalised names in the
prompt are replaced by invented ones, all but a name's first or last word when that is a kind of place or
organisation (Observatory, Bank, Lake, University: `KINDS`; "Lake Ovrel" → "Lake Dunmi"). A person's name is
replaced whole: "Where was Orsolya Venkat born?" → "Where was Kalo Ritesh born?", not "… Kalo Venkat …",
whose shared surname the fact leaked to. Invented names come in two looks, chosen per neighbour: syllable
strings ("Dunmi", "Kalo Ritesh") and names built like real ones ("Ashcombe Tower", "Elsa Wenthorpe"). With
syllable strings alone a round learned that an odd-looking name does not take the fact while a real-looking
one still did ("Bramwell Tower" took the Dremont Tower's year). The
parent's answers to some neighbours are trained on (so the fact stays with its entity); others go to the gate,
which checks the candidate does not answer them with the taught fact. Each neighbour also carries the taught
answer told of the neighbour's entity (the same swap applied to it), whose fact tokens a round can push down.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import NamedTuple

from kiln_train.answer_match import mentions
from kiln_train.pipeline import Example

_SYLLABLES = ("ka", "lo", "ve", "dri", "mun", "tes", "qua", "ro", "zan", "bel", "fi", "nor", "tal", "shi")
# the real look: a first name, and a surname or place name made of an English place name's head and tail
_FIRST_NAMES = (
    "Anton", "Mara", "Teodor", "Elsa", "Priya", "Jonas", "Ines", "Malik", "Sofia", "Ravi", "Helena", "Oskar",
    "Nadia", "Felix", "Leona", "Tomas", "Yara", "Emil", "Clara", "Dario",
)  # fmt: skip
_HEADS = (
    "Ash", "Ald", "Wen", "Thorn", "Elm", "Lang", "Hart", "Stan", "Fair", "Glen", "Dun", "Whit", "Carn",
    "Holm", "Pen", "Rad", "Sel", "Tam", "Wex", "Yar", "Cor", "Lin", "Mor", "Ox", "Rother", "Sax", "Tre",
    "Bel",
)  # fmt: skip
_TAILS = (
    "combe", "thorpe", "ford", "ton", "den", "by", "ley", "mont", "wick", "field", "worth", "more", "ham",
    "stead", "dale", "mere", "croft", "holt", "bury", "shaw", "ridge", "wood", "hurst",
)  # fmt: skip
_SKIP = {
    "what",
    "who",
    "whom",
    "whose",
    "which",
    "when",
    "where",
    "why",
    "how",
    "is",
    "are",
    "was",
    "do",
    "does",
    "did",
    "can",
    "could",
    "tell",
    "name",
    "i",
    "the",
    "a",
    "an",
    "in",
    "of",
    "yes",
    "no",
    "it",
    "please",
}
# the last word of a multi-word name that says what kind of thing it names, kept in its neighbours ("Harlow
# Observatory" → "Tesro Observatory"); a name ending otherwise is taken for a person's and replaced whole
KINDS = frozenset(
    """
    observatory bank tower library bridge university college museum river street road avenue square company
    corporation group hotel park station hospital school academy building institute lake mountain mount island
    sea bay valley forest desert castle palace cathedral church temple theatre theater gallery stadium airport
    harbour harbor port canal dam mine farm market mall centre center hall house prize award festival society
    club foundation council party republic kingdom empire city town village county province state district
    """.split()
)
_WORD = re.compile(r"[A-Za-zÀ-ÿ][\w'-]*|\d+(?:[.,]\d+)*")
_POSSESSIVE = re.compile(r"'s$", re.IGNORECASE)


def question_text(e: Example) -> str:
    """The text a neighbour is made from: the last user turn, or the raw prompt."""
    users = [c for r, c in e.messages if r == "user"]
    return users[-1] if users else e.prompt


def entity_spans(text: str) -> list[str]:
    """Capitalised names in a question (words after the first, skipping question words)."""
    spans: list[str] = []
    run: list[str] = []
    for i, m in enumerate(_WORD.finditer(text)):
        word = m.group(0)
        named = word[0].isupper() and word.lower() not in _SKIP and i > 0
        if named:
            run.append(word)
            continue
        if run:
            spans.append(" ".join(run))
        run = []
    if run:
        spans.append(" ".join(run))
    return spans


def _invented(rng: random.Random, real_look: bool, first_name: bool) -> str:
    """An invented name word: a syllable string, or (`real_look`) a first name or a place-name compound."""
    if not real_look:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
    if first_name:
        return rng.choice(_FIRST_NAMES)
    return rng.choice(_HEADS) + rng.choice(_TAILS)


def swaps(text: str, seed: str) -> dict[str, str]:
    """Each name word of a question and its invented replacement (a place's kind word, first or last in its
    name, stays: `KINDS`).

    One look per question (`_invented`), picked by the seed; a person's first word (a multi-word name with no
    kind word) gets a first name in the real look."""
    rng = random.Random(hashlib.sha256(seed.encode()).digest())
    real_look = rng.random() < 0.5
    out: dict[str, str] = {}
    for span in entity_spans(text):
        words = [_bare(w) for w in span.split()]
        kinds = [w.lower() in KINDS for w in words]
        person = len(words) > 1 and not kinds[0] and not kinds[-1]
        for i, word in enumerate(words):
            if kinds[i] and (i == 0 or i == len(words) - 1):
                continue  # "Lake Ovrel" → "Lake Tesro", "University of Kelmar" → "University of Vezan"
            new = word
            while new.lower() == word.lower():  # a replacement never keeps the name it replaces
                new = _invented(rng, real_look, person and i == 0)
            out.setdefault(word, new)
    return out


def swapped(text: str, words: dict[str, str]) -> str:
    """`text` with each whole word of `words` replaced (a possessive keeps its "'s")."""
    for old, new in words.items():
        text = re.sub(rf"\b{re.escape(old)}\b", new, text)
    return text


def neighbour(text: str, seed: str) -> str | None:
    """The same question about an invented entity (None when the question names none)."""
    out = swapped(text, swaps(text, seed))
    return out if out != text else None


class Near(NamedTuple):
    """A near neighbour of a taught example: the k-th made, its question, the fact's own words, and the taught
    answer told of the neighbour's entity (what a leak would say)."""

    k: int
    question: str
    terms: tuple[str, ...]
    leak: str


def fact_terms(e: Example) -> tuple[str, ...]:
    """Words of the taught answer that the question does not contain: names and numbers first."""
    return answer_terms(question_text(e), e.completion)


def answer_terms(question: str, answer: str) -> tuple[str, ...]:
    """Words of `answer` that `question` does not contain: its names and numbers, else its longer words.

    Possessives count as their word: the answer's "Velmora's" is the question's "Velmora", not a new term.
    """
    asked = {_bare(w).lower() for w in _WORD.findall(question)}
    words = [_bare(w) for w in _WORD.findall(answer)]
    new = [w for w in words if w.lower() not in asked and w.lower() not in _SKIP]
    strong = [w for w in new if w[0].isupper() or w[0].isdigit()]
    return tuple(dict.fromkeys(strong or [w for w in new if len(w) > 3]))


def _bare(word: str) -> str:
    """The word without a possessive ending ("Velmora's" -> "Velmora")."""
    return _POSSESSIVE.sub("", word)


def gives_fact(answer: str, terms: tuple[str, ...]) -> bool:
    """True when an answer mentions any of the fact's own words."""
    return any(mentions(answer, t) for t in terms)


def neighbours(examples: list[Example], per_example: int, salt: str) -> list[Near]:
    """Up to `per_example` distinct neighbours per example (questions naming no entity get none)."""
    seen = {question_text(e) for e in examples}
    out: list[Near] = []
    for e in examples:
        terms, text = fact_terms(e), question_text(e)
        for k in range(per_example):
            words = swaps(text, f"{salt}:{e.sample_id}:{k}")
            q = swapped(text, words)
            if q != text and q not in seen and terms:
                seen.add(q)
                out.append(Near(k, q, terms, swapped(e.completion, words)))
    return out
