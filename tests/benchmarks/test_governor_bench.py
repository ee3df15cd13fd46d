"""The governor benchmark's pieces on CPU: the trainer role on a small real Llama, the numbers, the table.

The whole run (`python -m benchmarks.governor_bench --cpu`) starts kiln-infer and four trainer processes,
which takes minutes on two cores; these tests cover each piece it is made of.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.governor_bench import complete, reused, scenarios
from benchmarks.governor_load import latency, steps_per_s
from benchmarks.governor_report import judge, plot, table
from benchmarks.governor_trainer import _PadOnly, synthetic_batch, train_steps
from benchmarks.grpc_load import BurstResult, StreamTiming
from kiln_common.load_report import LoadReport
from kiln_train.governor import Governor, GovernorSettings
from kiln_train.micro_batch import accumulate_backward
from kiln_train.trainer import LoraTrainer, TrainerConfig


def tiny_base() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_trainer_role_trains_in_the_governors_micro_batches() -> None:
    trainer = LoraTrainer(tiny_base(), cast(Any, _PadOnly()), TrainerConfig(rank=4, alpha=8))
    busy = LoadReport(running=8, tpot_p99_ms=40.0, tpot_samples=100)
    settings = GovernorSettings(
        tpot_p99_budget_ms=20.0,
        max_pace_ms=1.0,
        adjust_every_s=1e-6,
        settle_s=0.0,
        min_duty=0.3,
        start_duty=0.5,
        max_duty=1.0,
    )
    gov = Governor(settings, lambda: busy, 4)
    before = [p.detach().clone() for p in trainer.trainable()]
    args = argparse.Namespace(steps=4, batch=4, seq_len=32)
    report = train_steps(trainer, args, gov, 4)
    # over budget: the duty is cut to its floor, and only then is the micro-batch halved
    assert report["micro_batch"] == [4, 4, 2, 1] and len(report["step_ends"]) == 4
    assert report["duty"][0] == 0.5 and report["duty"][1] < 0.5 and report["seen_tpot_p99_ms"][0] == 40.0
    assert set(report["modes"]) == {"paced"} and report["governor"]["load"]["running"] == 8.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trainable(), strict=True))
    assert steps_per_s(report) > 0
    ungoverned = train_steps(trainer, args, None, 4)
    assert ungoverned["micro_batch"] == [4] * 4 and ungoverned["governor"] is None


def test_paced_micro_batches_carry_the_governors_pause_between_them() -> None:
    trainer = LoraTrainer(tiny_base(), cast(Any, _PadOnly()), TrainerConfig(rank=4, alpha=8))
    busy = LoadReport(running=8, tpot_p99_ms=10.0, tpot_samples=100)
    slept: list[float] = []
    settings = GovernorSettings(tpot_p99_budget_ms=20.0, start_duty=0.5, max_duty=0.5, paced_micro_batch=1)
    gov = Governor(settings, lambda: busy, 4, sleep=slept.append)
    report = train_steps(trainer, argparse.Namespace(steps=2, batch=4, seq_len=32), gov, 4)
    assert report["micro_batch"] == [1, 1] and report["duty"] == [0.5, 0.5]
    assert len(slept) == 7  # 3 pauses inside each step, 1 before the second: at duty 0.5, as long as the work
    assert all(s > 0 for s in slept)


def test_synthetic_batch_masks_the_prompt() -> None:
    batch = synthetic_batch(100, 2, 300, 0, torch.device("cpu"))
    assert batch["input_ids"].shape == (2, 300) and (batch["labels"][:, :128] == -100).all()


def test_latency_counts_only_the_window_and_every_failure() -> None:
    result = BurstResult(
        [
            StreamTiming(submitted=0.0, first=0.1, last=1.1, tokens=11),
            StreamTiming(submitted=5.0, first=5.2, last=5.7, tokens=11),
            StreamTiming(submitted=6.0, code="UNAVAILABLE"),
        ]
    )
    stats = latency(result, since=4.0)
    assert stats["requests"] == 1 and stats["failed"] == 1
    assert abs(stats["ttft_ms"][1] - 200.0) < 1e-6 and abs(stats["tpot_ms"][0] - 50.0) < 1e-6


def sample_results() -> list[dict[str, Any]]:
    serving = {"requests": 10, "failed": 0, "codes": {"OK": 10}}
    return [
        {
            "model": "dummy:llama-3.2-1b",
            "capacity_rps": 40.0,
            "standalone": {"steps_per_s": 2.0, "seconds": 100.0},
            "idle_governed": {"steps_per_s": 1.9},
            "loads": [
                {
                    "load": 0.5, "rate_rps": 20.0, "requests": 2400,
                    "alone": {**serving, "ttft_ms": [30.0, 60.0], "tpot_ms": [10.0, 20.0]},
                    "governed": {
                        **serving, "ttft_ms": [32.0, 70.0], "tpot_ms": [10.5, 22.0],
                        "train_steps_per_s": 1.2, "micro_batch_mean": 5.5, "governor": {},
                    },
                    "ungoverned": {
                        **serving, "ttft_ms": [40.0, 120.0], "tpot_ms": [14.0, 35.0],
                        "train_steps_per_s": 1.9, "micro_batch_mean": 8.0, "governor": None,
                    },
                    "duty_0.25": {
                        **serving, "ttft_ms": [31.0, 66.0], "tpot_ms": [10.2, 21.0],
                        "train_steps_per_s": 0.4, "micro_batch_mean": 1.0, "governor": {},
                    },
                    "duty_0.1": {
                        **serving, "ttft_ms": [30.0, 63.0], "tpot_ms": [10.1, 20.4],
                        "train_steps_per_s": 0.1, "micro_batch_mean": 1.0, "governor": {},
                    },
                }
            ],
        }
    ]  # fmt: skip


def test_verdicts_table_and_plot(tmp_path: Path) -> None:
    results = sample_results()
    verdicts = {v["check"]: v["pass"] for v in judge(results[0])}
    assert verdicts == {
        "train, no traffic": True,  # 0.95
        "TPOT p99 @0.5": True,  # 1.10
        "TTFT p99 @0.5": True,  # 1.17
        "failed requests @0.5": True,
        "train @0.5": True,  # 0.60
    }
    text = table(results)
    assert (
        "| dummy:llama-3.2-1b | 0.5 | 20.0 | 60.0 / 70.0 / 120.0 | 20.0 / 22.0 / 35.0 | 1.20 (0.60x) |"
        in text
    )
    # the trade-off: each run beside serving, fixed duties in order of their share
    rows = [line for line in text.splitlines() if line.startswith("| dummy:llama-3.2-1b | 0.5 | ")][1:]
    assert [row.split(" | ")[2] for row in rows] == ["governed", "ungoverned", "duty 0.1", "duty 0.25"]
    assert "| duty 0.25 | 1.05 | 1.10 | 0.20 | 0 |" in text
    png = plot(results, tmp_path / "governor.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results[0]["loads"][0]["governed"]["tpot_ms"][1] = 30.0
    assert not {v["check"]: v["pass"] for v in judge(results[0])}["TPOT p99 @0.5"]


def test_a_long_run_splits_into_scenarios_and_reuses_what_ran(tmp_path: Path) -> None:
    assert scenarios("idle,alone,governed", ungoverned=True) == {"idle", "alone", "governed", "ungoverned"}
    assert scenarios(" alone ", ungoverned=False) == {"alone"}
    with pytest.raises(SystemExit, match="unknown \\['gverned'\\]"):
        scenarios("alone,gverned", ungoverned=False)
    part = {"model": "m", "capacity": {"rps": 10.0}, "standalone": {"steps_per_s": 4.0, "seconds": 50.0}}
    (tmp_path / "a.json").write_text(json.dumps([part]))  # a run's OUT.json: one entry per model
    (tmp_path / "b.json").write_text(json.dumps(part))  # or one model's results
    assert reused(tmp_path / "a.json") == part == reused(tmp_path / "b.json")
    with pytest.raises(SystemExit, match="--reuse"):
        reused(tmp_path / "missing.json")
    assert not complete(part)  # a part: written, not judged
    done = {**part, "idle_governed": {}, "loads": [{"load": 0.5, "alone": {}, "governed": {}}]}
    assert complete(done) and not complete({**done, "loads": [{"load": 0.5, "alone": {}}]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_micro_batches_give_the_eager_gradient() -> None:
    from benchmarks.governor_trainer import GraphedMicroBatch

    trainer = LoraTrainer(tiny_base().cuda(), cast(Any, _PadOnly()), TrainerConfig(rank=4, alpha=8))
    params = trainer.trainable()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)  # B != 0, so every parameter gets a gradient
    graphed = GraphedMicroBatch(trainer.model, params, rows=1, seq_len=32)
    calls: list[int] = []
    for seed in (1, 2):  # a second replay with new rows: the buffers are refilled, the sums restarted
        batch = synthetic_batch(128, 4, 32, seed, torch.device("cuda"))
        trainer.model.zero_grad(set_to_none=True)
        eager_loss = accumulate_backward(trainer.model, batch, 4)
        eager = [p.grad.clone() for p in params]
        loss = graphed.step_grads(batch, between=lambda: calls.append(1))
        assert abs(loss - eager_loss) < 1e-4
        for p, g in zip(params, eager, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5)
    assert len(calls) == 6  # 3 gaps in each 4-row step


def test_trainer_role_hands_off_chunk_by_chunk(tmp_path: Path) -> None:
    """With the hand-off, each chunk waits for serving's turn, and the steps still train the weights."""
    from benchmarks.layer_chunks import LayerChunks
    from kiln_common.gpu_turn import ServingTurn, TrainingTurn

    trainer = LoraTrainer(tiny_base(), cast(Any, _PadOnly()), TrainerConfig(rank=4, alpha=8))
    serving = ServingTurn(tmp_path, torch.device("cpu"))
    turn = TrainingTurn(serving.path, None)
    chunks = LayerChunks(trainer.model, trainer.trainable(), 32, graphs=False)
    before = [p.detach().clone() for p in trainer.trainable()]
    args = argparse.Namespace(steps=2, batch=2, seq_len=32)
    report = train_steps(trainer, args, None, 2, handoff=(chunks, turn))
    assert len(report["step_ends"]) == 2 and report["governor"] is None
    assert report["handoff"] == {"chunks_per_row": 9, "graphed": False, "waits": 0, "waited_s": 0.0}
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trainable(), strict=True))
    with serving.launching():  # serving mid-launch for longer than the turn's timeout: training goes on
        turn_waits = TrainingTurn(serving.path, None)
        train_steps(
            trainer, argparse.Namespace(steps=1, batch=1, seq_len=32), None, 1, handoff=(chunks, turn_waits)
        )
        assert turn_waits.waits == 9 + 1  # every chunk of the row, and the optimizer step
    turn.close()
    turn_waits.close()
    serving.close()
    assert scenarios("handoff,alone", False) == {"handoff", "alone"}
