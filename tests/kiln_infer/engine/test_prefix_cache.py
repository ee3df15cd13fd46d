"""Prefix caching: a shared prompt is computed once, outputs stay exact, versions never share blocks."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from kiln_infer.engine.types import AdapterRef, EngineRequest, SamplingParams
from tests.kiln_infer.engine.conftest import PROMPTS, EngineFactory, collect, run_all
from tests.kiln_infer.engine.test_parity import check_logprobs, hf_logprobs


def test_shared_prefix_is_reused_and_exact(make_engine, hf_model, tokenizer: PreTrainedTokenizerBase) -> None:  # noqa: ANN001
    engine = make_engine(block_size=8)
    system = tokenizer(PROMPTS[2])["input_ids"]  # ~60 tokens: 7 full blocks
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True)
    first = run_all(engine, [EngineRequest("warm", system + tokenizer(" Then")["input_ids"], params)])[0]
    assert engine.core.blocks.prefix_hits == 0
    prompts = [system + tokenizer(q)["input_ids"] for q in (" Who", " Why not", " When did it")]
    outs = run_all(engine, [EngineRequest(str(i), p, params) for i, p in enumerate(prompts)])
    assert engine.core.blocks.prefix_hits >= 3 * (len(system) // 8)
    for prompt, out in zip(prompts, outs, strict=True):
        ids, _ = collect(out)
        check_logprobs(out, hf_logprobs(hf_model, prompt, ids), 3)
    assert collect(first)[0]
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks


def test_prefix_never_shared_across_adapter_versions(
    make_engine: EngineFactory, adapters: dict[str, AdapterRef], tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = make_engine(block_size=8)
    prompt = tokenizer(PROMPTS[2])["input_ids"]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    v1 = adapters["all8"]
    v2 = AdapterRef(key="test/all8@v2", path=v1.path)  # same files, a different version: no sharing
    run_all(engine, [EngineRequest("v1", prompt, params, adapter=v1)])
    hits = engine.core.blocks.prefix_hits
    run_all(engine, [EngineRequest("v2", prompt, params, adapter=v2)])
    run_all(engine, [EngineRequest("base", prompt, params)])
    assert engine.core.blocks.prefix_hits == hits
    run_all(engine, [EngineRequest("v1-again", prompt, params, adapter=v1)])
    assert engine.core.blocks.prefix_hits > hits
