"""AdapterService: versions, uploads, promotion, rollback, splits, canaries and events, per tenant and role.

Every RPC acts for the caller's tenant (an admin may name another with `x-kiln-tenant`); another tenant's
adapter is never named, so reaching for it fails exactly as a nonexistent one does. Importing a server path is
an admin operation, and only under the configured import root.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc

from kiln.v1 import adapter_pb2, adapter_pb2_grpc
from kiln_common.adapter_store import VersionMeta, validate_name
from kiln_common.auth import Authenticator, Caller
from kiln_common.canary import Canaries, CanaryState
from kiln_common.errors import InvalidAdapterError, PermissionDeniedError
from kiln_common.registry import AdapterNotFoundError, AdapterState, EventType, Registry
from kiln_infer import convert
from kiln_infer.errors import InvalidArgumentError, UnavailableError, async_stream_errors, unary_errors
from kiln_infer.event_hub import EventHub
from kiln_infer.swapper import HotSwapper

log = logging.getLogger(__name__)


def canary_to_pb(c: CanaryState) -> adapter_pb2.CanaryInfo:
    """CanaryState → CanaryInfo."""
    return adapter_pb2.CanaryInfo(
        version=c.version,
        baseline_version=c.baseline,
        share=c.share,
        min_requests=c.min_requests,
        candidate_rated=c.candidate_rated,
        candidate_mean=c.candidate_mean,
        baseline_rated=c.baseline_rated,
        baseline_mean=c.baseline_mean,
    )


def import_path(raw: str, root: Path | None) -> Path:
    """The directory an admin's PublishVersion names, if it lies under `root` with no symlink on the way.

    The check is lexical first, so a path outside the root is refused without touching the filesystem (the
    answer never says whether it exists).
    """
    if root is None:
        raise PermissionDeniedError("importing a server path is disabled (the server has no --import-root)")
    path = Path(os.path.normpath(root / Path(raw).expanduser()))
    if path != root and root not in path.parents:
        raise PermissionDeniedError("path must lie under the server's import root")
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            raise InvalidAdapterError(
                f"{current.relative_to(root)} is a symlink; imports follow none", "path"
            )
    return path


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
        import_root: Path | None = None,
        canaries: Canaries | None = None,
    ) -> None:
        self.registry = registry
        self.swapper = swapper
        self.auth = auth
        self.stopping = stopping
        self.events = events
        self.import_root = import_root
        self.canaries = canaries or Canaries(registry)

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        return self.auth.caller(context.invocation_metadata())

    def _tenant(self, context: grpc.ServicerContext) -> str:
        return self._caller(context).tenant

    @staticmethod
    def _name(adapter: str) -> str:
        if not adapter:
            raise InvalidArgumentError("adapter", "must not be empty")
        return validate_name(adapter)

    def _info(self, state: AdapterState) -> adapter_pb2.AdapterInfo:
        info = convert.adapter_info_to_pb(state)
        canary = self.canaries.get(state.tenant, state.name)
        if canary is not None:
            info.canary.CopyFrom(canary_to_pb(canary))
        return info

    def _version(self, tenant: str, name: str, meta: VersionMeta) -> adapter_pb2.VersionInfo:
        info = convert.version_to_pb(meta)
        for note in self.registry.history(tenant, name, meta.version):
            info.history.add(time=note["time"], action=note["action"], reason=note["reason"])
        return info

    @unary_errors
    def ListAdapters(
        self,
        request: adapter_pb2.ListAdaptersRequest,  # noqa: N802 - gRPC method name
        context: grpc.ServicerContext,
    ) -> adapter_pb2.ListAdaptersResponse:
        """The tenant's adapters by name."""
        tenant = self._tenant(context)
        return adapter_pb2.ListAdaptersResponse(
            adapters=[self._info(s) for s in self.registry.list_adapters(tenant)]
        )

    @unary_errors
    def ListVersions(
        self,
        request: adapter_pb2.ListVersionsRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> adapter_pb2.ListVersionsResponse:
        """One adapter's versions, oldest first, with their history."""
        tenant = self._tenant(context)
        name = self._name(request.adapter)
        versions = self.registry.versions(tenant, name)
        return adapter_pb2.ListVersionsResponse(versions=[self._version(tenant, name, m) for m in versions])

    def _publish_staged(self, tenant: str, name: str, staged: Path, promote: bool) -> VersionMeta:
        """Load a checked staging directory through the engine, then number it, then (maybe) promote."""
        try:
            self.swapper.verify(staged)
        except BaseException:
            self.registry.store.discard(staged)
            raise
        meta = self.registry.publish_staged(tenant, name, staged)

        def flip() -> None:
            if promote:
                self.registry.promote(tenant, name, meta.version)

        self.swapper.change(tenant, name, [meta.version], flip)
        return meta

    @unary_errors
    def PublishVersion(
        self,
        request: adapter_pb2.PublishVersionRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> adapter_pb2.PublishVersionResponse:
        """Import a PEFT directory from under the import root (admin only) as the next version."""
        caller = self._caller(context)
        caller.require_admin("importing a server path (PublishVersion; use UploadVersion)")
        name = self._name(request.adapter)
        if not request.path:
            raise InvalidArgumentError("path", "must name a PEFT adapter directory under the import root")
        staged = self.registry.store.stage(import_path(request.path, self.import_root))
        meta = self._publish_staged(caller.tenant, name, staged, request.promote)
        return adapter_pb2.PublishVersionResponse(adapter=name, version=meta.version)

    @unary_errors
    def UploadVersion(
        self,
        request_iterator: Iterator[adapter_pb2.UploadVersionRequest],  # noqa: N802
        context: grpc.ServicerContext,
    ) -> adapter_pb2.UploadVersionResponse:
        """Receive a header and the weights in chunks; check in full, then number and publish."""
        tenant = self._tenant(context)
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgumentError("header", "the first message of an upload must be its header")
        header = first.header
        name = self._name(header.adapter)

        def chunks() -> Iterator[bytes]:
            for part in request_iterator:
                if part.HasField("header"):
                    raise InvalidArgumentError("header", "only the first message may be a header")
                yield part.weights_chunk

        staged = self.registry.store.receive(
            header.adapter_config_json, chunks(), int(header.weights_bytes), header.weights_sha256
        )
        meta = self._publish_staged(tenant, name, staged, header.promote)
        return adapter_pb2.UploadVersionResponse(adapter=name, version=meta.version, sha256=meta.sha256)

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
        self.canaries.cancel(tenant, name, f"promoted v{request.version} by hand")
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
        self.canaries.cancel(tenant, name, "rolled back by hand")
        return adapter_pb2.RollbackResponse(previous_version=previous, current_version=current)

    @unary_errors
    def SetTrafficSplit(
        self,
        request: adapter_pb2.SetTrafficSplitRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> adapter_pb2.SetTrafficSplitResponse:
        """Split traffic between versions by weight (finite, > 0)."""
        tenant = self._tenant(context)
        name = self._name(request.adapter)
        shares = convert.shares_from_pb(request.shares)
        for version, _ in shares:
            self.registry.require_version(tenant, name, version)
        split = self.swapper.change(
            tenant, name, [v for v, _ in shares], lambda: self.registry.set_split(tenant, name, shares)
        )
        self.canaries.cancel(tenant, name, "traffic split set by hand")
        return adapter_pb2.SetTrafficSplitResponse(
            shares=[adapter_pb2.TrafficShare(version=v, weight=w) for v, w in split]
        )

    @unary_errors
    def StartCanary(
        self,
        request: adapter_pb2.StartCanaryRequest,  # noqa: N802
        context: grpc.ServicerContext,
    ) -> adapter_pb2.StartCanaryResponse:
        """Send a share of traffic to a candidate; its feedback then promotes or rolls it back."""
        tenant = self._tenant(context)
        name = self._name(request.adapter)
        if request.version < 1:
            raise InvalidArgumentError("version", f"must be >= 1, got {request.version}")
        self.registry.require_version(tenant, name, request.version)
        canary = self.swapper.change(
            tenant,
            name,
            [request.version],
            lambda: self.canaries.start(tenant, name, request.version, request.share, request.min_requests),
        )
        return adapter_pb2.StartCanaryResponse(canary=canary_to_pb(canary))

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
