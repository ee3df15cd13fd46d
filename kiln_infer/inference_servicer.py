"""InferenceService: streaming generation, feedback and curated examples."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc

from kiln.v1 import inference_pb2, inference_pb2_grpc
from kiln_common.adapter_alias import AdapterState, ResolvedAdapter
from kiln_common.adapter_store import validate_name
from kiln_common.auth import Authenticator
from kiln_common.canary import Canaries
from kiln_common.load_report import LoadWindow
from kiln_common.priority import is_background
from kiln_common.registry import Registry
from kiln_common.sample_recorder import SampleRecorder
from kiln_common.samples import Sample, SampleKind
from kiln_common.tenant_limits import LimitSettings, TenantLimits
from kiln_infer import convert
from kiln_infer.engine.types import EngineOverloadedError, EngineRequest, FinishReason
from kiln_infer.engine_link import EngineClient, OutputStream
from kiln_infer.errors import (
    DeadlineExceededError,
    EngineAbortedError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    async_stream_errors,
    code_for,
    unary_errors,
)
from kiln_infer.metrics import RequestMetrics
from kiln_infer.prompt_renderer import PromptRenderer
from kiln_infer.request_log import RequestLog, ServedRequest
from kiln_infer.request_observer import RequestObserver
from kiln_infer.swapper import AdapterView, engine_ref, sticky_key

log = logging.getLogger(__name__)

# Request ids kiln-train uses when it asks for a parent version's answers (see kiln_train/parent_client.py).
TRAINER_REQUEST_PREFIX = "kiln-train-"
REMEMBER_WAIT_S = 1.0  # the longest the last response waits for the request log write (feedback needs it)


@dataclass(frozen=True)
class ModelInfo:
    """What GetModelInfo reports."""

    model: str
    architecture: str
    max_context_tokens: int
    vocab_size: int
    dtype: str
    device: str
    max_lora_rank: int
    max_lora_slots: int
    version: str
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    kv_cache_tokens: int = 0


@dataclass(frozen=True)
class Served:
    """What a Generate was resolved to: tenant, validated input, adapter version and its state."""

    tenant: str
    inp: convert.GenerateInput
    resolved: ResolvedAdapter | None
    state: AdapterState | None

    @property
    def label(self) -> str:
        """The served version as responses name it ("" for the base model)."""
        return self.resolved.label if self.resolved else ""


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Generate / SubmitFeedback / SubmitExamples / GetModelInfo over the engine."""

    def __init__(
        self,
        *,
        engine: EngineClient,
        renderer: PromptRenderer,
        info: ModelInfo,
        limits: convert.Limits,
        auth: Authenticator,
        view: AdapterView,
        registry: Registry,
        recorder: SampleRecorder,
        requests: RequestLog,
        stopping: threading.Event,
        metrics: RequestMetrics | None = None,
        canaries: Canaries | None = None,
        tenant_limits: TenantLimits | None = None,
        load_window: LoadWindow | None = None,
    ) -> None:
        self.engine = engine
        self.renderer = renderer
        self.info = info
        self.limits = limits
        self.auth = auth
        self.view = view
        self.registry = registry
        self.recorder = recorder
        self.requests = requests
        self.stopping = stopping
        self.metrics = metrics
        self.canaries = canaries
        self.tenant_limits = tenant_limits or TenantLimits(LimitSettings())
        self.load_window = load_window
        self._rng = random.Random()

    def _tenant(self, context: grpc.ServicerContext) -> str:
        return self.auth.tenant(context.invocation_metadata())

    def _max_tokens(self, inp: convert.GenerateInput, prompt_len: int) -> int:
        room = self.info.max_context_tokens - prompt_len
        field = "messages" if inp.messages else "prompt"
        if room <= 0:
            raise InvalidArgumentError(
                field, f"{prompt_len} tokens fill the {self.info.max_context_tokens}-token context window"
            )
        if inp.max_tokens is None:
            return min(convert.DEFAULT_MAX_TOKENS, room)
        if inp.max_tokens > room:
            raise InvalidArgumentError(
                "sampling.max_tokens",
                f"{inp.max_tokens} new tokens after a {prompt_len}-"
                f"token prompt exceed the {self.info.max_context_tokens}-token context",
            )
        return inp.max_tokens

    @async_stream_errors
    async def Generate(
        self,
        request: inference_pb2.GenerateRequest,  # noqa: N802 - gRPC method name
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Stream a completion as the engine produces it, pinned to one adapter version.

        Runs on the asyncio loop: an open stream costs no thread. Each response carries every increment
        that arrived since the last one was sent, so a slow reader gets fewer, larger messages.
        """
        arrived = time.monotonic()
        tenant = self._tenant(context)
        if self.stopping.is_set():
            raise UnavailableError("the server is draining; retry on another replica")
        inp = convert.generate_from_pb(request, self.limits)
        prompt_ids = self._prompt_ids(inp)
        sampling = replace(inp.sampling, max_tokens=self._max_tokens(inp, len(prompt_ids)))
        self.tenant_limits.admit_request(tenant)
        metadata = context.invocation_metadata()
        background = is_background(metadata)
        resolved, state = self.view.resolve(tenant, inp.adapter, sticky_key(metadata))
        remaining = context.time_remaining()
        engine_request = EngineRequest(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=prompt_ids,
            sampling=sampling,
            adapter=engine_ref(resolved),
            deadline=time.monotonic() + remaining if remaining is not None else None,
            background=background,
        )
        with self.tenant_limits.stream(tenant):
            stream = self.engine.submit(engine_request)
            served = Served(tenant, inp, resolved, state)
            observer = RequestObserver(
                self.metrics, inp.request_id, tenant, served.label, arrived, self.load_window
            )
            async for response in self._responses(
                stream, engine_request.request_id, served, observer, context
            ):
                yield response

    async def _responses(
        self,
        stream: OutputStream,
        engine_id: str,
        served: Served,
        observer: RequestObserver,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """The stream's increments as responses; on any early end the engine frees the sequence."""
        status = "OK"
        completion: list[str] = []
        try:
            async for out in stream.outputs():
                observer.output(out)
                if out.finish_reason == FinishReason.ABORTED:
                    self._raise_aborted(context, engine_id)
                if out.finish_reason == FinishReason.QUEUE_TIMEOUT:
                    raise EngineOverloadedError(
                        "the request waited too long for a place in the batch (--max-queue-time)"
                    )
                completion.append(out.text)
                if out.finished:
                    await self._remember_before_last(served, "".join(completion))
                if out.token_ids or out.text or out.finished:
                    yield convert.generate_to_pb(
                        out, served.inp.request_id, served.label, self.renderer.decode_one
                    )
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception as exc:
            status = code_for(exc).name  # the wrapper logs the incident once, when it aborts
            raise
        finally:
            observer.done(status)
            if not stream.done:  # cancelled, deadline passed, or failed: free the sequence in the engine
                self.engine.abort(engine_id)

    def _prompt_ids(self, inp: convert.GenerateInput) -> list[int]:
        if not inp.prompt_token_ids:
            return self.renderer.token_ids(inp.prompt, inp.messages)
        bad = next((t for t in inp.prompt_token_ids if not 0 <= t < self.info.vocab_size), None)
        if bad is not None:
            raise InvalidArgumentError("prompt_token_ids", f"{bad} is outside [0, {self.info.vocab_size})")
        return list(inp.prompt_token_ids)

    @staticmethod
    def _raise_aborted(context: grpc.aio.ServicerContext, engine_id: str) -> None:
        """An abort the client did not ask for is an error, never a silently short answer."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0.05:
            raise DeadlineExceededError("deadline exceeded")
        raise EngineAbortedError(f"the engine aborted request {engine_id} (server draining or failing)")

    async def _remember_before_last(self, served: Served, completion: str) -> None:
        """Log the request and maybe record it as a sample, off the event loop (it talks to Redis), before the
        last response goes out: a SubmitFeedback sent the moment the stream ends finds its request. A Redis
        slower than REMEMBER_WAIT_S does not hold the stream; the write goes on behind it."""
        name, version = (served.resolved.name, served.resolved.version) if served.resolved else ("", 0)
        rate = served.state.sample_rate if served.state else 0.0
        args = (served.tenant, served.inp, name, version, completion, rate)
        written = asyncio.get_running_loop().run_in_executor(None, self._remember, *args)
        try:
            await asyncio.wait_for(asyncio.shield(written), REMEMBER_WAIT_S)
        except TimeoutError:
            log.warning(
                "request %s: its log entry took over %.1f s to write; the stream ended before it",
                served.inp.request_id,
                REMEMBER_WAIT_S,
            )

    def _remember(
        self,
        tenant: str,
        inp: convert.GenerateInput,
        adapter: str,
        version: int,
        completion: str,
        sample_rate: float,
    ) -> None:
        """Log the request for feedback and record it as a sample by the adapter's policy (never raises)."""
        if inp.request_id.startswith(TRAINER_REQUEST_PREFIX):
            return  # kiln-train asking for a parent's answers: not a served generation to learn from
        if inp.prompt_token_ids:  # a pre-tokenized prompt is kept as its text, like any other
            inp = replace(inp, prompt=str(self.renderer.tokenizer.decode(list(inp.prompt_token_ids))))
        self.requests.put(
            ServedRequest(
                tenant=tenant,
                request_id=inp.request_id,
                adapter=adapter,
                version=version,
                prompt=inp.prompt,
                messages=inp.messages,
                completion=completion,
            )
        )
        if adapter and sample_rate > 0 and self._rng.random() < sample_rate:
            self.recorder.record(
                Sample(
                    kind=SampleKind.GENERATION,
                    tenant=tenant,
                    adapter=adapter,
                    prompt=inp.prompt,
                    messages=inp.messages,
                    completion=completion,
                    adapter_version=version,
                    request_id=inp.request_id,
                )
            )

    def _check_size(self, request: object) -> None:
        size = request.ByteSize()  # type: ignore[attr-defined]
        if size > self.limits.max_request_bytes:
            raise InvalidArgumentError(
                "request", f"{size} bytes exceeds the limit of {self.limits.max_request_bytes}"
            )

    @unary_errors
    def SubmitFeedback(
        self,
        request: inference_pb2.SubmitFeedbackRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> inference_pb2.SubmitFeedbackResponse:
        """Record a rating and/or correction joined to the served request it rates (the one join)."""
        tenant = self._tenant(context)
        self._check_size(request)
        if not request.request_id:
            raise InvalidArgumentError("request_id", "must name the generation being rated")
        has_rating = request.HasField("rating")
        if has_rating and not -1.0 <= request.rating <= 1.0:
            raise InvalidArgumentError("rating", f"must be in [-1, 1], got {request.rating}")
        if not has_rating and not request.correction.strip():
            raise InvalidArgumentError("rating", "set a rating and/or a correction")
        served = self.requests.get(tenant, request.request_id)
        if served is None:
            raise NotFoundError(f"request {request.request_id!r} not found (unknown or expired)")
        adapter, version = served.adapter, served.version
        if not adapter:
            if not request.adapter:
                raise FailedPreconditionError(
                    "the request was served by the base model; set `adapter` to teach one"
                )
            adapter, version = validate_name(request.adapter), 0
            self.registry.create(tenant, adapter)
        rating = request.rating if has_rating else None
        self.tenant_limits.admit_samples(tenant, 1)
        if self.canaries is not None:
            self.canaries.record(tenant, adapter, version, rating)
        sample = served.feedback(adapter, version, rating, request.correction)
        return inference_pb2.SubmitFeedbackResponse(sample_id=self.recorder.write([sample])[0])

    @unary_errors
    def SubmitExamples(
        self,
        request: inference_pb2.SubmitExamplesRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> inference_pb2.SubmitExamplesResponse:
        """Record curated demonstrations, creating the adapter (v0 = base model) if it is new."""
        tenant = self._tenant(context)
        self._check_size(request)
        if not request.adapter:
            raise InvalidArgumentError("adapter", "name the adapter to teach")
        name = validate_name(request.adapter)
        if not request.examples:
            raise InvalidArgumentError("examples", "at least one example is required")
        samples = []
        for i, ex in enumerate(request.examples):
            prompt, messages = convert.prompt_or_messages(
                ex.prompt, ex.messages, f"examples[{i}].", self.limits
            )
            if not ex.completion.strip():
                raise InvalidArgumentError(f"examples[{i}].completion", "must not be empty")
            samples.append(
                Sample(
                    kind=SampleKind.EXAMPLE,
                    tenant=tenant,
                    adapter=name,
                    prompt=prompt,
                    messages=messages,
                    completion=ex.completion,
                )
            )
        self.tenant_limits.admit_samples(tenant, len(samples))
        self.registry.create(tenant, name)
        state = self.view.state(tenant, name)
        ids = self.recorder.write([replace(s, adapter_version=state.current) for s in samples])
        return inference_pb2.SubmitExamplesResponse(accepted=len(ids), sample_ids=ids)

    @unary_errors
    def GetModelInfo(
        self,
        request: inference_pb2.GetModelInfoRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> inference_pb2.GetModelInfoResponse:
        """Describe the base model and the server's limits."""
        self._tenant(context)
        i = self.info
        return inference_pb2.GetModelInfoResponse(
            model=i.model,
            architecture=i.architecture,
            max_context_tokens=i.max_context_tokens,
            vocab_size=i.vocab_size,
            dtype=i.dtype,
            device=i.device,
            max_lora_rank=i.max_lora_rank,
            max_lora_slots=i.max_lora_slots,
            version=i.version,
            max_num_seqs=i.max_num_seqs,
            max_num_batched_tokens=i.max_num_batched_tokens,
            kv_cache_tokens=i.kv_cache_tokens,
        )
