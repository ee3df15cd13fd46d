"""The lean per-token host path: byte-level detokenizing, streamed text with and without stop strings."""

from __future__ import annotations

import codecs
import random

import numpy as np
from transformers import PreTrainedTokenizerBase

from kiln_infer.engine.detokenizer import Detokenizer
from kiln_infer.engine.sequence import Sequence
from kiln_infer.engine.types import EngineRequest, SamplingParams
from kiln_infer.model.attention import block_table_array
from tests.kiln_infer.engine.conftest import PROMPTS, EngineFactory, collect, greedy, run_all


def test_byte_detokenizer_matches_the_incremental_utf8_decoder() -> None:
    rng = random.Random(0)
    text = "héllo wörld — 日本語 🙂 ok".encode()
    # pieces that split multi-byte characters, plus invalid bytes, as byte-level BPE tokens do
    table = [text[i : i + n] for i in range(len(text)) for n in (1, 2, 3)] + [b"\xff", b"\xc3", b"", b"\x80a"]
    detok = Detokenizer.__new__(Detokenizer)
    detok.table = table
    for trial in range(50):
        seq = Sequence(EngineRequest(f"r{trial}", [1], SamplingParams()), seed=0, arrival=0)
        reference = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for _ in range(40):
            token = rng.randrange(len(table) + 2)  # ids past the table decode to nothing
            piece = table[token] if token < len(table) else b""
            assert detok.append(seq, token) == reference.decode(piece)


def test_block_table_array_pads_each_row() -> None:
    rng = random.Random(1)
    for _ in range(100):
        width = rng.randint(1, 8)
        tables = [
            [rng.randrange(500) for _ in range(rng.randint(0, width))] for _ in range(rng.randint(0, 6))
        ]
        expected = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            expected[i, : len(t)] = t
        got = block_table_array(tables, width)
        assert got.dtype == np.int32 and got.shape == expected.shape and (got == expected).all()


def test_streamed_text_is_the_same_with_and_without_stop_strings(
    make_engine: EngineFactory, tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = make_engine()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    plain = run_all(
        engine, [EngineRequest(f"p{i}", p, greedy(24, ignore_eos=True)) for i, p in enumerate(prompts)]
    )
    guarded = run_all(
        engine,
        [
            EngineRequest(f"s{i}", p, greedy(24, ignore_eos=True, stop=("\x00never",)))
            for i, p in enumerate(prompts)
        ],
    )
    for a, b in zip(plain, guarded, strict=True):
        ids_a, text_a = collect(a)
        assert (ids_a, text_a) == collect(b)
        assert text_a == tokenizer.decode(ids_a, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert all(o.token_ids for o in a)  # one increment per token, each with its token
        assert [o.completion_tokens for o in a] == list(range(1, 25))
