"""Presence / frequency penalties in the sampler against a plain-Python reference (OpenAI's formula)."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.v1 import inference_pb2
from kiln_infer.convert import Limits, sampling_from_pb
from kiln_infer.engine.sampler import SamplingBatch, apply_output_penalties, sample
from kiln_infer.engine.types import SamplingParams
from kiln_infer.errors import InvalidArgumentError

LIMITS = Limits(max_request_bytes=1 << 20, max_stop_strings=4, max_stop_chars=64, max_messages=64)


def _reference(row: list[float], generated: list[int], presence: float, frequency: float) -> list[float]:
    """logit[t] - frequency * count[t] - presence * (count[t] > 0), written out token by token."""
    out = list(row)
    for t in set(generated):
        count = generated.count(t)
        out[t] -= frequency * count + presence * (1.0 if count > 0 else 0.0)
    return out


def test_penalties_match_the_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    outputs = [[3, 3, 7, 49], [], [1, 2, 3], [0, 0, 0, 0, 5]]
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=1.0),  # nothing generated yet: unchanged
        SamplingParams(),  # no penalties: unchanged
        SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0),
    ]
    expected = [
        _reference(logits[i].tolist(), outputs[i], params[i].presence_penalty, params[i].frequency_penalty)
        for i in range(4)
    ]
    apply_output_penalties(logits, outputs, params)
    for got, want in zip(logits.tolist(), expected, strict=True):
        assert got == pytest.approx(want, abs=1e-6)


def test_a_large_frequency_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    batch = SamplingBatch(
        params=[SamplingParams(temperature=0.0, frequency_penalty=2.0)], seeds=[0], steps=[3], history=[[]]
    )
    assert sample(logits.clone(), batch).token_ids == [0]  # no outputs given: no penalty
    batch.outputs = [[0]]
    assert sample(logits.clone(), batch).token_ids == [1]  # 5 - 2 < 4


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.5, -2.01, math.inf, math.nan])
def test_out_of_range_penalties_name_the_field(name: str, value: float) -> None:
    with pytest.raises(InvalidArgumentError, match=f"sampling.{name}"):
        sampling_from_pb(inference_pb2.SamplingParams(**{name: value}), LIMITS)


def test_penalties_reach_the_engine_params() -> None:
    params, _ = sampling_from_pb(
        inference_pb2.SamplingParams(presence_penalty=0.5, frequency_penalty=-1.5), LIMITS
    )
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.5)
    assert params.uses_output_penalties
    assert not sampling_from_pb(inference_pb2.SamplingParams(), LIMITS)[0].uses_output_penalties
