"""The `kiln` CLI: --version, help for every action, and bad input as one line with exit status 2."""

from __future__ import annotations

import pytest

from kiln_infer.cli import main
from kiln_infer.server import InferServer
from tests.kiln_infer.conftest import ALICE_KEY


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("kiln ")


@pytest.mark.parametrize("command", [["train"], ["adapters"], ["generate"], ["up"]])
def test_every_action_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0 and "usage: kiln" in capsys.readouterr().out


def test_malformed_split_share_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--address", "127.0.0.1:1", "adapters", "split", "x", "v1=abc"]) == 2
    assert "abc" in _one_line_error(capsys)


def test_unreachable_train_daemon_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--train-address", "127.0.0.1:1", "status"]) == 1
    assert "cannot reach 127.0.0.1:1" in _one_line_error(capsys)


def test_server_side_bad_input_is_status_2(
    infer_server: InferServer, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{infer_server.port}"
    argv = ["--address", address, "--api-key", ALICE_KEY, "generate", "hi", "--temperature", "-1"]
    assert main(argv) == 2
    assert "sampling.temperature" in _one_line_error(capsys)
