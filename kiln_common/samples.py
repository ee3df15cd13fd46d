"""Schema of the `kiln:samples` Redis stream: what kiln-infer records and kiln-train consumes."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from enum import Enum

SAMPLES_STREAM = "kiln:samples"
DEAD_LETTER_STREAM = "kiln:samples:dead"
EVENTS_STREAM = "kiln:events"


class SampleKind(str, Enum):
    """Where a sample came from."""

    GENERATION = "generation"  # a served completion (recorded per the adapter's sampling policy)
    FEEDBACK = "feedback"  # a rating and/or correction joined to an earlier request_id
    EXAMPLE = "example"  # a curated prompt -> completion demonstration


@dataclass(frozen=True)
class Sample:
    """One training signal; flat string fields so it maps 1:1 onto a stream entry."""

    kind: SampleKind
    tenant: str
    adapter: str  # adapter name (never "" : the base model itself is not trained)
    prompt: str = ""  # raw prompt text, or "" when messages are used
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) turns before the completion
    completion: str = ""
    adapter_version: int = 0  # version that served it (0 = base model)
    request_id: str = ""
    rating: float | None = None
    correction: str = ""
    sample_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)

    def to_fields(self) -> dict[str, str]:
        """Encode for XADD."""
        d = asdict(self)
        d["kind"] = self.kind.value
        d["messages"] = json.dumps([list(m) for m in self.messages])
        d["rating"] = "" if self.rating is None else repr(self.rating)
        return {k: str(v) for k, v in d.items()}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes] | dict[str, str]) -> Sample:
        """Decode a stream entry; raises ValueError on a malformed one (it goes to the dead-letter stream)."""
        f = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        try:
            return cls(
                kind=SampleKind(f["kind"]),
                tenant=f["tenant"],
                adapter=f["adapter"],
                prompt=f.get("prompt", ""),
                messages=tuple((str(r), str(c)) for r, c in json.loads(f.get("messages") or "[]")),
                completion=f.get("completion", ""),
                adapter_version=int(f.get("adapter_version") or 0),
                request_id=f.get("request_id", ""),
                rating=float(f["rating"]) if f.get("rating") else None,
                correction=f.get("correction", ""),
                sample_id=f["sample_id"],
                created=float(f.get("created") or 0.0),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"malformed sample entry: {exc}") from exc
