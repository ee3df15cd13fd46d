"""gRPC TrainingService: the only place kiln-train touches training_pb2 (plain dataclasses inside)."""

from __future__ import annotations

from typing import Any

import grpc

from kiln.v1 import training_pb2, training_pb2_grpc
from kiln_common.adapter_store import validate_name
from kiln_common.auth import Authenticator, Caller
from kiln_common.grpc_status import unary_errors
from kiln_train.daemon import DaemonState, DaemonStatus, TrainingDaemon
from kiln_train.round_record import RoundRecord
from kiln_train.tenant_pauses import TenantPauses

_STATES = {
    DaemonState.IDLE: training_pb2.TRAINER_STATE_IDLE,
    DaemonState.TRAINING: training_pb2.TRAINER_STATE_TRAINING,
    DaemonState.PAUSED: training_pb2.TRAINER_STATE_PAUSED,
    DaemonState.WAITING_FOR_BASE: training_pb2.TRAINER_STATE_WAITING_FOR_BASE,
}


def round_to_pb(r: RoundRecord) -> training_pb2.TrainingRound:
    """RoundRecord → TrainingRound."""
    return training_pb2.TrainingRound(
        adapter=r.adapter,
        parent_version=r.parent_version,
        version=r.version,
        outcome=r.outcome,
        reason=r.reason,
        num_samples=r.num_samples,
        steps=r.steps,
        train_loss=r.train_loss,
        eval={k: float(v) for k, v in r.eval.items()},
        started=r.started,
        finished=r.finished,
        max_steps=r.max_steps,
        round_id=r.round_id,
    )


def status_to_pb(
    s: DaemonStatus, tenant: str, tenant_paused: bool, is_admin: bool
) -> training_pb2.GetTrainingStatusResponse:
    """DaemonStatus → GetTrainingStatusResponse, as one tenant sees it (global counters for admins only)."""
    globally_paused = s.state == DaemonState.PAUSED
    state = s.state
    if tenant and (s.current is None or s.current.tenant != tenant) and state == DaemonState.TRAINING:
        state = DaemonState.IDLE  # another tenant's round is none of this tenant's business
    if tenant_paused and state != DaemonState.TRAINING:
        state = DaemonState.PAUSED
    return training_pb2.GetTrainingStatusResponse(
        state=_STATES[state],
        buffers=[
            training_pb2.AdapterBuffer(
                adapter=b.adapter, pending_samples=b.pending, trained_samples=b.trained
            )
            for b in s.buffers
        ],
        dropped=s.dropped if is_admin else {},
        rounds=[round_to_pb(r) for r in s.rounds],
        consumed=s.consumed if is_admin else 0,
        dead_lettered=s.dead_lettered if is_admin else 0,
        base_generation=s.base_generation,
        tenant=tenant,
        tenant_paused=tenant_paused,
        globally_paused=globally_paused,
        governor=_governor_to_pb(s.governor) if is_admin else None,
        trimmed_unread=int(s.extra.get("trimmed_unread", 0)) if is_admin else 0,
    )


def _governor_to_pb(g: dict[str, Any]) -> training_pb2.GovernorStatus | None:
    """The governor's state dict as the status message (None when no governor runs)."""
    if not g:
        return None
    load = g.get("load") or {}
    return training_pb2.GovernorStatus(
        mode=str(g.get("mode", "")),
        pace_ms=float(g.get("pace_ms", 0.0)),
        micro_batch=int(g.get("micro_batch", 0)),
        budget_ms=float(g.get("budget_ms") or 0.0),
        paused_s=float(g.get("paused_s", 0.0)),
        serving_tpot_p99_ms=float(load.get("tpot_p99_ms") or 0.0),
        serving_waiting=int(load.get("waiting") or 0),
        duty=float(g.get("duty", 1.0)),
        ttft_budget_ms=float(g.get("ttft_budget_ms") or 0.0),
        serving_ttft_p99_ms=float(load.get("ttft_p99_ms") or 0.0),
    )


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """Status and control of the training daemon, per tenant; global state and control are admin-only."""

    def __init__(
        self, daemon: TrainingDaemon, auth: Authenticator, pauses: TenantPauses | None = None
    ) -> None:
        self._daemon = daemon
        self._auth = auth
        self._pauses = pauses if pauses is not None else TenantPauses(daemon.buffer.redis)

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        return self._auth.caller(context.invocation_metadata())

    @unary_errors
    def GetTrainingStatus(  # noqa: N802
        self, request: training_pb2.GetTrainingStatusRequest, context: grpc.ServicerContext
    ) -> training_pb2.GetTrainingStatusResponse:
        """The caller's state, buffers and rounds; every tenant's and the drop counters for admins."""
        caller = self._caller(context)
        if request.adapter:
            validate_name(request.adapter)
        if request.all_tenants:
            caller.require_admin("every tenant's training status (all_tenants)")
            return status_to_pb(self._daemon.status(None, request.adapter), "", False, True)
        status = self._daemon.status(caller.tenant, request.adapter)
        return status_to_pb(status, caller.tenant, self._pauses.is_paused(caller.tenant), caller.is_admin)

    @unary_errors
    def TriggerTraining(  # noqa: N802
        self, request: training_pb2.TriggerTrainingRequest, context: grpc.ServicerContext
    ) -> training_pb2.TriggerTrainingResponse:
        """Queue a round for one of the caller's adapters now."""
        tenant = self._caller(context).tenant
        queued, reason = self._daemon.trigger(tenant, validate_name(request.adapter))
        if queued and self._pauses.is_paused(tenant):
            reason = "queued (this tenant's training is paused: it starts on ResumeTraining)"
        return training_pb2.TriggerTrainingResponse(queued=queued, reason=reason)

    @unary_errors
    def PauseTraining(  # noqa: N802
        self, request: training_pb2.PauseTrainingRequest, context: grpc.ServicerContext
    ) -> training_pb2.PauseTrainingResponse:
        """Stop starting the caller's rounds (every tenant's: admin only)."""
        caller = self._caller(context)
        if request.all_tenants:
            caller.require_admin("pausing every tenant's training (all_tenants)")
            self._daemon.pause()
        else:
            self._pauses.pause(caller.tenant)
        return training_pb2.PauseTrainingResponse()

    @unary_errors
    def ResumeTraining(  # noqa: N802
        self, request: training_pb2.ResumeTrainingRequest, context: grpc.ServicerContext
    ) -> training_pb2.ResumeTrainingResponse:
        """Let the caller's rounds start again (every tenant's: admin only)."""
        caller = self._caller(context)
        if request.all_tenants:
            caller.require_admin("resuming every tenant's training (all_tenants)")
            self._daemon.resume()
        else:
            self._pauses.resume(caller.tenant)
        return training_pb2.ResumeTrainingResponse()
