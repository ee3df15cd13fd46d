"""The sample pipeline: what one sample does to its adapter's buffer (supersede, screen, dedupe)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable
from typing import Any

from kiln_common.samples import Sample, SampleKind
from kiln_train.buffer import TrainingBuffer
from kiln_train.example import Example
from kiln_train.settings import TrainSettings

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_WORD = re.compile(r"\w+", re.UNICODE)


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


_NEAR_DUP_WINDOW = 500  # newest buffered examples compared for near-duplicates


class Pipeline:
    """Decides, per sample, what enters the buffer and what is dropped (naming the reason), then queues it."""

    def __init__(
        self, settings: TrainSettings, count_tokens: Callable[[str], int], buffer: TrainingBuffer
    ) -> None:
        self._settings = settings
        self._count_tokens = count_tokens
        self.buffer = buffer

    def admit(self, sample: Sample, pipe: Any) -> None:
        """Queue on `pipe` (the consumer's transaction) the buffer changes one sample causes, or its drop."""
        if sample.kind is SampleKind.FEEDBACK:
            self._feedback(sample, pipe)
        elif sample.kind is SampleKind.GENERATION and not self._settings.train_unrated_generations:
            self.buffer.count_stat(pipe, "unrated_generations")  # they wait for feedback instead
        else:
            self._buffer(self.example_from(sample), pipe)

    def _feedback(self, sample: Sample, pipe: Any) -> None:
        """A rating withdraws or keeps the served completion it carries; a correction supersedes it."""
        t, a = sample.tenant, sample.adapter
        prior = self.buffer.example_for_request(t, a, sample.request_id)
        drop = self.rating_drop(sample)
        if drop is not None:
            self.buffer.count_drop(pipe, drop)
            if prior:  # a bad rating withdraws the served completion it rates
                self.buffer.remove(pipe, t, a, [prior], "superseded")
            return
        if not (sample.prompt or sample.messages):
            self.buffer.count_drop(pipe, "unjoined_feedback")  # it carries no served request to teach
            return
        if prior and not sample.correction:
            self.buffer.count_drop(pipe, "duplicate")  # a good rating of something already buffered
            return
        if prior:  # the correction supersedes the completion it corrects
            self.buffer.forget_fingerprints(pipe, t, a, [prior])
            self.buffer.remove(pipe, t, a, [prior], "superseded")
        self._buffer(self.example_from(sample), pipe, exclude=prior)

    def _buffer(self, example: Example, pipe: Any, exclude: str | None = None) -> None:
        """Buffer the example unless screening or deduplication drops it."""
        fp = fingerprint(example)
        reason = self.screen(example) or self.duplicate_reason(example, fp, exclude)
        if reason is not None:
            self.buffer.count_drop(pipe, reason)
            return
        self.buffer.add(pipe, example, fp)

    def example_from(self, sample: Sample) -> Example:
        """The example a sample teaches: its correction when it has one, else its completion."""
        return Example(
            sample_id=sample.sample_id,
            tenant=sample.tenant,
            adapter=sample.adapter,
            completion=normalise_text(sample.correction or sample.completion),
            prompt=normalise_text(sample.prompt),
            messages=tuple((r.strip().lower(), normalise_text(c)) for r, c in sample.messages),
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

    def duplicate_reason(self, example: Example, fp: str, exclude: str | None = None) -> str | None:
        """'duplicate' (content buffered or trained before), 'near_duplicate' (close to a buffered one)."""
        if self.buffer.has_fingerprint(example.tenant, example.adapter, fp):
            return "duplicate"
        recent = [
            e
            for e in self.buffer.load(example.tenant, example.adapter, limit=_NEAR_DUP_WINDOW)
            if e.sample_id != exclude
        ]
        return "near_duplicate" if self.near_duplicate_of(example, recent) is not None else None

    def near_duplicate_of(self, example: Example, others: Iterable[Example]) -> str | None:
        """sample_id of a buffered example this one nearly repeats, or None."""
        mine = shingles(example)
        for other in others:
            if jaccard(mine, shingles(other)) >= self._settings.near_duplicate_jaccard:
                return other.sample_id
        return None
