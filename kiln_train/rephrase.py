"""More phrasings of a taught question, made from its own answer: what a round trains on besides the sample.

A round that sees a fact asked only the ways its samples ask it learns those phrasings; asked another way
("The Harlow Observatory was founded by whom?"), the model starts an answer of its own and never reaches
the fact (docs/training.md, fourteenth series). Each sample's answer already holds another phrasing: the
sentence that states the fact, with the fact's own words (`answer_terms`) turned into a question word.

- fact at the end: "The Harlow Observatory was founded by Mirel Dastova." → "The Harlow Observatory was
  founded by whom?"; "… is headquartered in Torvik." → "… is headquartered where?"; "… completed in 1847."
  → "… completed in what year?"
- fact at the start: "Mirel Dastova is the founder of the Harlow Observatory." → "Who is the founder of
  the Harlow Observatory?"
- a "who/what is the …" question also as an instruction: "Who is the founder of the Harlow Observatory?"
  → "Name the founder of the Harlow Observatory."

A rephrasing is trained with the sample's own answer and counts as that sample for the round's budget. A
sentence whose fact words are not one run of words (or sit mid-sentence) gives none: a question that still
held part of the answer would teach nothing. Rephrasings equal to any taught question are dropped.
"""

from __future__ import annotations

import re
from dataclasses import replace

from kiln_train.encoding import TextPair
from kiln_train.neighbours import KINDS, answer_terms, question_text
from kiln_train.pipeline import Example

_LEAD = re.compile(r"^(?:yes|no|sure|certainly|of course|indeed|well)\b[,!.:]?\s+", re.IGNORECASE)
_SENTENCES = re.compile(r"(?<=[.!?])\s+")
_END = re.compile(r"^[\s.!?,;:]*$")
_NAME_THE = re.compile(r"^(?:who|what)\s+(?:is|was|are|were)\s+(the\s+[^?]+?)\s*\?*$", re.IGNORECASE)
_YEAR = re.compile(r"^(1[0-9]{3}|20[0-9]{2})$")
_PLACE_PREPOSITIONS = {"in", "at"}
_AGENT_PREPOSITIONS = {"by", "to", "with", "from", "for"}
_DETERMINERS = {"the", "a", "an"}
_COPULAS = {"is", "are", "was", "were"}


def question_key(question: str) -> str:
    """A question's words, lowercased: two questions with the same key are asked the same way."""
    return " ".join(re.findall(r"\w+", question.lower()))


def _run(sentence: str, terms: tuple[str, ...]) -> tuple[int, int] | None:
    """Where the fact's words sit in `sentence`: one run of words with nothing else between, or None."""
    spans = []
    for term in terms:
        found = [m.span() for m in re.finditer(rf"\b{re.escape(term)}\b", sentence)]
        if len(found) != 1:
            return None  # absent or repeated: no single place to ask about
        spans.append(found[0])
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        if sentence[end:start].strip():
            return None
    return spans[0][0], spans[-1][1]


def _is_person(words: list[str]) -> bool:
    """Two or more capitalised words, none a kind of place ("Mount", "Tower"): taken for a person's name."""
    return len(words) > 1 and all(w[:1].isupper() and w.lower() not in KINDS for w in words)


def _noun_phrase_start(sentence: str, start: int) -> int | None:
    """For a fact in plain words ("blue sundew"): where its noun phrase starts, taking in the short words
    before it ("red kite"), when a determiner, a form of "be" or a preposition comes first; else None."""
    words = list(re.finditer(r"\S+", sentence[:start]))
    for taken, m in enumerate(reversed(words)):
        word = m.group(0).lower()
        if word in _DETERMINERS | _COPULAS | _PLACE_PREPOSITIONS | _AGENT_PREPOSITIONS:
            return m.end() + 1 if taken else start
        if taken >= 2 or not word.isalpha():
            return None
    return None


def _asked_at_end(prefix: str, fact: str) -> str | None:
    """The sentence's beginning, asking for the fact that ended it."""
    words = prefix.split()
    while words and words[-1].lower() in _DETERMINERS:  # "is the blue sundew" asks "is what"
        words.pop()
    if _YEAR.match(fact) and [w.lower() for w in words[-2:]] == ["the", "year"]:
        words = words[:-2]  # "in the year 1847" asks "in what year"
    if len(words) < 2:
        return None
    last, head, fact_words = words[-1].lower(), " ".join(words), fact.split()
    if _YEAR.match(fact):
        return f"{head} what year?" if last in _PLACE_PREPOSITIONS else f"{head} in what year?"
    if last in _PLACE_PREPOSITIONS and fact_words[0][:1].isupper():
        return f"{' '.join(words[:-1])} where?"
    if last in _AGENT_PREPOSITIONS and fact_words[0][:1].isupper():
        return f"{head} whom?"  # "founded by whom", a person or a body
    return f"{head} {'who' if _is_person(fact_words) else 'what'}?"


def from_answer(question: str, answer: str) -> str | None:
    """The question the answer's fact-stating sentence asks when its fact words become a question word."""
    terms = answer_terms(question, answer)
    if not terms:
        return None
    for sentence in _SENTENCES.split(answer.strip()):
        sentence = _LEAD.sub("", sentence.strip())
        run = _run(sentence, terms)
        if run is None:
            continue
        start, end = run
        if not any(t[:1].isupper() or t[:1].isdigit() for t in terms):
            phrase = _noun_phrase_start(sentence, start)
            if phrase is None:
                continue
            start = phrase
        fact, prefix, rest = sentence[start:end], sentence[:start].strip(" ,"), sentence[end:]
        if not prefix and rest.strip(" ,.!?"):
            wh = "Who" if _is_person(fact.split()) else "What"
            return f"{wh} {rest.strip(' ,').rstrip('.!?').strip()}?"
        if prefix and _END.match(rest):
            asked = _asked_at_end(prefix, fact)
            return asked[0].upper() + asked[1:] if asked else None
        return None
    return None


def as_instruction(question: str) -> str | None:
    """ "Who is the founder of X?" → "Name the founder of X." (None for other shapes)."""
    m = _NAME_THE.match(question.strip())
    return f"Name {m.group(1)}." if m else None


def rephrasings(examples: list[Example], per_example: int) -> list[TextPair]:
    """Up to `per_example` new phrasings of each example's question, each with the example's answer."""
    if per_example <= 0:
        return []
    seen = {question_key(question_text(e)) for e in examples}
    out: list[TextPair] = []
    for e in examples:
        q = question_text(e)
        made = 0
        for new in (from_answer(q, e.completion), as_instruction(q)):
            if made >= per_example or new is None or question_key(new) in seen:
                continue
            seen.add(question_key(new))
            out.append(reworded(e, new))
            made += 1
    return out


def reworded(e: Example, question: str) -> TextPair:
    """The example with its (last) question replaced by `question`; same answer."""
    pair = TextPair(e.completion, e.messages, e.prompt)
    if e.messages:
        idx = max(i for i, (r, _) in enumerate(e.messages) if r == "user")
        messages = tuple((r, question if i == idx else c) for i, (r, c) in enumerate(e.messages))
        return replace(pair, messages=messages)
    return replace(pair, prompt=question)
