"""A version's reference answers (asked of kiln-infer once per version, cached on disk)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln_train.parent_client import Messages, ParentAnswer, ParentClient
from kiln_train.prompt_sets import VETTING_QUESTIONS, Question, load_gate_questions, replay_prompts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSets:
    """The replay prompts, vetting questions and gate questions a reference answers (disjoint sets)."""

    replay: tuple[str, ...]
    vetting: tuple[Question, ...]
    gate: tuple[Question, ...]

    @classmethod
    def builtin(cls, gate_limit: int = 0, replay_general: int = 0) -> PromptSets:
        """The built-in sets (prompt_sets.py, data/replay_general.jsonl and data/gate_general.jsonl).

        `gate_limit` > 0 keeps the gate's first questions; `replay_general` of the broad replay file's join.
        """
        gate = load_gate_questions()
        gate = gate[:gate_limit] if gate_limit > 0 else gate
        return cls(replay_prompts(replay_general), VETTING_QUESTIONS, gate)

    def digest(self) -> str:
        """Changes whenever a prompt changes, so a cached reference of other sets is not reused."""
        text = "\n".join([*self.replay, *(q.prompt for q in self.vetting), *(q.prompt for q in self.gate)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Reference:
    """A version's greedy answers to the replay prompts, the vetting questions and the gate questions."""

    replay: tuple[ParentAnswer, ...]
    vetting: tuple[str, ...]
    gate: tuple[str, ...]


def user(prompt: str) -> Messages:
    """One user turn."""
    return (("user", prompt),)


def ask_reference(
    client: ParentClient,
    tenant: str,
    adapter: str,
    version: int,
    sets: PromptSets,
    replay_tokens: int,
    gate_tokens: int,
) -> Reference:
    """The parent's answers, from kiln-infer (ParentUnavailableError when it cannot answer)."""
    replay = client.answers(tenant, adapter, version, [user(p) for p in sets.replay], replay_tokens)
    checked = [user(q.prompt) for q in (*sets.vetting, *sets.gate)]
    answers = [a.text for a in client.answers(tenant, adapter, version, checked, gate_tokens)]
    return Reference(tuple(replay), tuple(answers[: len(sets.vetting)]), tuple(answers[len(sets.vetting) :]))


class ReferenceCache:
    """References on disk, one JSON per (tenant, adapter, version); version 0 is shared by every adapter."""

    def __init__(self, root: Path, model_key: str, sets: PromptSets) -> None:
        self._root = root
        self._model_key = model_key
        self.sets = sets

    def _path(self, tenant: str, adapter: str, version: int) -> Path:
        if version == 0:
            return self._root / f"base-{self._model_key}.json"
        return self._root / tenant / adapter / f"v{version}.json"

    def get(self, tenant: str, adapter: str, version: int) -> Reference | None:
        """The cached reference, if any (and if it was made for the current prompt sets)."""
        try:
            d = json.loads(self._path(tenant, adapter, version).read_text())
        except (OSError, ValueError):
            return None
        if d.get("sets") != self.sets.digest():
            return None
        replay = tuple(ParentAnswer(t, bool(c)) for t, c in d["replay"])
        return Reference(replay, tuple(d["vetting"]), tuple(d["gate"]))

    def put(self, tenant: str, adapter: str, version: int, ref: Reference) -> None:
        """Store atomically."""
        path = self._path(tenant, adapter, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "sets": self.sets.digest(),
            "replay": [[a.text, a.complete] for a in ref.replay],
            "vetting": list(ref.vetting),
            "gate": list(ref.gate),
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ref-")
        with os.fdopen(fd, "w") as f:
            json.dump(body, f)
        os.replace(tmp, path)
