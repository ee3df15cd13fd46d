"""Adapter outputs equal PEFT's (greedy tokens, logprobs) in a batch of base + 3 adapters + mixed lengths."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from kiln_infer.engine.types import AdapterRef, EngineRequest, SamplingParams
from tests.kiln_infer.engine.conftest import PROMPTS, EngineFactory, collect, run_all
from tests.kiln_infer.engine.test_parity import check_logprobs


def peft_reference(
    peft_model: torch.nn.Module, adapter: str | None, prompt: list[int], n: int
) -> tuple[list[int], torch.Tensor]:
    """PEFT's greedy continuation and its logprobs at each generated position."""
    ctx = peft_model.disable_adapter() if adapter is None else contextlib.nullcontext()
    if adapter is not None:
        peft_model.set_adapter(adapter)
    with ctx, torch.no_grad():
        out = peft_model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
        ids = out[0, len(prompt) :].tolist()
        logits = peft_model(input_ids=torch.tensor([prompt + ids])).logits[0].float()
    return ids, logits[len(prompt) - 1 : -1].log_softmax(-1)


@pytest.mark.parametrize(
    ("static_decode", "token_sizes"),
    [(False, ()), (True, ()), (True, (16, 64))],
    ids=["eager", "static-decode", "static-mixed-steps"],
)
def test_mixed_batch_matches_peft(
    static_decode: bool,
    token_sizes: tuple[int, ...],
    make_engine: EngineFactory,
    peft_model: torch.nn.Module,
    adapters: dict[str, AdapterRef],
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    # long prompts are chunked while others decode; static-decode pads decode batches (the CUDA-graph path),
    # static-mixed-steps also the steps that carry prefill chunks (each token a row of decode attention)
    engine = make_engine(
        max_num_batched_tokens=48,
        static_decode=static_decode,
        cuda_graph_batch_sizes=(2, 4),
        cuda_graph_token_sizes=token_sizes,
    )
    names: list[str | None] = [None, "all8", "qv4", "mlp16", "all8", None, "mlp16"]
    prompts = [tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(len(names))]
    prompts[4] = prompts[2][:7]  # a very short prompt next to the long one on the same adapter
    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=2, ignore_eos=True)
    requests = [
        EngineRequest(f"r{i}", p, params, adapter=adapters[n] if n else None)
        for i, (p, n) in enumerate(zip(prompts, names, strict=True))
    ]
    outs = run_all(engine, requests)
    for name, prompt, out in zip(names, prompts, outs, strict=True):
        ids, _ = collect(out)
        ref_ids, ref_lp = peft_reference(peft_model, name, prompt, 10)
        assert ids == ref_ids, f"adapter {name}"
        check_logprobs(out, ref_lp, 2)
    mixed = engine.core.runner.mixed
    assert (mixed.num_runs > 0) if token_sizes else mixed is None  # the path under test ran
    assert engine.core.adapters.refcounts() == [0, 0, 0, 0]
    assert set(engine.core.adapters.resident()) == {adapters[n].key for n in ("all8", "qv4", "mlp16")}


def test_adapter_changes_output(
    make_engine: EngineFactory, adapters: dict[str, AdapterRef], tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = make_engine()
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = run_all(
        engine,
        [
            EngineRequest("base", prompt, params),
            EngineRequest("lora", prompt, params, adapter=adapters["all8"]),
        ],
    )
    assert collect(outs[0])[0] != collect(outs[1])[0]


def test_more_adapters_than_slots_queue_and_finish(
    make_engine: EngineFactory, adapters: dict[str, AdapterRef], tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = make_engine(max_lora_slots=1)
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    refs = [adapters[n] for n in ("all8", "qv4", "mlp16", "all8")]
    outs = run_all(engine, [EngineRequest(str(i), prompt, params, adapter=a) for i, a in enumerate(refs)])
    assert collect(outs[0])[0] == collect(outs[3])[0]
    assert all(o[-1].completion_tokens == 4 for o in outs)
    assert engine.core.adapters.refcounts() == [0]
