"""A training round's record: what GetTrainingStatus reports and what is logged in Redis."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RoundRecord:
    """Outcome of a round, as GetTrainingStatus reports it (and as it is logged in Redis)."""

    round_id: str
    tenant: str
    adapter: str
    parent_version: int
    version: int = 0  # the version the round wrote (promoted, or rejected/abandoned and unpromoted); 0 = none
    outcome: str = "running"  # running, published, rejected, failed
    reason: str = ""
    num_samples: int = 0
    steps: int = 0
    max_steps: int = 0
    train_loss: float = 0.0
    eval: dict[str, float] = field(default_factory=dict)  # every gate score, phase seconds, budget
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    sample_ids: list[str] = field(default_factory=list)
    heldout_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def new_round(tenant: str, adapter: str, parent: int) -> RoundRecord:
    """A fresh round record."""
    return RoundRecord(round_id=uuid.uuid4().hex[:12], tenant=tenant, adapter=adapter, parent_version=parent)
