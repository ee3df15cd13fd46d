"""The governor: full speed when serving is idle, paused when saturated, duty cut over budget, grown under.

Reports go through real Redis (kiln-infer's publisher, the governor's reader); time is a fake clock that the
governor's own sleeps advance, so a pause of seconds costs no real time.
"""

from __future__ import annotations

import pytest
import redis

from kiln_common.load_report import LoadPublisher, LoadWindow, read_load
from kiln_train.governor import Governor, GovernorMode, GovernorSettings


class FakeTime:
    """A clock and a sleep that advances it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


class Serving:
    """kiln-infer's side: one API process publishing its load into Redis."""

    def __init__(self, client: redis.Redis) -> None:
        client.delete(*client.keys("kiln:load:*") or ["-"])
        self.publisher = LoadPublisher(client, "test:1", ttl_s=60)

    def report(self, running: int, waiting: int = 0, tpot_ms: float = 10.0) -> None:
        window = LoadWindow()
        if running:
            window.add_tpots([tpot_ms / 1000] * 100)
        self.publisher.publish({"running": running, "waiting": waiting, "kv_usage": 0.1}, window, 0.5)


def governor(client: redis.Redis, t: FakeTime, **settings: float) -> Governor:
    # the mechanics under test grow and cut the duty over the whole range: no cap unless a test sets one
    base = {"saturated_s": 2.0, "adjust_every_s": 1.0, "max_duty": 1.0}
    cfg = GovernorSettings(**{**base, **settings})  # type: ignore[arg-type]
    return Governor(cfg, lambda: read_load(client), 8, clock=t.clock, sleep=t.sleep, window_s=5.0)


def steps(gov: Governor, t: FakeTime, n: int, step_s: float = 0.5) -> list[int]:
    """Run n steps of step_s each; the micro-batch sizes the governor chose."""
    sizes = []
    for _ in range(n):
        sizes.append(gov.before_step())
        t.now += step_s
    return sizes


def test_full_speed_when_serving_is_idle_or_absent(rds: redis.Redis) -> None:
    t = FakeTime()
    gov = governor(rds, t, tpot_p99_budget_ms=20.0)
    assert steps(gov, t, 3) == [8, 8, 8] and gov.mode is GovernorMode.FULL  # nobody publishing
    Serving(rds).report(running=0)
    assert steps(gov, t, 3) == [8, 8, 8]
    assert gov.mode is GovernorMode.FULL and t.slept == 0.0 and gov.state()["load"]["running"] == 0.0


def test_pauses_while_saturated_then_resumes(rds: redis.Redis) -> None:
    t = FakeTime()
    serving = Serving(rds)
    gov = governor(rds, t, tpot_p99_budget_ms=20.0, poll_s=0.5, start_duty=1.0)
    serving.report(running=32, waiting=4)
    steps(gov, t, 2, step_s=1.0)  # waiting, but not yet for saturated_s
    assert gov.mode is GovernorMode.STEADY and t.slept == 0.0

    polls = 0

    def drain_queue() -> bool:  # serving catches up after a few polls of the paused governor
        nonlocal polls
        polls += 1
        if polls == 4:
            serving.report(running=32, waiting=0)
        return False

    assert gov.before_step(should_stop=drain_queue) == 8
    assert polls == 4 and gov.mode is GovernorMode.STEADY
    assert gov.state()["paused_s"] == pytest.approx(2.0)


def test_paused_governor_lets_a_stop_through(rds: redis.Redis) -> None:
    t = FakeTime()
    Serving(rds).report(running=32, waiting=4)
    gov = governor(rds, t, tpot_p99_budget_ms=20.0, saturated_s=0.0)
    gov.before_step(should_stop=lambda: True)
    assert gov.mode is GovernorMode.PAUSED and t.slept == 0.0


