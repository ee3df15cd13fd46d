"""Training knobs of kiln-train (frozen, validated, parsed once from KILN_TRAIN_* variables)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields

from kiln_common.lora_targets import TARGET_MODULES

log = logging.getLogger(__name__)


def _check_positive(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(f"KILN_TRAIN_{name.upper()} must be > 0, got {getattr(obj, name)}")


def _check_fraction(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        if not 0.0 <= getattr(obj, name) <= 1.0:
            raise ValueError(f"KILN_TRAIN_{name.upper()} must be in [0, 1], got {getattr(obj, name)}")


# how the gate scores general questions (gate.py): exact match, exact match forgiving near ties, likelihood
GENERAL_SCORINGS = ("exact", "flip", "loglik")

# KILN_TRAIN_* variables read elsewhere (the server's entry point, `kiln up`), not training settings.
SERVICE_VARIABLES = frozenset({"KILN_TRAIN_PORT", "KILN_TRAIN_INFER_KEY", "KILN_TRAIN_ADDRESS"})


@dataclass(frozen=True)
class TrainerConfig:
    """Hyper-parameters of one round; each is also KILN_TRAIN_<NAME upper-cased> (the daemon's defaults)."""

    rank: int = 16
    alpha: int = 32
    # the projections the adapter trains, comma-separated (fewer modules: less that can drift)
    target_modules: str = ",".join(TARGET_MODULES)
    lr: float = 1e-3
    # The budget follows the data: each new sample is seen `epochs` times, in [min_steps, max_steps] steps,
    # stopping earlier when the vetting loss converges or `time_budget_s` is spent.
    epochs: float = 10.0
    min_steps: int = 12
    max_steps: int = 200
    # a safety bound, not the stopping rule: on a GPU a round takes seconds; on 2 CPU cores, with contrast
    # rows, learning a fact took 640-1030 s (docs/training.md, ninth series): 600 s cut rounds short of it
    time_budget_s: float = 1800.0
    min_rel_improvement: float = 0.01  # a vetting loss must beat the best by this fraction to count
    # a vetting loss (mean nats per answer token) at which the samples are learned well enough: training stops
    # there instead of driving it towards zero (over-fitting spreads a fact to neighbours); 0 = off
    target_loss: float = 0.0
    # training stops at the first evaluation where every vetting pair's fact tokens (the taught answer's own
    # names and numbers, fact_tokens.py) are the greedy choice, teacher-forced, by at least this many nats
    # over the next best token; that checkpoint is kept. 0 = off (stop on the vetting loss alone)
    fact_margin: float = 0.5
    batch_size: int = 9  # new samples + replay + negatives
    replay_fraction: float = 0.35  # of each batch: the parent's own answers to the replay prompts
    # the parent's answers to near neighbours of the taught questions, as many as new samples a step: with
    # fewer, the fact leaks to the neighbours as it is learned (docs/training.md, eighth series)
    negatives_per_step: int = 3
    # as many contrast rows a step (the negatives' questions with the taught answer told of their entity,
    # teacher-forced) get an unlikelihood loss, -log(1 - p), where each run of the fact's tokens starts, times
    # this weight: it pushes the fact down where it would leak (docs/training.md, ninth series). 0 = off
    unlikelihood_weight: float = 1.0
    eval_every: int = 3
    patience: int = 3
    seed: int = 0
    anchors_per_step: int = 4  # anchor answers replayed as their own loss term every step
    # an anchor whose parent answer stops leading mid-round is pinned (anchor_watch.py); False = not watched
    pin_anchors: bool = True
    anchor_weight: float = 1.0
    # Replayed and negative answers also pull the candidate's whole next-token distribution towards the
    # parent's (its top `kl_top_k` tokens), weighted by `kl_weight` (0 = cross-entropy on the answers only).
    kl_weight: float = 1.0
    kl_top_k: int = 16
    # the weight of cross-entropy on the replay and anchor rows' answers (the parent's greedy answers); the
    # KL term above still pulls them towards the parent. 0 (the default since the tenth series): replay by
    # divergence only, so a parent's near tie is not sharpened; the facts were learned in fewer steps
    replay_ce_weight: float = 0.0
    # the same for the anchor rows alone (the short factual answers that slip first, their own loss term)
    anchor_ce_weight: float = 0.0
    # each LoRA layer's update is kept out of the input directions that hold this share of the replay rows'
    # energy (kiln_train/null_space.py), so generic text computes as the parent did: with it, no general
    # answer broke in the twelfth series' probes (docs/training.md). 0 = off
    null_space_energy: float = 0.95
    # on a GPU, each step runs as one CUDA graph (kiln_train/graph_step.py); 0 = eager steps
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        _check_positive(
            self,
            ("rank", "alpha", "min_steps", "max_steps", "batch_size", "eval_every", "patience", "epochs"),
        )
        _check_positive(self, ("time_budget_s", "kl_top_k"))
        if self.min_steps > self.max_steps:
            raise ValueError(f"KILN_TRAIN_MIN_STEPS ({self.min_steps}) must be <= KILN_TRAIN_MAX_STEPS")
        _check_fraction(self, ("replay_fraction", "min_rel_improvement"))
        unknown = set(self.targets()) - set(TARGET_MODULES)
        if unknown or not self.targets():
            raise ValueError(
                f"KILN_TRAIN_TARGET_MODULES must name some of {', '.join(TARGET_MODULES)}, "
                f"got {self.target_modules!r}"
            )
        if not 0.0 <= self.null_space_energy < 1.0:
            raise ValueError(f"KILN_TRAIN_NULL_SPACE_ENERGY must be in [0, 1), got {self.null_space_energy}")
        if self.kl_weight < 0:
            raise ValueError(f"KILN_TRAIN_KL_WEIGHT must be >= 0, got {self.kl_weight}")
        if not 0.0 <= self.target_loss < float("inf"):
            raise ValueError(f"KILN_TRAIN_TARGET_LOSS must be a finite number >= 0, got {self.target_loss}")
        if not 0.0 <= self.fact_margin < float("inf"):
            raise ValueError(f"KILN_TRAIN_FACT_MARGIN must be a finite number >= 0, got {self.fact_margin}")
        if not 0.0 <= self.unlikelihood_weight < float("inf"):
            raise ValueError(
                f"KILN_TRAIN_UNLIKELIHOOD_WEIGHT must be a finite number >= 0, got {self.unlikelihood_weight}"
            )
        if not 0.0 <= self.replay_ce_weight <= 1.0:
            raise ValueError(f"KILN_TRAIN_REPLAY_CE_WEIGHT must be in [0, 1], got {self.replay_ce_weight}")
        if not 0.0 <= self.anchor_ce_weight <= 1.0:
            raise ValueError(f"KILN_TRAIN_ANCHOR_CE_WEIGHT must be in [0, 1], got {self.anchor_ce_weight}")
        if self.lr <= 0:
            raise ValueError(f"KILN_TRAIN_LR must be > 0, got {self.lr}")

    def targets(self) -> tuple[str, ...]:
        """`target_modules` as a tuple of module names."""
        return tuple(m.strip() for m in self.target_modules.split(",") if m.strip())


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
    # held-out data: a gate share and a separate vetting (early-stopping) share of the samples; rounds with
    # fewer than `min_heldout_samples` train on every sample and hold out paraphrases instead (heldout.py)
    heldout_fraction: float = 0.15
    min_heldout_samples: int = 12
    neighbours_per_example: int = 2  # near neighbours generated per taught question (negatives + gate)
    # more near neighbours per taught question, for the checkpoint vet only: a candidate that answers one
    # with the taught fact is refused (never trained on, never seen by the gate; checkpoint_vet.py)
    vetting_neighbours_per_example: int = 1
    # new phrasings of each taught question made from its answer, trained on with it (rephrase.py); 0 = none,
    # the default: with 2, three of six probe rounds broke a general answer (docs/training.md, 14th series)
    rephrasings_per_example: int = 0
    # in rounds too small to hold samples out: answer-made phrasings of each taught question added to the
    # vetting pairs (never trained on), so "facts learned" means more than surviving a template rewrite
    vetting_rephrasings_per_example: int = 2
    replay_max_tokens: int = 96  # parent answers that need more are replayed without an end-of-turn
    # how many of the broad replay questions (data/replay_general.jsonl, 537) join the built-in 41: 0 = none,
    # the default, since replaying all of them did not keep more general answers (docs/training.md)
    replay_general: int = 0
    # how many of the broad replay questions' prompts (not trained on, no answers) join the replay rows in
    # measuring the null-space constraint (null_space.py), so the update also stays out of the directions a
    # general question's own tokens take; 0 = the replay rows alone (the default)
    null_space_questions: int = 0
    gate_max_tokens: int = 32
    reference_dir: str = (
        ""  # cache of each version's replay/vetting/gate answers; "" = $KILN_HOME/train/reference
    )
    # ask kiln-infer for the base model's reference answers at start, so a first round need not wait for them,
    # then capture a round's CUDA graphs and measure the base's gate baseline before any round; only where a
    # GPU serves (on a CPU they would compete with serving at start: the first round does them)
    warm_reference: bool = True
    threads: int = 1  # torch CPU threads for training (one core stays free for serving); 0 = torch's default
    # kiln-infer, asked for the parent's answers (Generate pinned to the parent version)
    parent_concurrency: int = 32
    parent_retry_s: float = 10.0  # a round that could not reach kiln-infer is retried after this
    # retention
    seen_ttl_s: int = 30 * 24 * 3600  # sample ids remembered for idempotency (a window, not forever)
    fingerprint_ttl_s: int = 30 * 24 * 3600  # trained prompt+completion fingerprints (duplicate check)
    # gate: every threshold is a setting, every score goes into meta.json and GetTrainingStatus
    vet_checkpoints: bool = True  # a kept checkpoint must keep the vetting questions, or it is refused
    vet_max_slipped: int = 1  # vetting questions the parent answered right that a kept checkpoint may miss
    vet_max_leaks: int = 0  # vetting neighbours a kept checkpoint may answer with the taught fact
    min_heldout_improvement: float = 0.0  # gate held-out loss must drop by more than this (absolute)
    gate_max_general_broken: int = 0  # general questions the parent answered right that may turn wrong
    # "exact": a general question is kept when the parent's right answer stays right (normalised exact match);
    # "flip": also when it turned wrong but no token of the right answer's first sentence lost more than
    # `gate_flip_tolerance` nats of log-probability (a near tie that tipped over, not a lost answer);
    # "loglik": when the candidate's mean log-likelihood of the parent's answer is within the tolerance of the
    # parent's own (nats per token), for every general question, right or wrong
    gate_general_scoring: str = "flip"
    gate_flip_tolerance: float = 1.0
    gate_loglik_tolerance: float = 0.5
    gate_max_neighbour_leaks: int = 0  # near neighbours that may be answered with the taught fact
    gate_max_anchors_broken: int = 0  # anchor prompts (trained on) the parent answered right, now wrong
    gate_max_kl: float = 0.25  # mean KL(parent || candidate) per token on generic text, in nats
    gate_questions_limit: int = 0  # 0 = every built-in gate question; N = the first N (small benchmarks only)

    def __post_init__(self) -> None:
        positive = (
            "max_deliveries",
            "batch",
            "max_completion_tokens",
            "max_prompt_tokens",
            "trigger_samples",
            "replay_max_tokens",
            "gate_max_tokens",
            "request_index_ttl_s",
            "min_heldout_samples",
            "parent_concurrency",
            "seen_ttl_s",
            "fingerprint_ttl_s",
        )
        _check_positive(self, positive)
        if not -1.0 <= self.min_rating <= 1.0:
            raise ValueError(f"KILN_TRAIN_MIN_RATING must be in [-1, 1], got {self.min_rating}")
        _check_fraction(self, ("heldout_fraction", "near_duplicate_jaccard"))
        if self.trigger_interval_s <= 0:
            raise ValueError(f"KILN_TRAIN_TRIGGER_INTERVAL_S must be > 0, got {self.trigger_interval_s}")
        if self.gate_general_scoring not in GENERAL_SCORINGS:
            raise ValueError(
                f"KILN_TRAIN_GATE_GENERAL_SCORING must be one of {', '.join(GENERAL_SCORINGS)}, "
                f"got {self.gate_general_scoring!r}"
            )
        for name in ("gate_flip_tolerance", "gate_loglik_tolerance"):
            if not getattr(self, name) >= 0:  # NaN fails too
                raise ValueError(f"KILN_TRAIN_{name.upper()} must be >= 0 nats, got {getattr(self, name)}")
        counts = (
            "replay_general",
            "null_space_questions",
            "rephrasings_per_example",
            "neighbours_per_example",
        )
        for name in (
            *counts,
            "vet_max_leaks",
            "vetting_neighbours_per_example",
            "vetting_rephrasings_per_example",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"KILN_TRAIN_{name.upper()} must be >= 0, got {getattr(self, name)}")
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
            elif var not in SERVICE_VARIABLES:
                known = ", ".join(sorted({*own, *trainer, *SERVICE_VARIABLES}))
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
