"""Incremental detokenization and stop-string handling for streamed output."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from kiln_infer.engine.sequence import Sequence


class Detokenizer:
    """Turns each new token into new text without re-decoding the whole output."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def append(self, seq: Sequence) -> str:
        """Extend seq.text with its newest tokens' text (incomplete UTF-8 held back); returns the delta."""
        ids = seq.output_ids
        prefix = self._decode(ids[seq.prefix_offset : seq.read_offset])
        full = self._decode(ids[seq.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        seq.text += delta
        return delta


def find_stop(seq: Sequence, delta_len: int) -> int:
    """Index in seq.text where the earliest stop string of the newest delta starts, or -1."""
    stops = seq.request.sampling.stop
    if not stops or delta_len == 0:
        return -1
    longest = max(len(s) for s in stops)
    window_start = max(0, len(seq.text) - delta_len - longest + 1)
    hits = [i for i in (seq.text.find(s, window_start) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def streamable_text(seq: Sequence) -> str:
    """New text safe to stream: everything but a tail that could still become a stop string."""
    stops = seq.request.sampling.stop
    hold = 0 if seq.is_finished or not stops else max(len(s) for s in stops) - 1
    end = max(seq.sent_chars, len(seq.text) - hold)
    out = seq.text[seq.sent_chars : end]
    seq.sent_chars = end
    return out
