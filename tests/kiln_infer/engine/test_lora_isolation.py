"""A NaN adapter that got past every check changes no other request's tokens (base model's or A's)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from kiln_infer.engine.types import AdapterRef, EngineRequest, SamplingParams
from kiln_infer.lora.peft_loader import LoraWeights, load_peft_adapter
from tests.kiln_infer.engine.conftest import PROMPTS, EngineFactory, collect, run_all


def _poisoned(adapter: AdapterRef) -> LoraWeights:
    """The adapter's weights with every lora_B NaN (what a hostile tenant would publish)."""
    weights = load_peft_adapter("bob/nan@v1", adapter.path, max_rank=16)
    weights.b = {k: torch.full_like(v, float("nan")) for k, v in weights.b.items()}
    return weights


def test_nan_adapter_leaves_other_requests_unchanged(
    make_engine: EngineFactory, adapters: dict[str, AdapterRef], tokenizer: PreTrainedTokenizerBase
) -> None:
    engine = make_engine(max_num_batched_tokens=64)
    good = adapters["all8"]
    bad = AdapterRef(key="bob/nan@v1", path=Path(adapters["qv4"].path))
    manager = engine.core.adapters
    with manager._host_lock:  # slip the NaN weights in past the loader's checks: "even if it got in"
        manager._host[bad.key] = _poisoned(adapters["qv4"])
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def run(with_bad: bool) -> list[list[int]]:
        requests = [
            EngineRequest("base", prompt, params),
            EngineRequest("alice", prompt, params, adapter=good),
        ]
        if with_bad:
            requests.append(EngineRequest("bob", prompt, params, adapter=bad))
        return [collect(out)[0] for out in run_all(engine, requests)]

    clean = run(with_bad=False)
    mixed = run(with_bad=True)
    assert mixed[:2] == clean  # same batches as the NaN adapter, same tokens
    assert run(with_bad=False) == clean  # and nothing lingers afterwards