def test_duty_cut_over_budget_grown_under_it_and_restored_when_idle(rds: redis.Redis) -> None:
    t = FakeTime()
    serving = Serving(rds)
    gov = governor(
        rds, t, tpot_p99_budget_ms=20.0, start_duty=0.5, backoff=0.5, step_up=0.1, settle_s=0.0, min_duty=0.1
    )
    serving.report(running=32, tpot_ms=15.0)
    assert gov.before_step() == 8 and gov.duty == 0.5  # serving turned busy: half duty at once
    t.now += 1.0  # a 1 s step
    gov.before_step()
    assert gov.duty == pytest.approx(0.6)  # 15 ms is well under 20 ms: grown by step_up
    assert gov.pace_ms == pytest.approx(1000 * 0.4 / 0.6)  # the pause keeps training at its duty

    serving.report(running=32, tpot_ms=26.0)  # over budget: the duty is cut, the micro-batch kept
    t.now += 1.0
    assert gov.before_step() == 8 and gov.mode is GovernorMode.PACED
    assert gov.duty == pytest.approx(0.3) and gov.pace_ms == pytest.approx(1000 * 0.7 / 0.3)
    t.now += 1.0
    assert gov.before_step() == 8 and gov.duty == pytest.approx(0.15)  # still over: cut again
    t.now += 1.0
    assert gov.before_step() == 8 and gov.duty == pytest.approx(0.1)  # down at min_duty
    t.now += 1.0
    assert gov.before_step() == 4 and gov.duty == pytest.approx(0.1)  # only now: shorter kernels
    t.now += 1.0
    assert gov.before_step() == 2

    serving.report(running=32, tpot_ms=19.0)  # inside the budget but within its headroom: hold
    t.now += 1.0
    gov.before_step()
    assert gov.duty == pytest.approx(0.1) and gov.micro_batch == 2
    serving.report(running=32, tpot_ms=10.0)  # well under: the micro-batch doubles back first
    t.now += 1.0
    assert gov.before_step() == 4 and gov.duty == pytest.approx(0.1)
    t.now += 1.0
    assert gov.before_step() == 8 and gov.duty == pytest.approx(0.1)
    for _ in range(9):  # then the duty grows, one step_up per adjustment
        t.now += 1.0
        gov.before_step()
    assert gov.duty == 1.0 and gov.micro_batch == 8 and gov.mode is GovernorMode.STEADY

    serving.report(running=0)  # idle: everything back at once
    gov.duty, gov.micro_batch = 0.2, 1
    t.now += 1.0
    assert gov.before_step() == 8 and gov.pace_ms == 0.0 and gov.mode is GovernorMode.FULL


def test_no_second_cut_until_the_reports_could_show_the_first(rds: redis.Redis) -> None:
    t = FakeTime()
    serving = Serving(rds)
    gov = governor(rds, t, tpot_p99_budget_ms=20.0, start_duty=0.5, backoff=0.5, settle_s=3.0)
    serving.report(running=32, tpot_ms=30.0)
    start = t.now
    gov.before_step()  # busy: dropped to the start duty, which counts as a cut
    while t.now - start < 2.5:
        t.now += 0.1  # 0.1 s steps, 0.1 s pauses
        gov.before_step()
        assert gov.duty == 0.5  # the reports still hold requests from before the drop
    t.now = start + 3.7
    gov.before_step()
    assert gov.duty == pytest.approx(0.25) and gov.micro_batch == 8


def test_relative_budget_from_the_idle_baseline(rds: redis.Redis) -> None:
    t = FakeTime()
    serving = Serving(rds)
    gov = governor(rds, t, tpot_p99_slack=0.15, start_duty=1.0, settle_s=0.0)
    serving.report(running=16, tpot_ms=20.0)
    gov.before_step()  # no training yet this window: serving's own p99 is the baseline
    assert gov.baseline_tpot_p99_ms == pytest.approx(20.0) and gov.budget_ms == pytest.approx(23.0)
    t.now += 1.0
    serving.report(running=16, tpot_ms=22.0)  # inside +15%; training ran, so not a new baseline
    gov.before_step()
    assert gov.mode is GovernorMode.STEADY and gov.baseline_tpot_p99_ms == pytest.approx(20.0)
    t.now += 1.0
    serving.report(running=16, tpot_ms=25.0)
    assert gov.before_step() == 8 and gov.mode is GovernorMode.PACED and gov.duty < 1.0


