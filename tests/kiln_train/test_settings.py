"""KILN_TRAIN_* variables: the daemon's settings and the trainer's hyper-parameters, one set of defaults."""

from __future__ import annotations

import pytest

from kiln_train.settings import TrainerConfig, TrainSettings


def test_trainer_defaults_are_the_daemons() -> None:
    s = TrainSettings.from_environ({})
    assert s.trainer == TrainerConfig()
    assert (s.trainer.min_steps, s.trainer.max_steps, s.trainer.epochs) == (12, 200, 10.0)
    assert (s.trainer.eval_every, s.trainer.patience) == (3, 3)


def test_trainer_variables_reach_the_trainer() -> None:
    s = TrainSettings.from_environ(
        {"KILN_TRAIN_MAX_STEPS": "19", "KILN_TRAIN_LR": "0.002", "KILN_TRAIN_BATCH": "8"}
    )
    assert s.trainer.max_steps == 19 and s.trainer.lr == 0.002 and s.batch == 8
    off = TrainSettings.from_environ({"KILN_TRAIN_UNLIKELIHOOD_WEIGHT": "0"})
    assert off.trainer.unlikelihood_weight == 0.0 and TrainerConfig().unlikelihood_weight > 0


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("KILN_TRAIN_PATIENCE", "0"),
        ("KILN_TRAIN_REPLAY_FRACTION", "1.5"),
        ("KILN_TRAIN_BATCH", "0"),
        ("KILN_TRAIN_MIN_STEPS", "500"),
        ("KILN_TRAIN_SEEN_TTL_S", "0"),
        ("KILN_TRAIN_GATE_GENERAL_SCORING", "substring"),
        ("KILN_TRAIN_KL_WEIGHT", "-1"),
        ("KILN_TRAIN_REPLAY_GENERAL", "-1"),
        ("KILN_TRAIN_REPHRASINGS_PER_EXAMPLE", "-2"),
        ("KILN_TRAIN_NEIGHBOURS_PER_EXAMPLE", "-1"),
        ("KILN_TRAIN_VETTING_NEIGHBOURS_PER_EXAMPLE", "-1"),
        ("KILN_TRAIN_VETTING_REPHRASINGS_PER_EXAMPLE", "-1"),
        ("KILN_TRAIN_NULL_SPACE_QUESTIONS", "-2"),
        ("KILN_TRAIN_VET_MAX_LEAKS", "-1"),
        ("KILN_TRAIN_REPHRASINGS_PER_EXAMPLE", "two"),
        ("KILN_TRAIN_UNLIKELIHOOD_WEIGHT", "-0.5"),
        ("KILN_TRAIN_UNLIKELIHOOD_WEIGHT", "nan"),
        ("KILN_TRAIN_UNLIKELIHOOD_WEIGHT", "inf"),
        ("KILN_TRAIN_REPLAY_CE_WEIGHT", "1.5"),
        ("KILN_TRAIN_REPLAY_CE_WEIGHT", "-0.1"),
        ("KILN_TRAIN_REPLAY_CE_WEIGHT", "nan"),
        ("KILN_TRAIN_ANCHOR_CE_WEIGHT", "1.5"),
        ("KILN_TRAIN_ANCHOR_CE_WEIGHT", "nan"),
    ],
)
def test_bad_values_name_their_variable(var: str, value: str) -> None:
    with pytest.raises(ValueError, match=var):
        TrainSettings.from_environ({var: value})
