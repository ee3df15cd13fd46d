"""The start-up warm-up runs adapter prefills to completion and leaves the engine serving as before."""

from __future__ import annotations

from kiln_common.model_loader import ModelSource
from kiln_infer.engine.types import EngineRequest, SamplingParams
from kiln_infer.engine_warm import WARM_KEY, split_sweep, warm_lora
from tests.kiln_infer.engine.conftest import EngineFactory


def test_warm_lora_runs_adapter_prefills_and_serving_goes_on(
    make_engine: EngineFactory, smol: ModelSource
) -> None:
    engine = make_engine()
    prompt = [1, 2, 3, 4, 5]
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    before = [t for o in engine.submit(EngineRequest("a", prompt, greedy)) for t in o.token_ids]
    seconds = warm_lora(engine, smol.config, lengths=(9, 40), sweep=False, mix_rows=(3,))
    assert seconds > 0
    assert WARM_KEY in engine.core.adapters.host_keys()  # it went through the adapter path
    after = [t for o in engine.submit(EngineRequest("b", prompt, greedy)) for t in o.token_ids]
    assert after == before and len(after) == 4  # the base model answers exactly as before
    assert engine.num_unfinished() == 0


def test_the_split_sweep_reaches_every_count_of_splits_for_every_group_of_modules() -> None:
    from kiln_infer.kernels.bgmv import MAX_MODULES, MAX_SHRINK_SPLITS, SHRINK_PROGRAMS
    from kiln_infer.kernels.lora_segments import BLOCK_M, cdiv

    lengths = split_sweep(16384)
    assert lengths == sorted(set(lengths)) and max(lengths) <= 16384 and min(lengths) >= BLOCK_M
    every = {1 << i for i in range(MAX_SHRINK_SPLITS.bit_length())}  # 1, 2, 4, 8, 16
    for modules in range(1, MAX_MODULES + 1):
        reached = set()
        for n in lengths:
            want = min(MAX_SHRINK_SPLITS, max(1, cdiv(SHRINK_PROGRAMS, cdiv(n, BLOCK_M) * modules)))
            reached.add(1 << (want.bit_length() - 1))
        assert reached == every, (modules, reached)
    assert max(split_sweep(512)) <= 512  # capped by the engine's token budget
