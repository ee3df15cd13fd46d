"""Training stops once the vetting loss reaches KILN_TRAIN_TARGET_LOSS, and the setting refuses nonsense."""

from __future__ import annotations

import math

import pytest

from kiln_train.settings import TrainSettings
from kiln_train.trainer import LoraTrainer, TrainerConfig
from tests.kiln_train.test_workspace import _data
from tests.kiln_train.tiny_lm import TinyTok, tiny_model


def _train(target: float) -> tuple[int, str]:
    cfg = TrainerConfig(
        kl_top_k=4, min_steps=9, max_steps=9, eval_every=3, patience=5, rank=4, lr=3e-3, target_loss=target
    )
    trainer = LoraTrainer(tiny_model(), TinyTok(), cfg)  # type: ignore[arg-type]
    result = trainer.train(_data(1))
    return result.steps, result.stop_reason


def test_training_stops_at_the_first_evaluation_that_reaches_the_target() -> None:
    assert _train(0.0) == (9, "planned steps done")  # off: the planned steps
    steps, reason = _train(1e6)  # any first improvement reaches it
    assert (steps, reason) == (3, "vetting loss reached the target")


@pytest.mark.parametrize("raw", ["nan", "inf", "-0.5"])
def test_a_target_loss_that_is_not_a_finite_non_negative_number_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="KILN_TRAIN_TARGET_LOSS"):
        TrainSettings.from_environ({"KILN_TRAIN_TARGET_LOSS": raw})
    assert not math.isnan(TrainSettings.from_environ({"KILN_TRAIN_TARGET_LOSS": "0.3"}).trainer.target_loss)
