"""`kiln` command line: generate, adapters, train, up, http, bench, demo (terminal output uses print)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence

import grpc

from kiln_common.config import DEFAULT_INFER_PORT
from kiln_infer.cli_adapters import add_adapters
from kiln_infer.cli_train import add_train

Command = Callable[[argparse.Namespace], int]


def _channel(args: argparse.Namespace) -> grpc.Channel:
    return grpc.insecure_channel(args.address)


def _metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {args.api_key}")] if args.api_key else []


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one generation to the terminal."""
    from kiln.v1 import inference_pb2, inference_pb2_grpc

    sampling = inference_pb2.SamplingParams(top_k=args.top_k, stop=args.stop or [])
    if args.max_tokens is not None:
        sampling.max_tokens = args.max_tokens
    for name in ("temperature", "top_p", "seed", "repetition_penalty"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    request = inference_pb2.GenerateRequest(adapter=args.adapter, sampling=sampling)
    if args.chat:
        if args.system:
            request.messages.add(role="system", content=args.system)
        request.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    stub = inference_pb2_grpc.InferenceServiceStub(_channel(args))
    last = None
    for response in stub.Generate(request, metadata=_metadata(args), timeout=args.timeout):
        print(response.text, end="", flush=True)
        last = response
    print()
    if last is not None and args.verbose:
        reason = inference_pb2.FinishReason.Name(last.finish_reason)
        print(
            f"[{last.request_id} · {last.adapter_version or 'base'} · {reason} · "
            f"{last.usage.prompt_tokens}+{last.usage.completion_tokens} tokens]",
            file=sys.stderr,
        )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Run the whole stack in the foreground until Ctrl-C."""
    from kiln_infer.stack import run_stack

    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return run_stack(args, dict(os.environ), say=print)


def cmd_module_main(module: str, missing: str, forward_client_flags: bool = False) -> Command:
    """A subcommand handing its remaining arguments to `module.main(argv)`, optionally with --address."""

    def run(args: argparse.Namespace) -> int:
        if (
            importlib.util.find_spec(module.rsplit(".", 1)[0]) is None
            or importlib.util.find_spec(module) is None
        ):
            print(missing, file=sys.stderr)
            return 2
        argv = list(args.rest)
        if forward_client_flags:
            if "--address" not in argv:
                argv = ["--address", args.address, *argv]
            if args.api_key and "--api-key" not in argv:
                argv = ["--api-key", args.api_key, *argv]
        return int(importlib.import_module(module).main(argv) or 0)

    return run


def _add_generate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`kiln generate PROMPT [...]`."""
    g = sub.add_parser("generate", help="stream a generation to the terminal")
    g.add_argument("prompt")
    g.add_argument("--adapter", default="", help="'name' or 'name@vN'; empty = base model")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    g.add_argument("--system", default="", help="system message (with --chat)")
    g.add_argument("--max-tokens", type=int)
    # The API's default is 1.0; at a terminal a small model reads better greedy, so the CLI defaults to 0.
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    g.add_argument("-v", "--verbose", action="store_true", help="print request id, version and usage")
    g.set_defaults(func=cmd_generate)


def _version() -> str:
    try:
        return importlib.metadata.version("kiln")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


_BAD_INPUT = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE)


def _rpc_failure(args: argparse.Namespace, exc: grpc.RpcError) -> int:
    """One line for a failed call: exit 2 when the server says the input was wrong, else 1."""
    code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in (details or "").lower():
        target = getattr(args, "train_address", None) or args.address
        print(
            f"kiln: cannot reach {target} (is it running? see --address / --train-address)", file=sys.stderr
        )
        return 1
    print(f"kiln {args.command}: {code.name}: {details}", file=sys.stderr)
    return 2 if code in _BAD_INPUT else 1


def build_parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    """The `kiln` argument parser."""
    parser = argparse.ArgumentParser(prog="kiln", description="Kiln: train-while-you-serve LLM server")
    parser.add_argument("--version", action="version", version=f"kiln {_version()}")
    parser.add_argument(
        "--address",
        default=environ.get("KILN_ADDRESS", f"127.0.0.1:{DEFAULT_INFER_PORT}"),
        help="kiln-infer host:port [KILN_ADDRESS]",
    )
    parser.add_argument("--api-key", default=environ.get("KILN_API_KEY", ""), help="API key [KILN_API_KEY]")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_generate(sub)
    add_adapters(sub)
    add_train(sub, environ)

    u = sub.add_parser("up", help="run Redis, kiln-infer and kiln-train until Ctrl-C")
    u.add_argument("--no-train", action="store_true", help="do not start kiln-train")
    u.add_argument("--model", help="model spec for both services [KILN_MODEL]")
    u.add_argument("--port", type=int, default=None, help=f"kiln-infer port [{DEFAULT_INFER_PORT}]")
    u.set_defaults(func=cmd_up)

    b = sub.add_parser("bench", help="run the benchmark (benchmarks/w1.py)", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_module_main("benchmarks.w1", "kiln bench needs benchmarks/w1.py"))
    d = sub.add_parser("demo", help="ask, teach, watch a new version train, ask again", add_help=False)
    d.add_argument("rest", nargs=argparse.REMAINDER)
    d.set_defaults(func=cmd_module_main("kiln_train.demo", "kiln demo needs kiln_train/demo.py", True))
    h = sub.add_parser("http", help="OpenAI-style HTTP front over kiln-infer", add_help=False)
    h.add_argument("rest", nargs=argparse.REMAINDER)
    h.set_defaults(
        func=cmd_module_main("kiln_infer.http.server", "kiln http needs kiln_infer/http/server.py", True)
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kiln` console script."""
    parser = build_parser(dict(os.environ))
    args, unknown = parser.parse_known_args(argv)
    if args.command in ("bench", "demo", "http"):
        args.rest = [*unknown, *args.rest]  # their own flags (--help included) go to their own parsers
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args))
    except grpc.RpcError as exc:
        return _rpc_failure(args, exc)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # a malformed argument found while building the request
        print(f"kiln {args.command}: invalid argument: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kiln {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
