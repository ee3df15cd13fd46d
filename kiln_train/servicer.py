"""gRPC TrainingService: the only place kiln-train touches training_pb2 (plain dataclasses inside)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from kiln.v1 import training_pb2, training_pb2_grpc
from kiln_common.adapter_store import InvalidAdapterError, validate_name
from kiln_common.auth import Authenticator, AuthError
from kiln_train.daemon import DaemonState, DaemonStatus, TrainingDaemon
from kiln_train.training_round import RoundRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

_STATES = {
    DaemonState.IDLE: training_pb2.TRAINER_STATE_IDLE,
    DaemonState.TRAINING: training_pb2.TRAINER_STATE_TRAINING,
    DaemonState.PAUSED: training_pb2.TRAINER_STATE_PAUSED,
    DaemonState.WAITING_FOR_BASE: training_pb2.TRAINER_STATE_WAITING_FOR_BASE,
}


def round_to_pb(r: RoundRecord) -> Any:
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


def status_to_pb(s: DaemonStatus) -> Any:
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

    def _call(self, context: grpc.ServicerContext, fn: Callable[[str], T]) -> T:
        """Authenticate, run, and map errors to gRPC statuses (never an unhandled exception)."""
        try:
            tenant = self._auth.tenant(context.invocation_metadata())
            return fn(tenant)
        except AuthError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except InvalidAdapterError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"adapter: {exc}")
        except grpc.RpcError:
            raise
        except Exception:  # noqa: BLE001
            log.exception("TrainingService call failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error (see kiln-train's log)")
        raise AssertionError("unreachable")

    def GetTrainingStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Daemon state, the tenant's buffers and rounds, drop counters."""

        def run(tenant: str) -> Any:
            if request.adapter:
                validate_name(request.adapter)
            return status_to_pb(self._daemon.status(tenant, request.adapter))

        return self._call(context, run)

    def TriggerTraining(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Queue a round for an adapter now."""

        def run(tenant: str) -> Any:
            queued, reason = self._daemon.trigger(tenant, validate_name(request.adapter))
            return training_pb2.TriggerTrainingResponse(queued=queued, reason=reason)

        return self._call(context, run)

    def PauseTraining(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Stop starting rounds (the running one stops at its next step)."""

        def run(_tenant: str) -> Any:
            self._daemon.pause()
            return training_pb2.PauseTrainingResponse()

        return self._call(context, run)

    def ResumeTraining(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Let rounds start again."""

        def run(_tenant: str) -> Any:
            self._daemon.resume()
            return training_pb2.ResumeTrainingResponse()

        return self._call(context, run)
