"""A request's priority, from gRPC metadata: `x-kiln-priority: background` lowers one's own request.

A background request is admitted by kiln-infer's scheduler only when no other request waits, and is the
first to be preempted. kiln-train asks its rounds' answers (the parent's, the gate's candidate's) this way,
so a round's bursts do not queue ahead of users' requests. Any caller may lower its own requests; nothing
can raise a request above the others.
"""

from __future__ import annotations

from collections.abc import Iterable

from kiln_common.errors import InvalidArgumentError

PRIORITY_HEADER = "x-kiln-priority"
PRIORITIES = ("normal", "background")


def is_background(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """True when the metadata asks for background priority; InvalidArgumentError naming the header for a
    value other than "normal" or "background"."""
    value = next((v for k, v in metadata or () if k.lower() == PRIORITY_HEADER), "normal")
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    if text not in PRIORITIES:
        allowed = ", ".join(PRIORITIES)
        raise InvalidArgumentError(PRIORITY_HEADER, f"must be one of {allowed}, got {text[:64]!r}")
    return text == "background"
