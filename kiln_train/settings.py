"""Training knobs of kiln-train (frozen, validated, parsed once from KILN_TRAIN_* variables)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields

log = logging.getLogger(__name__)


def _check_positive(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"KILN_TRAIN_{name.upper()} must be > 0, got {getattr(obj, name)}")


def _check_fraction(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        if not 0.0 <= getattr(obj, name) <= 1.0:
            raise ValueError(f"KILN_TRAIN_{name.upper()} must be in [0, 1], got {getattr(obj, name)}")


@dataclass(frozen=True)
class TrainerConfig:
    """Hyper-parameters of one round; each is also KILN_TRAIN_<NAME upper-cased> (the daemon's defaults)."""

    rank: int = 16
    alpha: int = 32
    lr: float = 1e-3
    max_steps: int = 15
    batch_size: int = 4  # half new samples, half replay
    replay_fraction: float = 0.5
    eval_every: int = 3
    patience: int = 3
    seed: int = 0
    # 0 = replay trains on the parent's greedy answers as labels (sharpens the margins the gate checks);
    # k > 0 distils the parent's top-k distribution instead (keeps margins as they were, so tiny ones flip).
    kl_topk: int = 0
    anchors_per_step: int = 4  # control answers replayed as their own loss term every step
    anchor_weight: float = 1.0
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_positive(self, ("rank", "alpha", "max_steps", "batch_size", "eval_every", "patience"))
        _check_fraction(self, ("replay_fraction",))
        if self.lr <= 0:
            raise ValueError(f"KILN_TRAIN_LR must be > 0, got {self.lr}")


@dataclass(frozen=True)
class TrainSettings:
    """Consumer, pipeline, trigger, trainer and gate settings; each is KILN_TRAIN_<NAME upper-cased>."""

    # consumer
    group: str = "kiln-train"
    consumer: str = "kiln-train-1"  # stable across restarts, so a restart recovers its own pending entries
    max_deliveries: int = (
        3  # a sample delivered this many times without being buffered goes to the dead letters
    )
    claim_idle_ms: int = 30_000  # entries another consumer left pending this long are claimed
    block_ms: int = 500
    batch: int = 64
    request_index_ttl_s: int = 7 * 24 * 3600  # how long feedback can still join its generation
    # pipeline
    min_rating: float = 0.5  # ratings are in [-1, 1]; a rating below this drops the sample
    train_unrated_generations: bool = False  # unrated served completions wait for feedback instead
    max_completion_tokens: int = 512
    max_prompt_tokens: int = 1536
    near_duplicate_jaccard: float = (
        0.9  # word 3-shingle Jaccard at or above which a sample is a near-duplicate
    )
    # triggers
    trigger_samples: int = 6  # new buffered samples that start a round
    trigger_interval_s: float = 600.0  # a non-empty buffer older than this starts a round
    # trainer (its hyper-parameters are KILN_TRAIN_RANK, KILN_TRAIN_MAX_STEPS, ... as well)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    heldout_fraction: float = 0.2
    replay_max_tokens: int = 32
    reference_dir: str = ""  # cache of each version's replay/control answers; "" = $KILN_HOME/train/reference
    threads: int = 1  # torch CPU threads for training (one core stays free for serving); 0 = torch's default
    # gate
    vet_checkpoints: bool = True  # a new best checkpoint must keep the controls, or training stops there
    min_heldout_improvement: float = 0.0  # held-out loss must drop by more than this (absolute)

    def __post_init__(self) -> None:
        positive = (
            "max_deliveries",
            "batch",
            "max_completion_tokens",
            "max_prompt_tokens",
            "trigger_samples",
            "replay_max_tokens",
            "request_index_ttl_s",
        )
        _check_positive(self, positive)
        if not -1.0 <= self.min_rating <= 1.0:
            raise ValueError(f"KILN_TRAIN_MIN_RATING must be in [-1, 1], got {self.min_rating}")
        _check_fraction(self, ("heldout_fraction", "near_duplicate_jaccard"))
        if self.trigger_interval_s <= 0:
            raise ValueError(f"KILN_TRAIN_TRIGGER_INTERVAL_S must be > 0, got {self.trigger_interval_s}")
        if not self.consumer or not self.group:
            raise ValueError("KILN_TRAIN_CONSUMER and KILN_TRAIN_GROUP must not be empty")

    @classmethod
    def from_environ(cls, extra: Mapping[str, str]) -> TrainSettings:
        """Parse KILN_TRAIN_* variables (unknown ones are logged, so a typo is visible)."""
        own = {f"KILN_TRAIN_{f.name.upper()}": f for f in fields(cls) if f.name != "trainer"}
        trainer = {f"KILN_TRAIN_{f.name.upper()}": f for f in fields(TrainerConfig)}
        values: dict[str, object] = {}
        trainer_values: dict[str, object] = {}
        for var, raw in extra.items():
            if var in own:
                values[own[var].name] = _parse(var, own[var], raw)
            elif var in trainer:
                trainer_values[trainer[var].name] = _parse(var, trainer[var], raw)
            else:
                known = ", ".join(sorted({*own, *trainer}))
                log.warning("ignoring unknown setting %s; known: %s", var, known)
        return cls(trainer=TrainerConfig(**trainer_values), **values)  # type: ignore[arg-type]


def _parse(var: str, f: Field[object], raw: str) -> object:
    """A variable's text as its field's type (the type of the field's default)."""
    default = f.default
    try:
        if isinstance(default, bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return raw
    except ValueError as exc:
        raise ValueError(f"{var}={raw!r}: {exc}") from exc
