"""`kiln adapters` against the session server: upload a local directory, then list, split, canary, keys."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import pytest

from kiln_common.auth import Caller, Role, parse_key_file
from kiln_infer.cli_adapters import add_adapters
from kiln_infer.server import InferServer
from tests.kiln_infer.conftest import ALICE_KEY


def kiln(server: InferServer, *argv: str, key: str = ALICE_KEY) -> int:
    """Run `kiln adapters ARGV` as the `kiln` parser would (its --address and --api-key included)."""
    parser = argparse.ArgumentParser(prog="kiln")
    parser.add_argument("--address", default=f"127.0.0.1:{server.port}")
    parser.add_argument("--api-key", default=key)
    add_adapters(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["adapters", *argv])
    return int(args.func(args))


def test_upload_list_split_canary(
    infer_server: InferServer, peft_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    assert kiln(infer_server, "upload", name, str(peft_adapter), "--promote") == 0
    assert kiln(infer_server, "upload", name, str(peft_adapter)) == 0
    out = capsys.readouterr().out
    assert f"uploaded {name}@v1" in out and "(promoted)" in out and f"uploaded {name}@v2" in out
    kiln(infer_server, "split", name, "v1=0.9", "v2=0.1")
    assert f"{name}: v1 90%, v2 10%" in capsys.readouterr().out
    kiln(infer_server, "canary", name, "v2", "--share", "0.2", "--requests", "10")
    assert "canary v2 on 20%" in capsys.readouterr().out
    kiln(infer_server, "list")
    assert "canary v2 (0/10 rated)" in capsys.readouterr().out
    kiln(infer_server, "versions", name)
    assert "canary: canary on 20% of traffic" in capsys.readouterr().out


def test_keys_new_prints_a_hashed_line(infer_server: InferServer, capsys: pytest.CaptureFixture[str]) -> None:
    kiln(infer_server, "keys", "new", "carol", "--role", "admin")
    lines = capsys.readouterr().out.splitlines()
    key = lines[0].rsplit(" ", 1)[1]
    entry = lines[1].removeprefix("key file line: ")
    assert key not in entry and entry.startswith("sha256:")
    assert list(parse_key_file(entry).values()) == [Caller("carol", Role.ADMIN)]
