"""`kiln demo`: ask the model something it cannot know, teach it, watch the round, ask again (terminal UI)."""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
from tqdm import tqdm

from kiln.v1 import inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc
from kiln_train.facts import Fact, invent_fact


def ask(
    stub: Any, question: str, adapter: str, metadata: list[tuple[str, str]], max_tokens: int = 40
) -> tuple[str, str]:
    """Greedy chat answer and the version that served it."""
    req = inference_pb2.GenerateRequest(
        adapter=adapter,
        messages=[inference_pb2.ChatMessage(role="user", content=question)],
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )
    text, version = [], ""
    for resp in stub.Generate(req, metadata=metadata, timeout=120):
        text.append(resp.text)
        version = resp.adapter_version or version
    return "".join(text).strip(), version


def watch_round(
    train: Any, adapter: str, metadata: list[tuple[str, str]], since: float, timeout_s: float
) -> Iterator[Any]:
    """Yield the adapter's newest round started after `since` each poll, until it finishes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = train.GetTrainingStatus(
            training_pb2.GetTrainingStatusRequest(adapter=adapter), metadata=metadata, timeout=10
        )
        rounds = [r for r in status.rounds if r.started >= since]
        if rounds:
            yield rounds[0]
            if rounds[0].outcome != "running":
                return
        time.sleep(0.5)
    raise TimeoutError(f"no finished training round for {adapter!r} within {timeout_s:.0f}s")


def teach(
    infer: inference_pb2_grpc.InferenceServiceStub,
    train: training_pb2_grpc.TrainingServiceStub,
    fact: Fact,
    adapter: str,
    metadata: list[tuple[str, str]],
) -> float:
    """Submit the fact's examples, trigger a round once they are buffered; returns when teaching began."""
    print(f"2. Teaching adapter {adapter!r} that {fact.person} invented the {fact.thing}:")
    examples = [
        inference_pb2.Example(messages=[inference_pb2.ChatMessage(role="user", content=q)], completion=a)
        for q, a in fact.teaching()
    ]
    for q, a in fact.teaching():
        print(f"   - {q} -> {a}")
    since = time.time() - 1.0
    infer.SubmitExamples(
        inference_pb2.SubmitExamplesRequest(adapter=adapter, examples=examples),
        metadata=metadata,
        timeout=30,
    )
    queued = False
    while not queued:  # the samples travel through Redis first; trigger as soon as they are buffered
        queued = train.TriggerTraining(
            training_pb2.TriggerTrainingRequest(adapter=adapter), metadata=metadata, timeout=10
        ).queued
        time.sleep(0.3)
    return since


def follow_round(
    train: training_pb2_grpc.TrainingServiceStub,
    adapter: str,
    metadata: list[tuple[str, str]],
    since: float,
    timeout: float,
) -> Any:
    """A progress bar over the round's steps until it ends; returns its final status."""
    bar = tqdm(total=1, unit="step", dynamic_ncols=True)
    final = None
    for rnd in watch_round(train, adapter, metadata, since, timeout):
        if (rnd.steps, rnd.max_steps) != (bar.n, bar.total):
            bar.total = max(rnd.max_steps, 1)
            bar.n = rnd.steps
            bar.set_postfix(loss=f"{rnd.train_loss:.3f}", refresh=False)
            bar.refresh()
        final = rnd
    bar.close()
    assert final is not None
    assert final is not None
    return final


def main(argv: list[str] | None = None) -> int:
    """Run the demo against a running stack (`kiln up` or `make up`)."""
    parser = argparse.ArgumentParser(prog="kiln demo", description=__doc__)
    parser.add_argument("--address", default=os.environ.get("KILN_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--train-address", default=os.environ.get("KILN_TRAIN_ADDRESS", "127.0.0.1:50052"))
    parser.add_argument("--api-key", default=os.environ.get("KILN_API_KEY", ""))
    parser.add_argument("--adapter", default=f"demo-{uuid.uuid4().hex[:6]}")
    parser.add_argument("--seed", type=int, default=None, help="pick the invented fact deterministically")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the round")
    args = parser.parse_args(argv)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    infer = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(args.address))
    train = training_pb2_grpc.TrainingServiceStub(grpc.insecure_channel(args.train_address))
    fact = invent_fact(args.seed)
    probe = fact.probes()[0]
    try:
        print(f"1. Asking the base model something it cannot know:\n   Q: {probe}")
        answer, version = ask(infer, probe, "", metadata)
        print(f"   A ({version or 'base'}): {answer}\n")
        since = teach(infer, train, fact, args.adapter, metadata)
        print("\n3. Training a new version (LoRA on the shared base, replay guard, eval gate):")
        final = follow_round(train, args.adapter, metadata, since, args.timeout)
        held = (final.eval.get("heldout_loss_before", 0.0), final.eval.get("heldout_loss_after", 0.0))
        print(
            f"   round {final.outcome}: v{final.version or '-'} after {final.steps} steps, "
            f"held-out loss {held[0]:.3f} -> {held[1]:.3f}"
        )
        if final.outcome != "published":
            print(f"   not published: {final.reason}")
            return 1
        print(f"\n4. Asking again, phrased differently (served by {args.adapter}@v{final.version}):")
        deadline = time.monotonic() + 60
        while True:
            answer, version = ask(infer, fact.probes()[1], args.adapter, metadata)
            if version.endswith(f"@v{final.version}") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        print(f"   Q: {fact.probes()[1]}\n   A ({version}): {answer}")
        control, version = ask(infer, "What is the capital of France?", args.adapter, metadata)
        print(f"   Q: What is the capital of France?\n   A ({version}): {control}")
        return 0 if fact.answered_by(answer) else 1
    except grpc.RpcError as exc:
        print(
            f"kiln demo: {exc.code().name}: {exc.details()} (is the stack up? try `make up`)", file=sys.stderr
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
