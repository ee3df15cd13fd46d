"""Child processes that never outlive their parent: Linux's parent-death signal, set in the child."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` that makes the kernel send `sig` to the child when the parent dies (even by SIGKILL).

    The signal follows the thread that called Popen, so call it from a thread that lives as long as the
    parent (the main thread). When the parent already died between fork and exec, the child stops itself.
    """
    parent = os.getpid()

    def preexec() -> None:
        os.setpgid(0, 0)  # its own process group: a terminal's Ctrl-C reaches only the parent
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def start_child(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    stdin: int | None = None,
) -> subprocess.Popen[bytes]:
    """Popen `cmd` in its own process group, dying with its parent (see `die_with_parent`)."""
    return subprocess.Popen(
        list(cmd),
        env=dict(env) if env is not None else None,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=die_with_parent(),  # only setpgid, prctl and getppid run between fork and exec
    )
