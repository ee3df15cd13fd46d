"""Clients that know nothing of Kiln's Python: stubs made from protos/ alone, Node, the `kiln` CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import google.protobuf
import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from kiln_infer.server import InferServer
from tests.kiln_infer.conftest import ALICE_KEY

REPO = Path(__file__).resolve().parents[2]
NODE_CLIENT = REPO / "tests" / "clients" / "node"

PROTO_CLIENT = textwrap.dedent("""
    import json, sys, time
    import grpc
    from kiln.v1 import inference_pb2, inference_pb2_grpc

    address, key = sys.argv[1], sys.argv[2]
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
    request = inference_pb2.GenerateRequest(
        messages=[inference_pb2.ChatMessage(role="user", content="What is the capital of France?")],
        sampling=inference_pb2.SamplingParams(temperature=0.0, max_tokens=32),
    )
    start, out = time.monotonic(), []
    for r in stub.Generate(request, metadata=[("authorization", "Bearer " + key)], timeout=120):
        out.append({"t": time.monotonic() - start, "text": r.text, "finish": r.finish_reason})
    print(json.dumps(out))
""")


def test_client_generated_from_protos_alone_streams_paris(infer_server: InferServer, tmp_path: Path) -> None:
    import grpc_tools

    stubs = tmp_path / "stubs"
    stubs.mkdir()
    protoc = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{REPO / 'protos'}",
        f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
        f"--python_out={stubs}",
        f"--grpc_python_out={stubs}",
        "kiln/v1/inference.proto",
    ]
    subprocess.run(protoc, check=True, cwd=tmp_path)
    (stubs / "client.py").write_text(PROTO_CLIENT)
    # -S: no site-packages .pth hooks (so no editable install of Kiln); only the stubs, grpc and protobuf.
    libs = {str(Path(grpc.__file__).parents[1]), str(Path(google.protobuf.__file__).parents[2])}
    env = {"PYTHONPATH": ":".join([str(stubs), *sorted(libs)]), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-S", str(stubs / "client.py"), f"127.0.0.1:{infer_server.port}", ALICE_KEY],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    chunks = json.loads(proc.stdout)
    assert "Paris" in "".join(c["text"] for c in chunks)
    assert len(chunks) >= 3 and chunks[-1]["finish"] != 0
    times = [c["t"] for c in chunks]  # streamed as produced, not buffered: spread out in time
    assert times[-1] - times[0] > 0.05 and len({round(t, 3) for t in times}) >= 3


def test_node_client_streams_a_generation(infer_server: InferServer) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the Node client test needs both")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        install = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_CLIENT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert install.returncode == 0, f"npm install failed: {install.stderr}"
    proc = subprocess.run(
        ["node", "client.js", f"127.0.0.1:{infer_server.port}", ALICE_KEY, "What is the capital of France?"],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    chunks = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(chunks) >= 3
    assert "Paris" in "".join(c["text"] for c in chunks)
    assert chunks[-1]["finishReason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert chunks[-1]["usage"]["completionTokens"] > 0


def test_reflection_lists_the_services(infer_server: InferServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{infer_server.port}") as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        "kiln.v1.InferenceService",
        "kiln.v1.AdapterService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services


def test_cli_generate_and_adapters(infer_server: InferServer) -> None:
    base = [
        sys.executable,
        "-m",
        "kiln_infer.cli",
        "--address",
        f"127.0.0.1:{infer_server.port}",
        "--api-key",
        ALICE_KEY,
    ]
    proc = subprocess.run(
        [*base, "generate", "--chat", "What is the capital of France?", "--temperature", "0", "-v"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout and "FINISH_REASON_STOP" in proc.stderr
    proc = subprocess.run(
        [*base, "adapters", "promote", "nothing-here", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "NOT_FOUND" in proc.stderr  # bad input: one line, exit 2
