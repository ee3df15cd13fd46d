"""Reference answers of a version (replay data + control results) and the eval gate before publishing."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from kiln_train.controls import CONTROL_PROMPTS, REPLAY_PROMPTS, ControlPrompt
from kiln_train.trainer import LoraTrainer, TextPair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reference:
    """A version's own greedy answers to the replay prompts, and its control answers."""

    replay_answers: tuple[str, ...]
    control_answers: tuple[str, ...]

    def control_correct(self, controls: tuple[ControlPrompt, ...] = CONTROL_PROMPTS) -> list[bool]:
        """Which controls this version answered correctly."""
        return [c.is_correct(a) for c, a in zip(controls, self.control_answers, strict=True)]

    def replay_pairs(self, controls: tuple[ControlPrompt, ...] = CONTROL_PROMPTS) -> list[TextPair]:
        """Replay pairs: prompt → the version's own answer, for the replay prompts and the controls."""
        prompts = list(REPLAY_PROMPTS) + [c.prompt for c in controls]
        answers = list(self.replay_answers) + list(self.control_answers)
        return [TextPair(a, (("user", p),)) for p, a in zip(prompts, answers, strict=True) if a.strip()]


@dataclass(frozen=True)
class GateResult:
    """Whether a trained version may be published, why not, and the scores recorded in meta.json."""

    passed: bool
    reason: str
    scores: dict[str, float]


def control_pairs(controls: tuple[ControlPrompt, ...] = CONTROL_PROMPTS) -> list[TextPair]:
    """Control prompts as single user turns."""
    return [TextPair("", (("user", c.prompt),)) for c in controls]


def answer_controls(trainer: LoraTrainer, max_new_tokens: int = 24) -> tuple[str, ...]:
    """Greedy answers of the trainer's current weights to the control prompts."""
    return tuple(trainer.generate(control_pairs(), max_new_tokens))


def build_reference(trainer: LoraTrainer, replay_max_tokens: int) -> Reference:
    """Ask the (parent) weights the replay and control prompts."""
    replay = trainer.generate([TextPair("", (("user", p),)) for p in REPLAY_PROMPTS], replay_max_tokens)
    return Reference(tuple(replay), answer_controls(trainer))


class ReferenceCache:
    """References on disk, one JSON per (tenant, adapter, version); version 0 is shared by every adapter."""

    def __init__(self, root: Path, model_key: str) -> None:
        self._root = root
        self._model_key = model_key

    def _path(self, tenant: str, adapter: str, version: int) -> Path:
        if version == 0:
            return self._root / f"base-{self._model_key}.json"
        return self._root / tenant / adapter / f"v{version}.json"

    def get(self, tenant: str, adapter: str, version: int) -> Reference | None:
        """The cached reference, if any (and if it matches the current prompt sets)."""
        path = self._path(tenant, adapter, version)
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        ref = Reference(tuple(d["replay_answers"]), tuple(d["control_answers"]))
        if len(ref.replay_answers) != len(REPLAY_PROMPTS) or len(ref.control_answers) != len(CONTROL_PROMPTS):
            return None
        return ref

    def put(self, tenant: str, adapter: str, version: int, ref: Reference) -> None:
        """Store atomically."""
        path = self._path(tenant, adapter, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ref-")
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(ref), f)
        os.replace(tmp, path)


def gate(
    parent: Reference,
    new_controls: tuple[str, ...],
    heldout_before: float,
    heldout_after: float,
    min_improvement: float,
    controls: tuple[ControlPrompt, ...] = CONTROL_PROMPTS,
) -> GateResult:
    """Held-out loss must improve AND every control the parent got right must still be right."""
    was = parent.control_correct(controls)
    now = [c.is_correct(a) for c, a in zip(controls, new_controls, strict=True)]
    broken = [c.prompt for c, w, n in zip(controls, was, now, strict=True) if w and not n]
    scores = {
        "heldout_loss_before": heldout_before,
        "heldout_loss_after": heldout_after,
        "controls_parent_correct": float(sum(was)),
        "controls_kept": float(sum(1 for w, n in zip(was, now, strict=True) if w and n)),
        "controls_correct": float(sum(now)),
    }
    if not heldout_after < heldout_before - min_improvement:
        return GateResult(
            False, f"held-out loss did not improve ({heldout_before:.4f} -> {heldout_after:.4f})", scores
        )
    if broken:
        answers = {c.prompt: a for c, a in zip(controls, new_controls, strict=True)}
        detail = "; ".join(f"{p!r} -> {answers[p]!r}" for p in broken)
        return GateResult(
            False, f"{len(broken)} control prompt(s) no longer answered correctly: {detail}", scores
        )
    return GateResult(True, "", scores)
