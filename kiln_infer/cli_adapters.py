"""`kiln adapters …`: upload, import, list, versions, promote, rollback, split, canary, sampling, watch, keys.

Terminal output uses print. `add_adapters(sub)` adds the subcommand to the `kiln` parser; `cmd_adapters` runs
it against AdapterService at `--address` with `--api-key` (both defined by the `kiln` parser).
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from kiln.v1 import adapter_pb2, adapter_pb2_grpc
from kiln_common.auth import ACT_AS_HEADER, Role, hash_key, new_key
from kiln_common.peft_format import CONFIG_FILE, WEIGHTS_FILE

CHUNK_BYTES = 256 * 1024  # well under every server's message size limit


def upload_requests(
    name: str, path: Path, promote: bool = False, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[adapter_pb2.UploadVersionRequest]:
    """The UploadVersion stream for a local PEFT directory: the header, then the weights in chunks."""
    weights = path / WEIGHTS_FILE
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    yield adapter_pb2.UploadVersionRequest(
        header=adapter_pb2.UploadVersionHeader(
            adapter=name,
            adapter_config_json=(path / CONFIG_FILE).read_text(),
            weights_bytes=weights.stat().st_size,
            weights_sha256=digest,
            promote=promote,
        )
    )
    with weights.open("rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            yield adapter_pb2.UploadVersionRequest(weights_chunk=chunk)


def _metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    md = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    return md + ([(ACT_AS_HEADER, args.as_tenant)] if args.as_tenant else [])


def _list(stub: Any, args: argparse.Namespace, md: list[tuple[str, str]]) -> None:
    for a in stub.ListAdapters(adapter_pb2.ListAdaptersRequest(), metadata=md).adapters:
        split = " ".join(f"v{s.version}:{s.weight:.2f}" for s in a.split)
        canary = ""
        if a.HasField("canary"):
            c = a.canary
            canary = f" canary v{c.version} ({c.candidate_rated}/{c.min_requests} rated)"
        print(
            f"{a.name:24} current v{a.current_version:<4} latest v{a.latest_version:<4} "
            f"sample_rate {a.sample_rate:.2f} {('split ' + split) if split else ''}{canary}"
        )


def _versions(stub: Any, args: argparse.Namespace, md: list[tuple[str, str]]) -> None:
    for v in stub.ListVersions(adapter_pb2.ListVersionsRequest(adapter=args.name), metadata=md).versions:
        evals = " ".join(f"{k}={x:.3g}" for k, x in sorted(v.eval.items()))
        print(
            f"v{v.version:<4} parent v{v.parent:<4} {v.origin:9} rank {v.rank:<3} "
            f"samples {v.num_samples:<5} {v.sha256[:12]} {evals}"
        )
        for note in v.history:
            print(f"       {note.action}: {note.reason}")


def _upload(stub: Any, args: argparse.Namespace, md: list[tuple[str, str]]) -> None:
    r = stub.UploadVersion(upload_requests(args.name, Path(args.path), args.promote), metadata=md)
    print(
        f"uploaded {r.adapter}@v{r.version} sha256 {r.sha256[:12]}" + (" (promoted)" if args.promote else "")
    )


def _import(stub: Any, args: argparse.Namespace, md: list[tuple[str, str]]) -> None:
    request = adapter_pb2.PublishVersionRequest(adapter=args.name, path=args.path, promote=args.promote)
    r = stub.PublishVersion(request, metadata=md)
    print(f"imported {r.adapter}@v{r.version}" + (" (promoted)" if args.promote else ""))


def _promote(stub: Any, args: argparse.Namespace, md: list[tuple[str, str]]) -> None:
    p = stub.Promote(adapter_pb2.PromoteRequest(adapter=args.name, version=args.version), metadata=md)
    print(f"{args.name}: v{p.previous_version} -> v{p.current_version}")


def _rollback(stub: Any, args: argparse.Namespace, md: list[tuple[str, str]]) -> None:
    rb = stub.Rollback(adapter_pb2.RollbackRequest(adapter=args.name), metadata=md)
    print(f"{args.name}: v{rb.previous_version} -> v{rb.current_version}")


def _split(stub: Any, args: argparse.Namespace, md: list[tuple[str, str]]) -> None:
    shares = [
        adapter_pb2.TrafficShare(version=int(v.lstrip("v")), weight=float(w))
        for v, w in (s.split("=", 1) for s in args.shares)
    ]
    sp = stub.SetTrafficSplit(
        adapter_pb2.SetTrafficSplitRequest(adapter=args.name, shares=shares), metadata=md
    )
    print(f"{args.name}: " + ", ".join(f"v{s.version} {s.weight:.0%}" for s in sp.shares))


def _canary(stub: Any, args: argparse.Namespace, md: list[tuple[str, str]]) -> None:
    request = adapter_pb2.StartCanaryRequest(
        adapter=args.name, version=args.version, share=args.share, min_requests=args.requests
    )
    c = stub.StartCanary(request, metadata=md).canary
    print(
        f"{args.name}: canary v{c.version} on {c.share:.0%} against v{c.baseline_version}, "
        f"judged after {c.min_requests} ratings"
    )


def _sampling(stub: Any, args: argparse.Namespace, md: list[tuple[str, str]]) -> None:
    request = adapter_pb2.SetSamplingPolicyRequest(adapter=args.name, sample_rate=args.rate)
    print(f"{args.name}: sample_rate {stub.SetSamplingPolicy(request, metadata=md).sample_rate:.2f}")


def _watch(stub: Any, args: argparse.Namespace, md: list[tuple[str, str]]) -> None:
    for e in stub.WatchEvents(adapter_pb2.WatchEventsRequest(adapter=args.name or ""), metadata=md):
        kind = adapter_pb2.AdapterEventType.Name(e.type).removeprefix("ADAPTER_EVENT_TYPE_").lower()
        print(f"{kind:12} {e.adapter}@v{e.version} {e.detail}", flush=True)


def _keys(args: argparse.Namespace) -> None:
    """Local only: a new key (shown once) and the key-file line holding just its hash."""
    if args.keys_action == "new":
        key = new_key()
        print(f"api key (give it to the tenant; it is not stored): {key}")
        print(f"key file line: {hash_key(key)} {args.tenant} {args.role}")
    else:
        print(f"{hash_key(args.key)} {args.tenant} {args.role}")


_ACTIONS: dict[str, Callable[[Any, argparse.Namespace, list[tuple[str, str]]], None]] = {
    "list": _list,
    "versions": _versions,
    "upload": _upload,
    "import": _import,
    "promote": _promote,
    "rollback": _rollback,
    "split": _split,
    "canary": _canary,
    "sampling": _sampling,
    "watch": _watch,
}


def cmd_adapters(args: argparse.Namespace) -> int:
    """Adapter administration over AdapterService (`keys` runs locally)."""
    if args.action == "keys":
        _keys(args)
        return 0
    with grpc.insecure_channel(args.address) as channel:
        _ACTIONS[args.action](adapter_pb2_grpc.AdapterServiceStub(channel), args, _metadata(args))
    return 0


def _version(text: str) -> int:
    return int(text.lstrip("v"))


def add_adapters(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`kiln adapters upload|import|list|versions|promote|rollback|split|canary|sampling|watch|keys`."""
    a = sub.add_parser("adapters", help="upload, list, promote, roll back, split and canary adapters")
    a.add_argument("--as-tenant", default="", help="act for this tenant (admin keys only)")
    asub = a.add_subparsers(dest="action", required=True)
    asub.add_parser("list")
    asub.add_parser("versions").add_argument("name")
    for action, where in (("upload", "local"), ("import", "server (under --import-root; admin)")):
        p = asub.add_parser(action, help=f"publish a {where} PEFT directory as the next version")
        p.add_argument("name")
        p.add_argument("path", help=f"{where} PEFT directory (adapter_config.json + {WEIGHTS_FILE})")
        p.add_argument("--promote", action="store_true")
    pr = asub.add_parser("promote")
    pr.add_argument("name")
    pr.add_argument("version", type=_version)
    asub.add_parser("rollback").add_argument("name")
    s = asub.add_parser("split")
    s.add_argument("name")
    s.add_argument("shares", nargs="+", help="vN=weight ...")
    c = asub.add_parser("canary", help="send a share of traffic to a version; feedback decides")
    c.add_argument("name")
    c.add_argument("version", type=_version)
    c.add_argument("--share", type=float, default=0.0, help="traffic share (default: the server's)")
    c.add_argument("--requests", type=int, default=0, help="ratings before judging (default: the server's)")
    sm = asub.add_parser("sampling")
    sm.add_argument("name")
    sm.add_argument("rate", type=float, help="fraction of generations recorded, 0 = off")
    asub.add_parser("watch").add_argument("name", nargs="?")
    k = asub.add_parser("keys", help="make API keys and their key-file lines (hashed)")
    ksub = k.add_subparsers(dest="keys_action", required=True)
    for keys_action in ("new", "hash"):
        kp = ksub.add_parser(keys_action)
        if keys_action == "hash":
            kp.add_argument("key")
        kp.add_argument("tenant")
        kp.add_argument("--role", choices=[r.value for r in Role], default=Role.TENANT.value)
    a.set_defaults(func=cmd_adapters)


__all__ = ["add_adapters", "cmd_adapters", "upload_requests"]
