"""Incremental detokenization and stop-string handling for streamed output."""

from __future__ import annotations

import codecs
import logging
import random

from transformers import PreTrainedTokenizerBase

from kiln_infer.engine.sequence import Sequence

log = logging.getLogger(__name__)


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character map used by byte-level BPE vocabularies."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def byte_table(tokenizer: PreTrainedTokenizerBase) -> list[bytes] | None:
    """Bytes of every token id for byte-level BPE tokenizers (special tokens empty), or None if not one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    to_byte = _unicode_to_byte()
    special = set(tokenizer.all_special_ids)
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    table: list[bytes] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or piece is None:
            table.append(b"")
        elif i in added:
            table.append(added[i].encode())
        elif all(c in to_byte for c in piece):
            table.append(bytes(to_byte[c] for c in piece))
        else:
            return None
    rng = random.Random(0)
    sample = [rng.randrange(len(table)) for _ in range(300)]
    expected = tokenizer.decode(sample, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if b"".join(table[i] for i in sample).decode("utf-8", errors="replace") != expected:
        log.info("byte-level table disagrees with the tokenizer; using the generic detokenizer")
        return None
    return table


class Detokenizer:
    """Turns each new token into new text without re-decoding the whole output."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.table = byte_table(tokenizer)  # fast path: bytes per id and an incremental UTF-8 decode

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def append(self, seq: Sequence, token: int) -> str:
        """The new text that output `token` adds (incomplete UTF-8 held back); the caller keeps it."""
        table = self.table
        if table is not None:
            piece = table[token] if 0 <= token < len(table) else b""
            data = seq.utf8_tail + piece if seq.utf8_tail else piece
            # what codecs' incremental UTF-8 decoder (errors="replace") does, without its Python frame
            delta, used = codecs.utf_8_decode(data, "replace", False)
            if used < len(data):
                seq.utf8_tail = data[used:]
            elif seq.utf8_tail:
                seq.utf8_tail = b""
            return delta
        ids = seq.output_ids
        prefix = self._decode(ids[seq.prefix_offset : seq.read_offset])
        full = self._decode(ids[seq.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        return full[len(prefix) :]


def find_stop(seq: Sequence, delta_len: int) -> int:
    """Index in seq.text where the earliest stop string of the newest delta starts, or -1."""
    stops = seq.request.sampling.stop
    if not stops or delta_len == 0:
        return -1
    longest = max(len(s) for s in stops)
    window_start = max(0, len(seq.text) - delta_len - longest + 1)
    hits = [i for i in (seq.text.find(s, window_start) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def streamable_text(seq: Sequence, finished: bool) -> str:
    """New text safe to stream: everything but a tail that could still become a stop string."""
    stops = seq.request.sampling.stop
    hold = 0 if finished or not stops else max(len(s) for s in stops) - 1
    end = max(seq.sent_chars, len(seq.text) - hold)
    out = seq.text[seq.sent_chars : end]
    seq.sent_chars = end
    return out
