"""What a client of the engine notices: seeds, stop strings, limits, EOS, aborts, deadlines, overload."""

from __future__ import annotations

import time

import pytest
from transformers import PreTrainedTokenizerBase

from kiln_infer.engine.config import EngineConfig
from kiln_infer.engine.types import (
    AdapterRef,
    EngineOverloadedError,
    EngineRequest,
    FinishReason,
    SamplingParams,
)
from kiln_infer.lora.errors import AdapterLoadError
from tests.kiln_infer.engine.conftest import PROMPTS, EngineFactory, collect, greedy, run_all


def test_same_seed_same_tokens_whatever_the_batch(
    make_engine: EngineFactory, tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = make_engine()
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    alone = collect(run_all(engine, [EngineRequest("a", prompt, params)])[0])[0]
    crowd = [
        EngineRequest(f"n{i}", tokenizer(p)["input_ids"], SamplingParams(max_tokens=20, seed=i))
        for i, p in enumerate(PROMPTS)
    ]
    outs = run_all(engine, crowd[:2] + [EngineRequest("b", prompt, params)] + crowd[2:])
    assert collect(outs[2])[0] == alone
    other_seed = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=8, ignore_eos=True)
    assert collect(run_all(engine, [EngineRequest("c", prompt, other_seed)])[0])[0] != alone


def test_unseeded_sampling_varies(make_engine: EngineFactory, tokenizer: PreTrainedTokenizerBase) -> None:
    engine = make_engine()
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    params = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    outs = run_all(engine, [EngineRequest(str(i), prompt, params) for i in range(4)])
    assert len({tuple(collect(o)[0]) for o in outs}) > 1


def test_stop_string_is_cut_from_text(make_engine: EngineFactory, tokenizer: PreTrainedTokenizerBase) -> None:
    engine = make_engine()
    prompt = tokenizer("1, 2, 3, 4,")["input_ids"]
    full = collect(run_all(engine, [EngineRequest("full", prompt, greedy(12, ignore_eos=True))])[0])[1]
    assert " 7," in full
    out = run_all(engine, [EngineRequest("stop", prompt, greedy(12, stop=(" 7,",), ignore_eos=True))])[0]
    text = collect(out)[1]
    assert out[-1].finish_reason == FinishReason.STOP_STRING
    assert text == full[: full.index(" 7,")]


def test_max_tokens_and_streaming(make_engine: EngineFactory, tokenizer: PreTrainedTokenizerBase) -> None:
    engine = make_engine()
    out = run_all(
        engine, [EngineRequest("m", tokenizer(PROMPTS[2])["input_ids"], greedy(5, ignore_eos=True))]
    )[0]
    assert len(out) >= 2 and not out[0].finished  # streamed in increments
    assert len(collect(out)[0]) == 5 and out[-1].finish_reason == FinishReason.LENGTH


def test_eos_finishes_unless_ignored(make_engine: EngineFactory, tokenizer: PreTrainedTokenizerBase) -> None:
    engine = make_engine()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True)
    prompt = chat if isinstance(chat, list) else chat["input_ids"]
    out = run_all(engine, [EngineRequest("eos", prompt, greedy(100))])[0]
    ids, text = collect(out)
    assert out[-1].finish_reason == FinishReason.STOP and ids[-1] in engine.core.eos_token_ids
    assert text and "<|im_end|>" not in text
    forced = run_all(engine, [EngineRequest("no-eos", prompt, greedy(len(ids) + 3, ignore_eos=True))])[0]
    assert len(collect(forced)[0]) == len(ids) + 3


def test_abort_frees_blocks_at_once(make_engine: EngineFactory, tokenizer: PreTrainedTokenizerBase) -> None:
    engine = make_engine()
    stream = engine.submit(
        EngineRequest("long", tokenizer(PROMPTS[2])["input_ids"], greedy(200, ignore_eos=True))
    )
    it = iter(stream)
    first = next(it)
    assert not first.finished
    engine.abort("long")
    rest = list(it)
    assert rest[-1].finished and rest[-1].finish_reason == FinishReason.ABORTED
    assert rest[-1].completion_tokens < 200
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks
    assert engine.num_unfinished() == 0


def test_deadline_aborts(make_engine: EngineFactory, tokenizer: PreTrainedTokenizerBase) -> None:
    engine = make_engine()
    req = EngineRequest(
        "d", tokenizer(PROMPTS[0])["input_ids"], greedy(250, ignore_eos=True), deadline=time.monotonic() + 0.3
    )
    out = run_all(engine, [req])[0]
    assert out[-1].finish_reason == FinishReason.ABORTED and out[-1].completion_tokens < 250
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks


def test_overload_raises(make_engine: EngineFactory, tokenizer: PreTrainedTokenizerBase) -> None:
    engine = make_engine(max_waiting=1, max_num_seqs=1, max_num_batched_tokens=64)
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    engine.submit(EngineRequest("1", prompt, greedy(200, ignore_eos=True)))
    engine.submit(EngineRequest("2", prompt, greedy(200, ignore_eos=True)))
    with pytest.raises(EngineOverloadedError):
        engine.submit(EngineRequest("3", prompt, greedy(5)))
    engine.abort("1")
    engine.abort("2")


def test_bad_adapter_raises_on_submit(
    make_engine: EngineFactory, tokenizer: PreTrainedTokenizerBase, tmp_path
) -> None:  # noqa: ANN001
    engine = make_engine()
    with pytest.raises(AdapterLoadError, match="adapter_config.json"):
        engine.submit(EngineRequest("x", [1, 2], greedy(2), adapter=AdapterRef("t/bad@v1", tmp_path)))
    assert engine.num_unfinished() == 0


def test_weights_are_used_without_copy(make_engine: EngineFactory, smol_state: dict) -> None:  # noqa: ANN001
    engine = make_engine()
    layer = engine.core.model.layers[3]
    assert layer.q.data_ptr() == smol_state["model.layers.3.self_attn.q_proj.weight"].data_ptr()
    assert engine.core.model.embed.data_ptr() == smol_state["model.embed_tokens.weight"].data_ptr()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        EngineConfig(num_kv_blocks=2, max_model_len=1024, block_size=16)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