def test_state_is_plain_data(rds: redis.Redis) -> None:
    t = FakeTime()
    Serving(rds).report(running=2, tpot_ms=12.0)
    gov = governor(rds, t, tpot_p99_budget_ms=20.0)
    gov.before_step()
    state = gov.state()
    assert state["mode"] == "paced" and state["budget_ms"] == 20.0 and state["duty"] == 0.3
    assert state["load"]["tpot_p99_ms"] == 12.0
    assert set(state) >= {"mode", "duty", "pace_ms", "micro_batch", "full_micro_batch", "paused_s", "load"}


def test_settings_from_environment_leave_the_rest() -> None:
    settings, rest = GovernorSettings.from_environ(
        {"KILN_TRAIN_TPOT_P99_BUDGET_MS": "25", "KILN_TRAIN_MEMORY_FRACTION": "0.3", "KILN_TRAIN_RANK": "8"}
    )
    assert settings.tpot_p99_budget_ms == 25.0 and settings.memory_fraction == 0.3
    assert rest == {"KILN_TRAIN_RANK": "8"}
    with pytest.raises(ValueError, match="KILN_TRAIN_MEMORY_FRACTION"):
        GovernorSettings.from_environ({"KILN_TRAIN_MEMORY_FRACTION": "1.5"})
    with pytest.raises(ValueError, match="KILN_TRAIN_TPOT_P99_SLACK"):
        GovernorSettings(tpot_p99_slack=0.0)


def test_gate_folds_the_governor_into_a_stop_check(rds: redis.Redis) -> None:
    t = FakeTime()
    serving = Serving(rds)
    serving.report(running=32, waiting=4)
    gov = governor(rds, t, tpot_p99_budget_ms=20.0, saturated_s=0.0, poll_s=1.0)
    calls = 0

    def stop_after_a_while() -> bool:  # e.g. PauseTraining arrives while the governor waits
        nonlocal calls
        calls += 1
        return calls > 3

    assert gov.gate(stop_after_a_while)() is True and gov.mode is GovernorMode.PAUSED
    assert t.slept == 2.0  # two polls, then the stop came through
    serving.report(running=0)
    t.now += 1.0
    assert gov.gate(lambda: False)() is False and gov.mode is GovernorMode.FULL


def test_state_as_prometheus_gauges(rds: redis.Redis) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from kiln_train.governor_metrics import GovernorCollector

    t = FakeTime()
    Serving(rds).report(running=4, tpot_ms=30.0)
    gov = governor(rds, t, tpot_p99_budget_ms=20.0, settle_s=0.0)
    gov.before_step()  # turned busy: the start duty
    t.now += 1.0
    gov.before_step()  # over budget: cut
    registry = CollectorRegistry()
    registry.register(GovernorCollector(gov.state))
    text = generate_latest(registry).decode()
    assert 'kiln:train_governor_mode{mode="paced"} 1.0' in text
    assert "kiln:train_governor_micro_batch 8.0" in text and "kiln:train_serving_tpot_p99_ms 30.0" in text


def test_a_new_round_takes_a_fresh_baseline_after_an_idle_window(rds: redis.Redis) -> None:
    t = FakeTime()
    serving = Serving(rds)
    gov = governor(rds, t, tpot_p99_slack=0.15)
    serving.report(running=16, tpot_ms=20.0)
    steps(gov, t, 4)
    gov.finished()
    serving.report(running=16, tpot_ms=30.0)  # heavier serving load since
    t.now += 2.0  # a short gap: the window still holds the last round's steps
    gov.before_step()
    assert gov.baseline_tpot_p99_ms == pytest.approx(20.0)
    gov.finished()
    t.now += 6.0  # longer than the 5 s window
    gov.before_step()
    assert gov.baseline_tpot_p99_ms == pytest.approx(30.0) and gov.budget_ms == pytest.approx(34.5)


def test_start_governor_reads_the_published_load(rds: redis.Redis) -> None:
    from kiln_train.governor import start_governor

    Serving(rds).report(running=3, tpot_ms=12.0)
    gov = start_governor(rds, GovernorSettings(tpot_p99_budget_ms=20.0, memory_fraction=0.3), 4)
    assert gov.before_step() == 4 and gov.state()["load"]["running"] == 3.0


