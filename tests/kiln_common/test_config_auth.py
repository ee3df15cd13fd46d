"""Config built from flags and environment; API key files and tenants."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from kiln_common.auth import (
    DEFAULT_TENANT,
    Authenticator,
    AuthError,
    Caller,
    Role,
    hash_key,
    load_key_file,
    parse_key_file,
)
from kiln_common.config import InferConfig, RedisConfig, default_home, infer_config_from
from kiln_common.errors import PermissionDeniedError
from kiln_common.flags import add_infer_flags
from kiln_infer.engine_build import engine_config_for


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_infer_flags(parser)
    return parser.parse_args(argv)


def test_flags_override_environment_which_overrides_defaults(tmp_path: Path) -> None:
    env = {"KILN_HOME": str(tmp_path), "KILN_PORT": "6000", "KILN_MODEL": "dummy:tiny"}
    cfg = infer_config_from(_parse([]), env)
    assert (cfg.home, cfg.port, cfg.model, cfg.redis.url) == (tmp_path.resolve(), 6000, "dummy:tiny", "")
    assert cfg.redis.effective_url == f"unix://{tmp_path.resolve() / 'redis.sock'}"
    cfg = infer_config_from(_parse(["--port", "7000", "--redis-url", "redis://h:1/0"]), env)
    assert cfg.port == 7000 and cfg.redis.url == "redis://h:1/0" and not cfg.redis.embedded
    assert infer_config_from(_parse([]), {"KILN_HOME": str(tmp_path)}).port == 50051


def test_invalid_config_is_a_clear_value_error(tmp_path: Path) -> None:
    redis = RedisConfig(home=tmp_path)
    with pytest.raises(ValueError, match="port"):
        InferConfig(home=tmp_path, redis=redis, port=70000)
    with pytest.raises(ValueError, match="dtype"):
        InferConfig(home=tmp_path, redis=redis, dtype="int3")
    with pytest.raises(ValueError, match="KILN_API_KEYS"):
        InferConfig(home=tmp_path, redis=redis, api_keys_file=tmp_path / "missing")
    with pytest.raises(ValueError, match="KILN_REDIS_URL"):
        RedisConfig(home=tmp_path, url="http://nope")


def test_the_background_cap_is_a_setting_and_a_bad_one_names_its_flag(tmp_path: Path) -> None:
    env = {"KILN_HOME": str(tmp_path), "KILN_MAX_BACKGROUND_SEQS": "4"}
    cfg = infer_config_from(_parse([]), env)
    assert cfg.max_background_seqs == 4
    on_gpu = engine_config_for(cfg, "cuda:0", 4096, 1024, 1 << 34)
    assert on_gpu.max_background_seqs == 4 and 48 in on_gpu.cuda_graph_batch_sizes
    default = infer_config_from(_parse([]), {"KILN_HOME": str(tmp_path)})
    gpu = engine_config_for(default, "cuda:0", 4096, 1024, 1 << 34)
    assert gpu.max_background_seqs == gpu.max_num_seqs  # by default no cap beyond the batch
    cpu = engine_config_for(default, "cpu", 4096, 1024, 0)
    assert cpu.max_background_seqs == cpu.max_num_seqs
    with pytest.raises(ValueError, match="--max-background-seqs / KILN_MAX_BACKGROUND_SEQS"):
        infer_config_from(_parse(["--max-background-seqs", "-1"]), {"KILN_HOME": str(tmp_path)})
    with pytest.raises(ValueError, match="KILN_MAX_BACKGROUND_SEQS"):
        infer_config_from(_parse([]), {**env, "KILN_MAX_BACKGROUND_SEQS": "many"})


def test_enforce_eager_turns_the_step_graphs_off(tmp_path: Path) -> None:
    home = {"KILN_HOME": str(tmp_path)}
    default = engine_config_for(infer_config_from(_parse([]), home), "cuda:0", 4096, 1024, 1 << 34)
    assert default.use_cuda_graphs and default.static_decode is None  # graphs on a GPU by default
    for args, env in ((["--enforce-eager"], home), ([], {**home, "KILN_ENFORCE_EAGER": "true"})):
        cfg = infer_config_from(_parse(args), env)
        assert cfg.enforce_eager
        eager = engine_config_for(cfg, "cuda:0", 4096, 1024, 1 << 34)
        assert not eager.use_cuda_graphs and eager.static_decode is False
    assert not infer_config_from(_parse([]), {**home, "KILN_ENFORCE_EAGER": "0"}).enforce_eager
    with pytest.raises(ValueError, match="KILN_ENFORCE_EAGER"):
        infer_config_from(_parse([]), {**home, "KILN_ENFORCE_EAGER": "sometimes"})


def test_default_home_and_long_socket_paths(tmp_path: Path) -> None:
    assert default_home({}, cwd=tmp_path) == (Path.home() / ".kiln").resolve()
    (tmp_path / ".kiln").mkdir()
    assert default_home({}, cwd=tmp_path) == (tmp_path / ".kiln").resolve()
    deep = tmp_path / ("d" * 120)
    assert len(str(RedisConfig(home=deep).socket_path)) < 108


def test_key_files_map_key_hashes_to_tenants_and_roles(tmp_path: Path) -> None:
    alice, bob = Caller("alice"), Caller("bob")
    assert parse_key_file('{"k-0123456789": "alice"}') == {hash_key("k-0123456789"): alice}
    assert parse_key_file("# c\nk-0123456789 alice\n\nk-9876543210 bob  # x\n") == {
        hash_key("k-0123456789"): alice,
        hash_key("k-9876543210"): bob,
    }
    hashed = hash_key("root-key-0123")
    assert parse_key_file(f"{hashed} ops admin") == {hashed: Caller("ops", Role.ADMIN)}
    assert parse_key_file(json.dumps({hashed: {"tenant": "ops", "role": "admin"}})) == {
        hashed: Caller("ops", Role.ADMIN)
    }
    for bad, message in [
        ("short alice", "shorter"),
        ("k-0123456789 bad/tenant", "tenant"),
        ("k-0123456789 alice root", "role must be"),
        ("sha256:abc alice", "64 lowercase hex"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_key_file(bad)
    path = tmp_path / "keys"
    path.write_text(f"k-0123456789 alice\n{hashed} ops admin\n")
    auth = Authenticator.from_file(path)
    assert "k-0123456789" not in repr(vars(auth))  # only hashes are kept
    assert auth.tenant([("authorization", "Bearer k-0123456789")]) == "alice"
    for metadata in ([], [("authorization", "Bearer wrong-key-00")], [("authorization", "k-0123456789")]):
        with pytest.raises(AuthError):
            auth.tenant(metadata)
    # an admin may act for any tenant; a tenant's x-kiln-tenant is ignored
    act_as_bob = [("x-kiln-tenant", "bob")]
    assert auth.caller([("authorization", "Bearer root-key-0123"), *act_as_bob]) == Caller("bob", Role.ADMIN)
    assert auth.caller([("authorization", "Bearer k-0123456789"), *act_as_bob]) == alice
    with pytest.raises(PermissionDeniedError, match="admin"):
        alice.require_admin("importing a server path")


def test_no_key_file_means_default_tenant_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    auth = Authenticator.from_file(None)
    assert auth.tenant([]) == DEFAULT_TENANT and not auth.enabled
    assert "no API key file" in caplog.text


def test_a_short_key_is_one_clear_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("k-0123456789 alice\nshort bob\n")
    with pytest.raises(ValueError) as err:
        load_key_file(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "'bob'" in message and "8 characters" in message
