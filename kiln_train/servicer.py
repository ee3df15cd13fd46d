"""gRPC TrainingService: the only place kiln-train touches training_pb2 (plain dataclasses inside)."""

from __future__ import annotations

import grpc

from kiln.v1 import training_pb2, training_pb2_grpc
from kiln_common.adapter_store import validate_name
from kiln_common.auth import Authenticator
from kiln_common.grpc_status import unary_errors
from kiln_train.daemon import DaemonState, DaemonStatus, TrainingDaemon
from kiln_train.training_round import RoundRecord

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


def status_to_pb(s: DaemonStatus) -> training_pb2.GetTrainingStatusResponse:
    """DaemonStatus → GetTrainingStatusResponse."""
    return training_pb2.GetTrainingStatusResponse(
        state=_STATES[s.state],
        buffers=[
            training_pb2.AdapterBuffer(
                adapter=b.adapter, pending_samples=b.pending, trained_samples=b.trained
            )
            for b in s.buffers
        ],
        dropped=s.dropped,
        rounds=[round_to_pb(r) for r in s.rounds],
        consumed=s.consumed,
        dead_lettered=s.dead_lettered,
        base_generation=s.base_generation,
    )


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """Status and control of the training daemon, per tenant."""

    def __init__(self, daemon: TrainingDaemon, auth: Authenticator) -> None:
        self._daemon = daemon
        self._auth = auth

    def _tenant(self, context: grpc.ServicerContext) -> str:
        return self._auth.tenant(context.invocation_metadata())

    @unary_errors
    def GetTrainingStatus(  # noqa: N802
        self, request: training_pb2.GetTrainingStatusRequest, context: grpc.ServicerContext
    ) -> training_pb2.GetTrainingStatusResponse:
        """Daemon state, the tenant's buffers and rounds, drop counters."""
        tenant = self._tenant(context)
        if request.adapter:
            validate_name(request.adapter)
        return status_to_pb(self._daemon.status(tenant, request.adapter))

    @unary_errors
    def TriggerTraining(  # noqa: N802
        self, request: training_pb2.TriggerTrainingRequest, context: grpc.ServicerContext
    ) -> training_pb2.TriggerTrainingResponse:
        """Queue a round for an adapter now."""
        tenant = self._tenant(context)
        queued, reason = self._daemon.trigger(tenant, validate_name(request.adapter))
        return training_pb2.TriggerTrainingResponse(queued=queued, reason=reason)

    @unary_errors
    def PauseTraining(  # noqa: N802
        self, request: training_pb2.PauseTrainingRequest, context: grpc.ServicerContext
    ) -> training_pb2.PauseTrainingResponse:
        """Stop starting rounds (the running one stops at its next step)."""
        self._tenant(context)
        self._daemon.pause()
        return training_pb2.PauseTrainingResponse()

    @unary_errors
    def ResumeTraining(  # noqa: N802
        self, request: training_pb2.ResumeTrainingRequest, context: grpc.ServicerContext
    ) -> training_pb2.ResumeTrainingResponse:
        """Let rounds start again."""
        self._tenant(context)
        self._daemon.resume()
        return training_pb2.ResumeTrainingResponse()
