"""Admission queue time: a request that cannot start within max_queue_time_s ends QUEUE_TIMEOUT, not later."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kiln_infer.engine.types import EngineRequest, FinishReason
from tests.kiln_infer.engine.conftest import EngineFactory, greedy


def test_a_request_that_waits_too_long_to_start_is_ended_and_the_running_one_finishes(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(max_num_seqs=1, max_queue_time_s=0.3)
    running = engine.submit(EngineRequest("runs", [1, 2, 3, 4], greedy(60, ignore_eos=True)))
    started = time.monotonic()
    queued = list(engine.submit(EngineRequest("queued", [5, 6, 7, 8], greedy(4, ignore_eos=True))))
    waited = time.monotonic() - started
    assert queued[-1].finish_reason == FinishReason.QUEUE_TIMEOUT
    assert sum(len(o.token_ids) for o in queued) == 0  # it never started
    assert 0.3 <= waited < 5.0
    done = list(running)
    assert done[-1].finish_reason == FinishReason.LENGTH and sum(len(o.token_ids) for o in done) == 60
    assert engine.num_unfinished() == 0


def test_without_a_limit_queued_requests_wait_their_turn(make_engine: EngineFactory) -> None:
    engine = make_engine(max_num_seqs=1)
    first = engine.submit(EngineRequest("a", [1, 2, 3, 4], greedy(8, ignore_eos=True)))
    second = engine.submit(EngineRequest("b", [5, 6, 7, 8], greedy(8, ignore_eos=True)))
    assert list(first)[-1].finish_reason == FinishReason.LENGTH
    assert list(second)[-1].finish_reason == FinishReason.LENGTH


def test_the_engine_raises_its_turn_flag_around_every_launch(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """kiln-train reads the flag to stay off the device while serving launches a step (gpu_turn.py)."""
    from kiln_common.gpu_turn import ServingTurn, TrainingTurn

    engine = make_engine()
    core = engine.core
    core.turn = ServingTurn(tmp_path, torch.device("cpu"))
    training = TrainingTurn(core.turn.path, None)
    seen: list[bool] = []
    execute = core.runner.execute

    def watched(*args: object, **kwargs: object) -> object:
        seen.append(training.serving_busy())
        return execute(*args, **kwargs)  # type: ignore[arg-type]

    core.runner.execute = watched  # type: ignore[method-assign]
    out = list(engine.submit(EngineRequest("r", [1, 2, 3, 4], greedy(5, ignore_eos=True))))
    assert sum(len(o.token_ids) for o in out) == 5
    assert len(seen) >= 5 and all(seen)  # every launch ran with the flag up
    assert not training.serving_busy()  # and it is down between steps
    training.close()
    core.turn.close()
