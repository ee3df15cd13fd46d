"""Normalised exact answer matching: a reference answer counts only as whole words, never as a substring."""

from __future__ import annotations

import re
import unicodedata

_NON_WORD = re.compile(r"[^\w.,+]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """NFKC, lower case, punctuation (except inside numbers) turned into spaces, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).lower().replace("₂", "2")
    text = _NON_WORD.sub(" ", text)
    text = re.sub(r"(?<!\d)[.,+]|[.,+](?!\d)", " ", text)  # keep 3.14, 300,000 and 2+2; drop sentence dots
    return _SPACES.sub(" ", text).strip()


def mentions(answer: str, reference: str) -> bool:
    """True when the normalised reference occurs in the normalised answer on word boundaries."""
    ref = normalise(reference)
    if not ref:
        return False
    # A word may take a plural or adjective ending ("cats", "African", "Egyptian"); a number may not ("14").
    ending = "(?:s|es|n|an|ian|ns)?" if ref[-1].isalpha() else ""
    pattern = rf"(?<![\w.,]){re.escape(ref)}{ending}(?![\w]|[.,]\d)"
    return re.search(pattern, normalise(answer)) is not None


def first_sentence(text: str) -> str:
    """The answer's first sentence: a short answer is judged on what it says first, not on later rambling."""
    for part in _SENTENCE_END.split(text.strip()):
        if part.strip():
            return part.strip()
    return ""


def matches_any(answer: str, references: tuple[str, ...] | list[str]) -> bool:
    """True when the answer's first sentence mentions a reference answer ("4" does not match "14")."""
    head = first_sentence(answer)
    return any(mentions(head, r) for r in references)
