"""The taught-facts probe's arguments and fact sets (the round itself is a long CPU run, not a test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.fact_sets import SETS, says
from benchmarks.facts_probe import parse
from kiln_train.evaluator import PromptSets


def test_arguments_name_a_set_and_default_to_one_thread() -> None:
    args = parse(["--set", "C"])
    assert (args.set, args.threads, args.cache) == ("C", 1, Path(".kiln/facts_probe"))
    assert parse(["--set", "A", "--threads", "2", "--cache", "/tmp/x"]).threads == 2
    with pytest.raises(SystemExit):
        parse(["--set", "E"])
    with pytest.raises(SystemExit):
        parse([])


def test_no_probe_question_is_in_any_of_kiln_trains_prompt_sets() -> None:
    sets = PromptSets.builtin(replay_general=100_000)  # the broad replay questions too
    known = {p.lower() for p in sets.replay} | {q.prompt.lower() for q in (*sets.vetting, *sets.gate)}
    for facts in SETS.values():
        asked = facts.held_out + facts.near_misses + facts.general
        taught = {q.lower() for q, _ in facts.taught}
        assert len(facts.held_out) == 6 and len(facts.near_misses) == 3 and len(facts.general) >= 10
        assert not {q.lower() for q, _ in asked} & (known | taught)
        # every held-out and near-miss check looks for a word of the taught answers (the fact)
        answers = " ".join(a for _, a in facts.taught)
        assert all(says(answers, w) for _, w in facts.held_out + facts.near_misses)


def test_says_matches_the_tests_check() -> None:
    assert says("It has 4 legs.", "four") and says("Mirel DASTOVA", "Dastova") and not says("Torvi", "Torvik")
