"""AdapterService: versions, promotion, rollback, traffic splits and the event stream, per tenant."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from kiln.v1 import adapter_pb2, adapter_pb2_grpc
from kiln_common.adapter_store import validate_name
from kiln_common.auth import Authenticator
from kiln_common.registry import AdapterNotFoundError, EventType, Registry
from kiln_infer import convert
from kiln_infer.errors import InvalidArgumentError, UnavailableError, async_stream_errors, unary_errors
from kiln_infer.event_hub import EventHub
from kiln_infer.swapper import HotSwapper

log = logging.getLogger(__name__)


class AdapterServicer(adapter_pb2_grpc.AdapterServiceServicer):
    """Registry administration; every lifecycle RPC goes through `HotSwapper.change` (preload, op, flip)."""

    def __init__(
        self,
        *,
        registry: Registry,
        swapper: HotSwapper,
        auth: Authenticator,
        stopping: threading.Event,
        events: EventHub | None = None,
    ) -> None:
        self.registry = registry
        self.swapper = swapper
        self.auth = auth
        self.stopping = stopping
        self.events = events

    def _tenant(self, context: grpc.ServicerContext) -> str:
        return self.auth.tenant(context.invocation_metadata())

    @staticmethod
    def _name(adapter: str) -> str:
        if not adapter:
            raise InvalidArgumentError("adapter", "must not be empty")
        return validate_name(adapter)

    @unary_errors
    def ListAdapters(
        self,
        request: adapter_pb2.ListAdaptersRequest,  # noqa: N802 - gRPC method name
        context: grpc.ServicerContext,
    ) -> adapter_pb2.ListAdaptersResponse:
        """The tenant's adapters by name."""
        tenant = self._tenant(context)
        return adapter_pb2.ListAdaptersResponse(
            adapters=[convert.adapter_info_to_pb(s) for s in self.registry.list_adapters(tenant)]
        )

    @unary_errors
    def ListVersions(
        self,
        request: adapter_pb2.ListVersionsRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> adapter_pb2.ListVersionsResponse:
        """One adapter's versions, oldest first."""
        tenant = self._tenant(context)
        versions = self.registry.versions(tenant, self._name(request.adapter))
        return adapter_pb2.ListVersionsResponse(versions=[convert.version_to_pb(m) for m in versions])

    @unary_errors
    def PublishVersion(
        self,
        request: adapter_pb2.PublishVersionRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> adapter_pb2.PublishVersionResponse:
        """Copy a PEFT directory into the store as the next version (and promote it when asked)."""
        tenant = self._tenant(context)
        name = self._name(request.adapter)
        if not request.path:
            raise InvalidArgumentError("path", "must name a PEFT adapter directory on the server")
        meta = self.registry.publish(tenant, name, Path(request.path).expanduser())

        def promote() -> None:
            if request.promote:
                self.registry.promote(tenant, name, meta.version)

        self.swapper.change(tenant, name, [meta.version], promote)
        return adapter_pb2.PublishVersionResponse(adapter=name, version=meta.version)

    @unary_errors
    def Promote(
        self,
        request: adapter_pb2.PromoteRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> adapter_pb2.PromoteResponse:
        """Serve one version for all traffic."""
        tenant = self._tenant(context)
        name = self._name(request.adapter)
        if request.version < 0:
            raise InvalidArgumentError("version", f"must be >= 0, got {request.version}")
        self.registry.require_version(tenant, name, request.version)
        previous, current = self.swapper.change(
            tenant, name, [request.version], lambda: self.registry.promote(tenant, name, request.version)
        )
        return adapter_pb2.PromoteResponse(previous_version=previous, current_version=current)

    @unary_errors
    def Rollback(
        self,
        request: adapter_pb2.RollbackRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> adapter_pb2.RollbackResponse:
        """Go back to what the alias served before its last change."""
        tenant = self._tenant(context)
        name = self._name(request.adapter)
        state = self.registry.get(tenant, name)
        warm = [] if state.previous is None else [state.previous]
        previous, current = self.swapper.change(
            tenant, name, warm, lambda: self.registry.rollback(tenant, name)
        )
        return adapter_pb2.RollbackResponse(previous_version=previous, current_version=current)

    @unary_errors
    def SetTrafficSplit(
        self,
        request: adapter_pb2.SetTrafficSplitRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> adapter_pb2.SetTrafficSplitResponse:
        """Split traffic between versions by weight."""
        tenant = self._tenant(context)
        name = self._name(request.adapter)
        shares = convert.shares_from_pb(request.shares)
        for version, _ in shares:
            self.registry.require_version(tenant, name, version)
        split = self.swapper.change(
            tenant, name, [v for v, _ in shares], lambda: self.registry.set_split(tenant, name, shares)
        )
        return adapter_pb2.SetTrafficSplitResponse(
            shares=[adapter_pb2.TrafficShare(version=v, weight=w) for v, w in split]
        )

    @unary_errors
    def SetSamplingPolicy(
        self,
        request: adapter_pb2.SetSamplingPolicyRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> adapter_pb2.SetSamplingPolicyResponse:
        """Set the fraction of served generations recorded as samples."""
        tenant = self._tenant(context)
        name = self._name(request.adapter)
        if not 0.0 <= request.sample_rate <= 1.0:
            raise InvalidArgumentError("sample_rate", f"must be in [0, 1], got {request.sample_rate}")
        self.registry.set_sample_rate(tenant, name, request.sample_rate)
        self.swapper.view.refresh(tenant, name)
        return adapter_pb2.SetSamplingPolicyResponse(sample_rate=request.sample_rate)

    @async_stream_errors
    async def WatchEvents(
        self,
        request: adapter_pb2.WatchEventsRequest,  # noqa: N802
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[adapter_pb2.AdapterEvent]:
        """Stream the tenant's registry events from now on (ends when the server drains); costs no thread."""
        tenant = self._tenant(context)
        name = self._name(request.adapter) if request.adapter else ""
        if name:
            try:
                self.registry.get(tenant, name)
            except AdapterNotFoundError:
                raise AdapterNotFoundError(name) from None
        if self.events is None:
            raise UnavailableError("event watching is not enabled on this server")
        with self.events.subscribe() as queue:
            while (batch := await queue.get()) is not None:
                for event in batch:
                    if event.tenant == tenant and (not name or event.adapter == name):
                        if event.type in EventType:
                            yield convert.event_to_pb(event)
