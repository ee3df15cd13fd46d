"""`kiln train status|trigger|pause|resume` over TrainingService (terminal output uses print)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import grpc

from kiln_common.config import DEFAULT_TRAIN_PORT

POLL_S = 1.0


def _stub(args: argparse.Namespace) -> Any:
    from kiln.v1 import training_pb2_grpc

    return training_pb2_grpc.TrainingServiceStub(grpc.insecure_channel(args.train_address))


def _metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {args.api_key}")] if args.api_key else []


def _print_status(reply: Any) -> None:
    from kiln.v1 import training_pb2

    state = training_pb2.TrainerState.Name(reply.state).removeprefix("TRAINER_STATE_").lower()
    print(f"state {state} · consumed {reply.consumed} · dead-lettered {reply.dead_lettered}")
    if reply.dropped:
        print("dropped " + " ".join(f"{k}={v}" for k, v in sorted(reply.dropped.items())))
    for b in reply.buffers:
        print(f"  {b.adapter:24} pending {b.pending_samples:<6} trained {b.trained_samples}")
    for r in list(reply.rounds)[:10]:
        done = f"-> v{r.version}" if r.version else ""
        print(
            f"  round {r.round_id[:8]} {r.adapter} from v{r.parent_version} {done} {r.outcome or 'running'} "
            f"step {r.steps}/{r.max_steps} samples {r.num_samples} {r.reason}".rstrip()
        )


def _wait_for_round(args: argparse.Namespace, started_after: float) -> int:
    """Show the adapter's next round's progress until it ends; 0 when it published a version."""
    from kiln.v1 import training_pb2

    stub, md = _stub(args), _metadata(args)
    while True:
        reply = stub.GetTrainingStatus(training_pb2.GetTrainingStatusRequest(adapter=args.name), metadata=md)
        rounds = [r for r in reply.rounds if r.started >= started_after]
        if rounds:
            r = rounds[0]
            print(f"\r{args.name}: step {r.steps}/{r.max_steps or '?'} loss {r.train_loss:.4f}   ", end="")
            if r.outcome:
                print(
                    f"\n{args.name}: {r.outcome}" + (f" v{r.version}" if r.version else "") + f" {r.reason}"
                )
                return 0 if r.outcome == "published" else 1
        sys.stdout.flush()
        time.sleep(POLL_S)


def cmd_train(args: argparse.Namespace) -> int:
    """Training daemon control over TrainingService."""
    from kiln.v1 import training_pb2

    stub, md = _stub(args), _metadata(args)
    if args.action == "status":
        request = training_pb2.GetTrainingStatusRequest(adapter=args.name or "")
        _print_status(stub.GetTrainingStatus(request, metadata=md))
    elif args.action == "trigger":
        started = time.time() - 1.0
        reply = stub.TriggerTraining(training_pb2.TriggerTrainingRequest(adapter=args.name), metadata=md)
        print(f"{args.name}: {'queued' if reply.queued else 'not queued'} {reply.reason}".rstrip())
        if not reply.queued:
            return 1
        if args.wait:
            return _wait_for_round(args, started)
    elif args.action == "pause":
        stub.PauseTraining(training_pb2.PauseTrainingRequest(), metadata=md)
        print("training paused (a running round stops at its next step)")
    elif args.action == "resume":
        stub.ResumeTraining(training_pb2.ResumeTrainingRequest(), metadata=md)
        print("training resumed")
    return 0


def add_train(sub: argparse._SubParsersAction, environ: dict[str, str]) -> None:  # type: ignore[type-arg]
    """`kiln train status|trigger|pause|resume`."""
    t = sub.add_parser("train", help="training daemon: status, trigger a round, pause, resume")
    t.add_argument(
        "--train-address",
        default=environ.get("KILN_TRAIN_ADDRESS", f"127.0.0.1:{DEFAULT_TRAIN_PORT}"),
        help=f"kiln-train host:port [KILN_TRAIN_ADDRESS, 127.0.0.1:{DEFAULT_TRAIN_PORT}]",
    )
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    st = tsub.add_parser("status", help="state, buffered samples, drops and recent rounds")
    st.add_argument("name", nargs="?", help="only this adapter")
    tr = tsub.add_parser("trigger", help="train an adapter on its buffered samples now")
    tr.add_argument("name", help="adapter name")
    tr.add_argument("--wait", action="store_true", help="show the round's progress until it ends")
    tsub.add_parser("pause", help="start no new rounds; a running one stops at its next step")
    tsub.add_parser("resume", help="let rounds start again")
    t.set_defaults(func=cmd_train)
