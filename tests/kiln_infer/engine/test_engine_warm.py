"""The start-up warm-up runs adapter prefills to completion and leaves the engine serving as before."""

from __future__ import annotations

from kiln_common.model_loader import ModelSource
from kiln_infer.engine.types import EngineRequest, SamplingParams
from kiln_infer.engine_warm import WARM_KEY, warm_lora
from tests.kiln_infer.engine.conftest import EngineFactory


def test_warm_lora_runs_adapter_prefills_and_serving_goes_on(
    make_engine: EngineFactory, smol: ModelSource
) -> None:
    engine = make_engine()
    prompt = [1, 2, 3, 4, 5]
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    before = [t for o in engine.submit(EngineRequest("a", prompt, greedy)) for t in o.token_ids]
    seconds = warm_lora(engine, smol.config, lengths=(9, 40))
    assert seconds > 0
    assert WARM_KEY in engine.core.adapters.host_keys()  # it went through the adapter path
    after = [t for o in engine.submit(EngineRequest("b", prompt, greedy)) for t in o.token_ids]
    assert after == before and len(after) == 4  # the base model answers exactly as before
    assert engine.num_unfinished() == 0
