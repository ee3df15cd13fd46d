"""One real kiln-infer (real engine, real SmolLM2, real valkey-server, gRPC over a socket) for the session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.v1 import adapter_pb2, adapter_pb2_grpc, inference_pb2_grpc
from kiln_common.auth import hash_key
from kiln_common.config import InferConfig, RedisConfig
from kiln_common.model_loader import ModelSource
from kiln_infer.cli_adapters import upload_requests
from kiln_infer.server import InferServer

ALICE_KEY = "alice-key-0123456789"
BOB_KEY = "bob-key-9876543210"
ADMIN_KEY = "ops-admin-key-0123456789"  # stored hashed in the key file, role admin, tenant "ops"


@dataclass
class Client:
    """Stubs for one tenant on the session server."""

    inference: inference_pb2_grpc.InferenceServiceStub
    adapters: adapter_pb2_grpc.AdapterServiceStub
    metadata: list[tuple[str, str]]


@pytest.fixture(scope="session")
def infer_server(kiln_home: Path, redis_url: str, smollm2: ModelSource) -> Iterator[InferServer]:
    """kiln-infer on an ephemeral port with two tenants (alice, bob), serving once warm."""
    keys = kiln_home / "api_keys.txt"
    keys.write_text(
        f"# test tenants\n{ALICE_KEY} alice\n{BOB_KEY} bob tenant\n{hash_key(ADMIN_KEY)} ops admin\n"
    )
    config = InferConfig(
        home=kiln_home, redis=RedisConfig(home=kiln_home), port=0, api_keys_file=keys, drain_timeout_s=5.0
    )
    server = InferServer(config)
    server.start()
    server.health_before_warm_up = _health(server.port)  # type: ignore[attr-defined]
    server.start_warm_up()
    assert server.serving.wait(120), "kiln-infer did not warm up"
    yield server
    server.drain()


def _health(port: int) -> int:
    """grpc.health.v1 status of the whole server."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return int(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status)


@pytest.fixture(scope="session")
def channel(infer_server: InferServer) -> Iterator[grpc.Channel]:
    """A channel to the session server."""
    with grpc.insecure_channel(f"127.0.0.1:{infer_server.port}") as ch:
        yield ch


def _client(channel: grpc.Channel, key: str) -> Client:
    return Client(
        inference_pb2_grpc.InferenceServiceStub(channel),
        adapter_pb2_grpc.AdapterServiceStub(channel),
        [("authorization", f"Bearer {key}")],
    )


@pytest.fixture(scope="session")
def alice(channel: grpc.Channel) -> Client:
    """Tenant alice."""
    return _client(channel, ALICE_KEY)


@pytest.fixture(scope="session")
def bob(channel: grpc.Channel) -> Client:
    """Tenant bob."""
    return _client(channel, BOB_KEY)


@pytest.fixture(scope="session")
def admin(channel: grpc.Channel) -> Client:
    """The admin key (tenant "ops")."""
    return _client(channel, ADMIN_KEY)


def upload(client: Client, name: str, path: Path, promote: bool = False) -> adapter_pb2.UploadVersionResponse:
    """Publish a local PEFT directory as `client`'s next version of `name` over UploadVersion."""
    return client.adapters.UploadVersion(  # type: ignore[no-any-return]
        upload_requests(name, path, promote, chunk_bytes=64 * 1024), metadata=client.metadata, timeout=60
    )
