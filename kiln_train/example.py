"""A training example: one prompt → completion pair, as the buffer stores it and a round trains on it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from kiln_common.samples import SampleKind


@dataclass(frozen=True)
class Example:
    """One prompt → completion pair ready for training; `messages` empty means a raw `prompt`."""

    sample_id: str
    tenant: str
    adapter: str
    completion: str
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    request_id: str = ""
    source: str = SampleKind.EXAMPLE.value
    created: float = 0.0

    @property
    def buffer_key(self) -> str:
        """tenant/adapter: which per-adapter buffer it belongs to."""
        return f"{self.tenant}/{self.adapter}"

    def prompt_text(self) -> str:
        """The prompt side as one string (for fingerprints and shingles)."""
        if self.messages:
            return "\n".join(f"{r}: {c}" for r, c in self.messages)
        return self.prompt

    def to_json(self) -> str:
        """Encode for the Redis buffer."""
        return json.dumps(
            {
                "sample_id": self.sample_id,
                "tenant": self.tenant,
                "adapter": self.adapter,
                "completion": self.completion,
                "prompt": self.prompt,
                "messages": [list(m) for m in self.messages],
                "request_id": self.request_id,
                "source": self.source,
                "created": self.created,
            }
        )

    @classmethod
    def from_json(cls, raw: str) -> Example:
        """Decode from the Redis buffer."""
        d = json.loads(raw)
        d["messages"] = tuple((str(r), str(c)) for r, c in d.get("messages", []))
        return cls(**d)
