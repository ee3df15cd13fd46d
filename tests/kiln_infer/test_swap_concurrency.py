"""Promote, rollback and upload while many streams are live: no response mixes versions, none fails, and
after a rollback the alias answers token for token as the older version did."""

from __future__ import annotations

import uuid
from concurrent import futures
from pathlib import Path

from kiln.v1 import adapter_pb2 as apb
from kiln.v1 import inference_pb2 as pb
from kiln_common.model_loader import ModelSource
from tests.conftest import make_peft_adapter
from tests.kiln_infer.conftest import Client, upload

STREAMS = 32
SAMPLING = pb.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPT = "Once upon a time"


def _generate(client: Client, adapter: str) -> tuple[set[str], list[int]]:
    """(labels seen in the stream, all its tokens)."""
    request = pb.GenerateRequest(prompt=PROMPT, adapter=adapter, sampling=SAMPLING)
    responses = list(client.inference.Generate(request, metadata=client.metadata, timeout=300))
    return {r.adapter_version for r in responses}, [t for r in responses for t in r.token_ids]


def test_changes_during_live_streams(alice: Client, smollm2: ModelSource, tmp_path: Path) -> None:
    name = f"live-{uuid.uuid4().hex[:6]}"
    for i in (1, 2):
        upload(alice, name, make_peft_adapter(smollm2, tmp_path / f"v{i}", seed=30 + i), promote=i == 1)
    expected = {f"{name}@v{v}": _generate(alice, f"{name}@v{v}")[1] for v in (1, 2)}
    assert expected[f"{name}@v1"] != expected[f"{name}@v2"]
    md = alice.metadata
    changes = [
        lambda: alice.adapters.Promote(apb.PromoteRequest(adapter=name, version=2), metadata=md),
        lambda: alice.adapters.Rollback(apb.RollbackRequest(adapter=name), metadata=md),
        lambda: upload(alice, name, make_peft_adapter(smollm2, tmp_path / "v3", seed=33)),
        lambda: alice.adapters.Promote(apb.PromoteRequest(adapter=name, version=2), metadata=md),
    ]
    with futures.ThreadPoolExecutor(STREAMS) as pool:
        live = []
        for wave in range(len(changes)):  # a wave of streams, then a change while they are still running
            live += [pool.submit(_generate, alice, name) for _ in range(STREAMS // len(changes))]
            changes[wave]()
        results = [f.result(timeout=300) for f in live]
    served = {label for labels, _ in results for label in labels}
    assert served == set(expected)  # the changes really happened while streams were live
    for labels, tokens in results:
        assert len(labels) == 1  # one version per response, start to end
        label = labels.pop()
        assert label in expected, label
        assert tokens == expected[label]
    rollback = alice.adapters.Rollback(apb.RollbackRequest(adapter=name), metadata=md)
    assert rollback.current_version == 1
    assert _generate(alice, name) == ({f"{name}@v1"}, expected[f"{name}@v1"])
