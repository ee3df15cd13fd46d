"""Near neighbours of a taught example: the same question about another entity, and the fact's own words.

"Who founded the Kessler Observatory?" → "Who founded the Dunmi Observatory?": the capitalised names in the
prompt (all but the last word of a multi-word name, which is usually its kind: Observatory, Bank, Tower) are
replaced by invented ones. The parent's answers to some neighbours are trained on (so the fact stays with its
entity); others go to the gate, which checks the candidate does not answer them with the taught fact.
"""

from __future__ import annotations

import hashlib
import random
import re

from kiln_train.answer_match import mentions
from kiln_train.pipeline import Example

_SYLLABLES = ("ka", "lo", "ve", "dri", "mun", "tes", "qua", "ro", "zan", "bel", "fi", "nor", "tal", "shi")
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


def _invented(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()


def neighbour(text: str, seed: str) -> str | None:
    """The same question about an invented entity (None when the question names none)."""
    spans = entity_spans(text)
    if not spans:
        return None
    rng = random.Random(hashlib.sha256(seed.encode()).digest())
    out = text
    for span in spans:
        words = span.split()
        kind = words[-1:] if len(words) > 1 else []
        new = " ".join([_invented(rng) for _ in words[: len(words) - len(kind)]] + kind)
        out = re.sub(rf"\b{re.escape(span)}\b", new, out)
    return out if out != text else None


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


def neighbours(
    examples: list[Example], per_example: int, salt: str
) -> list[tuple[int, str, tuple[str, ...]]]:
    """Up to `per_example` distinct neighbour questions per example: (k, question, its fact terms)."""
    seen = {question_text(e) for e in examples}
    out: list[tuple[int, str, tuple[str, ...]]] = []
    for e in examples:
        terms = fact_terms(e)
        for k in range(per_example):
            q = neighbour(question_text(e), f"{salt}:{e.sample_id}:{k}")
            if q is not None and q not in seen and terms:
                seen.add(q)
                out.append((k, q, terms))
    return out
