"""`kiln adapters ...`: adapter administration over AdapterService (terminal output uses print)."""

from __future__ import annotations

import argparse
import os

import grpc


def _channel(args: argparse.Namespace) -> grpc.Channel:
    return grpc.insecure_channel(args.address)


def _metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {args.api_key}")] if args.api_key else []


def cmd_adapters(args: argparse.Namespace) -> int:
    """Adapter administration over AdapterService."""
    from kiln.v1 import adapter_pb2, adapter_pb2_grpc

    stub = adapter_pb2_grpc.AdapterServiceStub(_channel(args))
    md = _metadata(args)
    action = args.action
    if action == "list":
        for a in stub.ListAdapters(adapter_pb2.ListAdaptersRequest(), metadata=md).adapters:
            split = " ".join(f"v{s.version}:{s.weight:.2f}" for s in a.split)
            print(
                f"{a.name:24} current v{a.current_version:<4} latest v{a.latest_version:<4} "
                f"sample_rate {a.sample_rate:.2f} {('split ' + split) if split else ''}"
            )
    elif action == "versions":
        for v in stub.ListVersions(adapter_pb2.ListVersionsRequest(adapter=args.name), metadata=md).versions:
            evals = " ".join(f"{k}={x:.3g}" for k, x in sorted(v.eval.items()))
            print(
                f"v{v.version:<4} parent v{v.parent:<4} {v.origin:9} rank {v.rank:<3} "
                f"samples {v.num_samples:<5} {v.sha256[:12]} {evals}"
            )
    elif action == "publish":
        path = os.path.abspath(args.path)
        r = stub.PublishVersion(
            adapter_pb2.PublishVersionRequest(adapter=args.name, path=path, promote=args.promote), metadata=md
        )
        print(f"published {r.adapter}@v{r.version}" + (" (promoted)" if args.promote else ""))
    elif action == "promote":
        p = stub.Promote(adapter_pb2.PromoteRequest(adapter=args.name, version=args.version), metadata=md)
        print(f"{args.name}: v{p.previous_version} -> v{p.current_version}")
    elif action == "rollback":
        rb = stub.Rollback(adapter_pb2.RollbackRequest(adapter=args.name), metadata=md)
        print(f"{args.name}: v{rb.previous_version} -> v{rb.current_version}")
    elif action == "split":
        shares = [
            adapter_pb2.TrafficShare(version=int(v.lstrip("v")), weight=float(w))
            for v, w in (s.split("=", 1) for s in args.shares)
        ]
        sp = stub.SetTrafficSplit(
            adapter_pb2.SetTrafficSplitRequest(adapter=args.name, shares=shares), metadata=md
        )
        print(f"{args.name}: " + ", ".join(f"v{s.version} {s.weight:.0%}" for s in sp.shares))
    elif action == "sampling":
        sr = stub.SetSamplingPolicy(
            adapter_pb2.SetSamplingPolicyRequest(adapter=args.name, sample_rate=args.rate), metadata=md
        )
        print(f"{args.name}: sample_rate {sr.sample_rate:.2f}")
    elif action == "watch":
        for e in stub.WatchEvents(adapter_pb2.WatchEventsRequest(adapter=args.name or ""), metadata=md):
            kind = adapter_pb2.AdapterEventType.Name(e.type).removeprefix("ADAPTER_EVENT_TYPE_").lower()
            print(f"{kind:12} {e.adapter}@v{e.version} {e.detail}", flush=True)
    return 0


def add_adapters(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`kiln adapters list|versions|publish|promote|rollback|split|sampling|watch`."""
    a = sub.add_parser("adapters", help="list, publish, promote, roll back, split adapters")
    asub = a.add_subparsers(dest="action", required=True)
    asub.add_parser("list")
    asub.add_parser("versions").add_argument("name")
    p = asub.add_parser("publish")
    p.add_argument("name")
    p.add_argument("path", help="PEFT directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--promote", action="store_true")
    pr = asub.add_parser("promote")
    pr.add_argument("name")
    pr.add_argument("version", type=lambda s: int(s.lstrip("v")))
    asub.add_parser("rollback").add_argument("name")
    s = asub.add_parser("split")
    s.add_argument("name")
    s.add_argument("shares", nargs="+", help="vN=weight ...")
    sm = asub.add_parser("sampling")
    sm.add_argument("name")
    sm.add_argument("rate", type=float, help="fraction of generations recorded, 0 = off")
    asub.add_parser("watch").add_argument("name", nargs="?")
    a.set_defaults(func=cmd_adapters)