def test_state_reaches_the_training_status_message(rds: redis.Redis) -> None:
    from kiln_train.servicer import _governor_to_pb

    t = FakeTime()
    Serving(rds).report(running=4, tpot_ms=30.0)
    gov = governor(rds, t, tpot_p99_budget_ms=20.0, ttft_p99_budget_ms=300.0, settle_s=0.0, start_duty=0.5)
    gov.before_step()
    t.now += 1.0
    gov.before_step()  # over the TPOT budget: cut
    status = _governor_to_pb(gov.state())
    assert status is not None and status.mode == "paced" and status.micro_batch == 8
    assert status.duty == pytest.approx(0.3) and status.budget_ms == 20.0 and status.ttft_budget_ms == 300.0
    assert status.serving_tpot_p99_ms == 30.0 and status.serving_waiting == 0
    assert _governor_to_pb({}) is None  # no governor running


def test_pause_spread_between_micro_batches_and_paced_micro_batch_capped(rds: redis.Redis) -> None:
    t = FakeTime()
    serving = Serving(rds)
    gov = governor(rds, t, tpot_p99_budget_ms=20.0, start_duty=0.25, paced_micro_batch=2)
    assert gov.before_step() == 8 and gov.mode is GovernorMode.FULL  # idle: the whole micro-batch
    t.now += 0.4
    gov.between_micro_batches()  # idle: no pause inside the step
    assert t.slept == 0.0

    serving.report(running=32, tpot_ms=19.0)  # inside the budget, within its headroom: the duty holds
    t.now += 1.0
    assert gov.before_step() == 2 and gov.duty == 0.25  # busy: 2-row micro-batches at the start duty
    for _ in range(3):  # each 0.1 s micro-batch is followed by its share of the pause: 0.1 x 0.75 / 0.25
        t.now += 0.1
        before = t.slept
        gov.between_micro_batches()
        assert t.slept - before == pytest.approx(0.3)
    t.now += 0.1
    before = t.slept
    gov.before_step()  # the step's last micro-batch is paced by the next step's start, not twice
    assert t.slept - before == pytest.approx(0.3)


def test_max_duty_caps_the_share_while_serving_is_busy(rds: redis.Redis) -> None:
    t = FakeTime()
    Serving(rds).report(running=32, tpot_ms=5.0)  # far under budget: the duty would grow to 1
    gov = governor(rds, t, tpot_p99_budget_ms=20.0, start_duty=0.5, max_duty=0.3, step_up=0.1)
    gov.before_step()
    assert gov.duty == pytest.approx(0.3)
    for _ in range(5):
        t.now += 1.0
        gov.before_step()
    assert gov.duty == pytest.approx(0.3) and gov.mode is GovernorMode.PACED


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("KILN_TRAIN_TPOT_P99_BUDGET_MS", "nan"),
        ("KILN_TRAIN_MAX_PACE_MS", "inf"),
        ("KILN_TRAIN_MAX_DUTY", "0"),
        ("KILN_TRAIN_PACED_MICRO_BATCH", "1.5"),
        ("KILN_TRAIN_PACED_MICRO_BATCH", "-2"),
    ],
)
def test_bad_governor_settings_are_refused_by_name(var: str, raw: str) -> None:
    with pytest.raises(ValueError, match=var):
        GovernorSettings.from_environ({var: raw})
    with pytest.raises(ValueError, match="KILN_TRAIN_MIN_DUTY"):
        GovernorSettings(min_duty=0.5, max_duty=0.3)


