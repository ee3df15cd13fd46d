"""A version's answers, asked of kiln-infer through its public gRPC API (batched, concurrent).

kiln-train never generates a version's answers itself: kiln-infer's engine does it far faster and its greedy
answers are exactly what users are served. Each question is one `Generate` pinned to the version (`name@vN`,
or "" for the base model) with temperature 0; the calls run concurrently so the engine batches them, at
background priority (`x-kiln-priority`), so users' requests are admitted first. A round asks the parent's
answers (its reference) and, for the gate, the candidate's: the round registers the candidate as a version
that is not promoted, so kiln-infer answers it pinned and already holds its weights when the gate passes
and the alias flips.
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from kiln.v1 import inference_pb2, inference_pb2_grpc
from kiln_common.auth import ACT_AS_HEADER
from kiln_common.priority import PRIORITY_HEADER

log = logging.getLogger(__name__)

Messages = tuple[tuple[str, str], ...]


class ParentUnavailableError(RuntimeError):
    """kiln-infer could not answer for a version, parent or candidate (the round waits and retries)."""


@dataclass(frozen=True)
class ParentAnswer:
    """A version's greedy answer; `complete` is False when it stopped at max_tokens (no EOS added)."""

    text: str
    complete: bool


def adapter_ref(adapter: str, version: int) -> str:
    """What Generate pins to: "" for the base model (version 0), else "name@vN"."""
    return f"{adapter}@v{version}" if version > 0 else ""


def infer_key(environ_key: str) -> str | None:
    """kiln-train's key for kiln-infer (`KILN_TRAIN_INFER_KEY`): an admin key, sent with `x-kiln-tenant` to
    ask as each tenant; None when kiln-infer runs without keys (the key file holds only hashes, not keys).
    """
    return environ_key or None


def to_pb(
    adapter: str, messages: Messages, max_tokens: int, request_id: str
) -> inference_pb2.GenerateRequest:
    """A greedy GenerateRequest for one chat prompt."""
    return inference_pb2.GenerateRequest(
        adapter=adapter,
        messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        request_id=request_id,
    )


class ParentClient:
    """Asks kiln-infer (at `address`) for a version's greedy answers, `concurrency` requests in flight."""

    def __init__(
        self,
        address: str,
        key: str | None,
        concurrency: int = 32,
        timeout_s: float = 120.0,
    ) -> None:
        self.address = address
        self._key = key
        self._concurrency = concurrency
        self._timeout_s = timeout_s

    def _metadata(self, tenant: str) -> list[tuple[str, str]]:
        """As the tenant itself (no key when kiln-infer has none, else the admin key acting for the tenant),
        at background priority: a round's answers are admitted only when no user's request waits."""
        background = [(PRIORITY_HEADER, "background")]
        if self._key is None:
            return background
        return [("authorization", f"Bearer {self._key}"), (ACT_AS_HEADER, tenant), *background]

    def answers(
        self, tenant: str, adapter: str, version: int, prompts: list[Messages], max_tokens: int
    ) -> list[ParentAnswer]:
        """`version`'s greedy answers to `prompts`, in order; ParentUnavailableError if kiln-infer cannot."""
        if not prompts:
            return []
        metadata = self._metadata(tenant)
        ref = adapter_ref(adapter, version)
        batch = uuid.uuid4().hex[:8]
        with grpc.insecure_channel(self.address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=5.0)
            except grpc.FutureTimeoutError as exc:
                raise ParentUnavailableError(f"kiln-infer at {self.address} is unreachable") from exc
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            def one(i: int) -> ParentAnswer:
                request = to_pb(ref, prompts[i], max_tokens, f"kiln-train-{batch}-{i}")
                return _collect(stub.Generate(request, metadata=metadata, timeout=self._timeout_s))

            with ThreadPoolExecutor(max_workers=min(self._concurrency, len(prompts))) as pool:
                try:
                    return list(pool.map(one, range(len(prompts))))
                except grpc.RpcError as exc:
                    code = exc.code()  # type: ignore[attr-defined]
                    details = exc.details()  # type: ignore[attr-defined]
                    raise ParentUnavailableError(f"kiln-infer answered {code.name}: {details}") from exc


def _collect(stream: object) -> ParentAnswer:
    """Join a Generate stream; complete when it finished on the end-of-sequence token or a stop string."""
    parts: list[str] = []
    finish = inference_pb2.FINISH_REASON_UNSPECIFIED
    for response in stream:  # type: ignore[attr-defined]
        parts.append(response.text)
        if response.finish_reason:
            finish = response.finish_reason
    complete = finish in (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_STOP_STRING)
    return ParentAnswer("".join(parts).strip(), complete)
