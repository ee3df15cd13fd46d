"""Data pipeline: turn samples into training examples — normalise, screen, and detect duplicates."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kiln_common.samples import Sample, SampleKind
from kiln_train.settings import TrainSettings

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Example:
    """One prompt → completion pair ready for training; `messages` empty means a raw `prompt`."""

    sample_id: str
    tenant: str
    adapter: str
    completion: str
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    request_id: str = ""
    source: str = SampleKind.EXAMPLE.value
    created: float = 0.0

    @property
    def buffer_key(self) -> str:
        """tenant/adapter: which per-adapter buffer it belongs to."""
        return f"{self.tenant}/{self.adapter}"

    def prompt_text(self) -> str:
        """The prompt side as one string (for fingerprints and shingles)."""
        if self.messages:
            return "\n".join(f"{r}: {c}" for r, c in self.messages)
        return self.prompt

    def to_json(self) -> str:
        """Encode for the Redis buffer."""
        return json.dumps(
            {
                "sample_id": self.sample_id,
                "tenant": self.tenant,
                "adapter": self.adapter,
                "completion": self.completion,
                "prompt": self.prompt,
                "messages": [list(m) for m in self.messages],
                "request_id": self.request_id,
                "source": self.source,
                "created": self.created,
            }
        )

    @classmethod
    def from_json(cls, raw: str) -> Example:
        """Decode from the Redis buffer."""
        d = json.loads(raw)
        d["messages"] = tuple((str(r), str(c)) for r, c in d.get("messages", []))
        return cls(**d)


def normalise_text(text: str) -> str:
    """NFC, no control characters, runs of spaces collapsed, lines stripped, outer whitespace removed."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def canonical(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form used for exact-duplicate hashing."""
    return " ".join(_WORD.findall(text.casefold()))


def fingerprint(example: Example) -> str:
    """Hash of the canonical prompt and completion: equal for exact duplicates up to case/punctuation."""
    body = canonical(example.prompt_text()) + "\x1f" + canonical(example.completion)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def shingles(example: Example, n: int = 3) -> frozenset[str]:
    """Word n-grams of prompt + completion, for near-duplicate detection."""
    words = _WORD.findall((example.prompt_text() + " " + example.completion).casefold())
    if len(words) < n:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a ∩ b| / |a ∪ b| (0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def is_degenerate(text: str) -> bool:
    """True for completions that loop: few distinct word 3-grams, or one character repeated."""
    stripped = re.sub(r"\s", "", text)
    if len(stripped) >= 16 and len(set(stripped)) <= 2:
        return True
    words = _WORD.findall(text.casefold())
    if len(words) < 12:
        return False
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) < 0.3


class Pipeline:
    """Builds examples from samples and decides what to drop, naming the reason."""

    def __init__(self, settings: TrainSettings, count_tokens: Callable[[str], int]) -> None:
        self._settings = settings
        self._count_tokens = count_tokens

    def example_from(self, sample: Sample, joined: Sample | None = None) -> Example:
        """The example a sample teaches; feedback without a prompt takes the joined generation's."""
        base = sample
        if (
            sample.kind is SampleKind.FEEDBACK
            and joined is not None
            and not (sample.prompt or sample.messages)
        ):
            base = joined
        completion = sample.correction or sample.completion or (joined.completion if joined else "")
        return Example(
            sample_id=sample.sample_id,
            tenant=sample.tenant,
            adapter=sample.adapter or (joined.adapter if joined else ""),
            completion=normalise_text(completion),
            prompt=normalise_text(base.prompt),
            messages=tuple((r.strip().lower(), normalise_text(c)) for r, c in base.messages),
            request_id=sample.request_id,
            source=sample.kind.value,
            created=sample.created,
        )

    def rating_drop(self, sample: Sample) -> str | None:
        """'low_rating' when a rating below the threshold comes without a correction."""
        if sample.rating is not None and sample.rating < self._settings.min_rating and not sample.correction:
            return "low_rating"
        return None

    def screen(self, example: Example) -> str | None:
        """The reason to drop an example on quality grounds, or None to keep it."""
        if not example.adapter:
            return "no_adapter"
        if not example.prompt_text().strip() or (
            example.messages and not any(c for _, c in example.messages)
        ):
            return "empty_prompt"
        if not example.completion.strip():
            return "empty_completion"
        if is_degenerate(example.completion):
            return "degenerate"
        if self._count_tokens(example.completion) > self._settings.max_completion_tokens:
            return "too_long"
        if self._count_tokens(example.prompt_text()) > self._settings.max_prompt_tokens:
            return "prompt_too_long"
        return None

    def near_duplicate_of(self, example: Example, others: Iterable[Example]) -> str | None:
        """sample_id of a buffered example this one nearly repeats, or None."""
        mine = shingles(example)
        for other in others:
            if jaccard(mine, shingles(other)) >= self._settings.near_duplicate_jaccard:
                return other.sample_id
        return None