def test_a_relative_budget_waits_to_see_serving_alone_before_training(rds: redis.Redis) -> None:
    t = FakeTime()
    serving = Serving(rds)
    # busy, but no request has finished yet: no TPOT to judge by
    serving.publisher.publish({"running": 32, "waiting": 0, "kv_usage": 0.1}, LoadWindow(), 0.5)
    gov = governor(rds, t, poll_s=0.5, start_duty=0.5)  # relative budgets (the defaults)
    polls = 0

    def first_requests_finish() -> bool:
        nonlocal polls
        polls += 1
        if polls == 3:
            serving.report(running=32, tpot_ms=10.0)
        return False

    gov.before_step(should_stop=first_requests_finish)
    assert polls == 3 and gov.mode is GovernorMode.PACED and gov.baseline_tpot_p99_ms == pytest.approx(10.0)
    assert gov.budget_ms == pytest.approx(11.5) and t.slept == pytest.approx(1.5)  # three polls of 0.5 s

    t2 = FakeTime()  # serving never reports a TPOT: training starts after measure_s, at the start duty
    rds.delete(*rds.keys("kiln:load:*"))
    serving.publisher.publish({"running": 32, "waiting": 0, "kv_usage": 0.1}, LoadWindow(), 0.5)
    gov2 = governor(rds, t2, poll_s=0.5, measure_s=4.0)
    gov2.before_step(should_stop=lambda: False)
    assert gov2.mode is GovernorMode.PACED and gov2.budget_ms == 0.0 and t2.slept == pytest.approx(4.0)


def test_closed_loop_settles_inside_a_relative_budget(rds: redis.Redis) -> None:
    """Against a serving side whose TPOT p99 grows with training's duty (about what time-slicing gives: 10 ms
    alone, x (1 + duty)), the governor's duty settles where the p99 it reads stays inside its budget."""
    t = FakeTime()
    serving = Serving(rds)
    serving.report(running=32, tpot_ms=10.0)  # serving alone before the round
    gov = governor(rds, t, tpot_p99_slack=0.15, start_duty=0.5, settle_s=3.0)
    readings = []
    for _ in range(400):  # 0.1 s spans of training, paced by the governor
        gov.before_step()
        t.now += 0.1
        p99 = 10.0 * (1 + gov.duty)
        serving.report(running=32, tpot_ms=p99)
        readings.append((gov.duty, p99))
    assert gov.budget_ms == pytest.approx(11.5)
    late = readings[len(readings) // 2 :]
    assert max(p for _, p in late) <= 11.5 * 1.05  # at most a step_up's overshoot before the next cut
    assert 0.05 <= min(d for d, _ in late) and max(d for d, _ in late) <= 0.2  # and it kept training


def test_by_default_training_takes_at_most_three_tenths_while_serving_is_busy() -> None:
    """The shipped defaults hold the share measured to keep serving's p99 inside its limits on the H200."""
    cfg = GovernorSettings()
    assert cfg.start_duty <= cfg.max_duty == pytest.approx(0.3)


def test_evaluation_passes_are_paced_once_and_host_gaps_are_not(rds: redis.Redis) -> None:
    """The gate's measures and vetting passes yield to busy serving like steps; no work is paced twice."""
    t = FakeTime()
    serving = Serving(rds)
    gov = governor(rds, t, tpot_p99_budget_ms=20.0, start_duty=0.25)
    gov.before_pass()  # before any step (the gate's baseline): nothing to pace
    assert t.slept == 0.0
    serving.report(running=32, tpot_ms=19.0)
    t.now += 1.0
    gov.before_step()
    t.now += 0.1  # a 0.1 s step, then a run of three 0.05 s vetting passes
    before = t.slept
    for _ in range(3):
        gov.before_pass()
        t.now += 0.05
    # the first pass of the run paces nothing (the step before it is the next before_step's); the second
    # and third each pace the pass before them: 0.05 x 0.75 / 0.25
    assert t.slept - before == pytest.approx(2 * 0.15)
    before = t.slept
    gov.before_step()  # the step (0.1 s) and the last pass (0.05 s), not the two passes paced already
    assert t.slept - before == pytest.approx(0.15 * 3)
    t.now += 0.1
    t.now += 2.0  # staging: host work after the last step
    before = t.slept
    gov.before_pass()
    assert t.slept == before  # a gap of host work is not paced as if it were a pass
    t.now += 0.04
    gov.before_pass()
    assert t.slept - before == pytest.approx(0.04 * 3)
    gov.finished()
    t.now += 0.01
    before = t.slept
    gov.before_pass()  # after the round: no pacing until the next one starts
    assert t.slept == before
