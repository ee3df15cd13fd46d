"""Taught facts, end to end on a CPU: one real round over invented facts, then the criteria asked of it.

    python -m benchmarks.facts_probe --set A|B|C [--threads 2] [--cache DIR]

Drives `RoundRunner` in-process over the embedded SmolLM2 the tests use, the way docs/training.md's eighth
and ninth series measured: the parent's answers (replay, vetting, gate, neighbours) are transformers greedy
answers of the base model (cached on disk, so a second run skips them), and the gate asks the candidate's
answers of the trainer's own weights instead of kiln-infer (the round stages nothing). Training settings
come from KILN_TRAIN_* variables, as the daemon's do (`KILN_TRAIN_UNLIKELIHOOD_WEIGHT=0 python -m ...`).

After the round the kept checkpoint answers each set's own questions greedily (48 tokens): held-out
phrasings of the taught facts (answered with the fact?), near misses (the same kind of question about
another entity: answered with the fact?), and general questions in none of kiln-train's prompt sets
(answered right by the base, wrong by the candidate?). One JSON line goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.fact_sets import SETS, FactSet, says
from kiln_common.model_loader import load_hf_model, load_tokenizer, resolve_model
from kiln_train.encoding import TextPair, prompt_ids
from kiln_train.evaluator import PromptSets, ReferenceCache, user
from kiln_train.gate import GateResult
from kiln_train.parent_client import Messages, ParentAnswer
from kiln_train.pipeline import Example
from kiln_train.prompt_sets import ANCHOR_ANSWERS, Question
from kiln_train.rephrase import question_key, rephrasings
from kiln_train.round_plan import RoundPlan
from kiln_train.round_record import RoundRecord, new_round
from kiln_train.settings import TrainSettings
from kiln_train.trainer import LoraTrainer
from kiln_train.training_round import RoundRunner

log = logging.getLogger("facts_probe")
ANSWER_TOKENS = 48  # the criteria's answers, as the taught-facts test asks them


# The anchor prompts (trained on every step, so in no gate or vetting set) with their right answers, as the
# gate's set 'anchors' checks them (kiln_train.prompt_sets.ANCHOR_ANSWERS).
ANCHORS = [Question(p, answers, "anchor") for p, answers in ANCHOR_ANSWERS.items()]


class LocalParent:
    """The base model's greedy answers by transformers (what kiln-infer would serve), cached in a JSON file."""

    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, cache: Path) -> None:
        self.model, self.tok, self.cache = model, tok, cache
        self.known: dict[str, list[Any]] = json.loads(cache.read_text()) if cache.exists() else {}

    @torch.no_grad()
    def answers(
        self, tenant: str, adapter: str, version: int, prompts: list[Messages], max_tokens: int
    ) -> list[ParentAnswer]:
        """`ParentClient.answers` for the base model (version 0) alone."""
        assert version == 0, "the probe's parent is the base model"
        keys = [json.dumps([[list(turn) for turn in m], max_tokens]) for m in prompts]
        todo = [i for i, k in enumerate(keys) if k not in self.known]
        for start in range(0, len(todo), 32):
            rows = todo[start : start + 32]
            for i, answer in zip(rows, self._generate([prompts[i] for i in rows], max_tokens), strict=True):
                self.known[keys[i]] = answer
        if todo:
            self.cache.write_text(json.dumps(self.known))
        return [ParentAnswer(*self.known[k]) for k in keys]

    def _generate(self, prompts: list[Messages], max_tokens: int) -> list[list[Any]]:
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        eos = self.tok.eos_token_id
        ids = [prompt_ids(self.tok, TextPair("", m)) for m in prompts]
        width = max(map(len, ids))
        inputs = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        out = self.model.generate(  # type: ignore[operator]
            input_ids=inputs,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        answers = []
        for row in out:
            new = row[width:].tolist()
            complete = eos in new
            new = new[: new.index(eos)] if complete else new
            answers.append([str(self.tok.decode(new, skip_special_tokens=True)).strip(), complete])
        return answers


class ProbeRunner(RoundRunner):
    """A round that stages nothing and asks the gate's candidate answers of the trainer's own weights."""

    trainer: LoraTrainer | None = None

    def _stage(self, trainer: LoraTrainer, record: RoundRecord) -> int:
        self.trainer = trainer
        return 1

    def _candidate_answers(self, staged: RoundRecord, asked: list[TextPair]) -> list[str]:
        assert self.trainer is not None, "staged first"
        return self.trainer.generate(asked, self.settings.gate_max_tokens)


def _asked(trainer: LoraTrainer, questions: list[tuple[str, str]]) -> list[str]:
    return trainer.generate([TextPair("", user(q)) for q, _ in questions], ANSWER_TOKENS)


def run(which: str, cache: Path, settings: TrainSettings) -> dict[str, Any]:
    """One round on fact set `which`; the round's numbers and the criteria, as a JSON-ready dict."""
    facts = SETS[which]
    source = resolve_model("smollm2", Path(os.environ.get("KILN_HOME") or ".kiln"))
    tok = load_tokenizer(source)
    model = load_hf_model(source)
    for p in model.parameters():
        p.requires_grad_(False)
    cache.mkdir(parents=True, exist_ok=True)
    parent = LocalParent(model, tok, cache / "parent_answers.json")  # type: ignore[arg-type]
    references = ReferenceCache(cache / "reference", "smollm2", PromptSets.builtin())
    runner = ProbeRunner(None, tok, settings, references, parent)  # type: ignore[arg-type]
    general = [q for q, _ in facts.general]
    before = [a.text for a in parent.answers("", "", 0, [user(q) for q in general], ANSWER_TOKENS)]
    right = [says(b, w) for b, (_, w) in zip(before, facts.general, strict=True)]
    anchors = [a.text for a in parent.answers("", "", 0, [user(q.prompt) for q in ANCHORS], ANSWER_TOKENS)]
    anchors_right = [q.is_correct(b) for q, b in zip(ANCHORS, anchors, strict=True)]
    examples = [
        Example(f"fact-{i}", "default", "facts", a, messages=(("user", q),))
        for i, (q, a) in enumerate(facts.taught)
    ]
    record = new_round("default", "facts", 0)
    t0 = time.monotonic()
    plan = runner._plan(record, examples)
    trainer = LoraTrainer(model, tok, settings.trainer, None, runner.workspace)  # type: ignore[arg-type]
    verdict = runner._train_and_gate(trainer, record, plan, lambda r: None, lambda: False, {})
    seconds = time.monotonic() - t0
    pairs = _pair_margins(runner, plan, trainer)
    held = _asked(trainer, facts.held_out)
    near = _asked(trainer, facts.near_misses)
    after = _asked(trainer, facts.general)
    anchors_after = _asked(trainer, [(q.prompt, "") for q in ANCHORS])
    trainer.release()
    anchors_broken = [
        (q.prompt, a)
        for q, r, a in zip(ANCHORS, anchors_right, anchors_after, strict=True)
        if r and not q.is_correct(a)
    ]
    broken = [
        (q, a) for (q, w), r, a in zip(facts.general, right, after, strict=True) if r and not says(a, w)
    ]
    log.info(
        "held-out: %s\nnear misses: %s\ngeneral broken: %s\nanchors broken: %s",
        held,
        near,
        broken,
        anchors_broken,
    )
    return _summary(which, settings, record, verdict, seconds) | {
        "held_out": f"{sum(says(a, w) for a, (_, w) in zip(held, facts.held_out, strict=True))}/{len(held)}",
        "near_misses": f"{sum(says(a, w) for a, (_, w) in zip(near, facts.near_misses, strict=True))}/{len(near)}",
        "general_broken": f"{len(broken)}/{sum(right)}",
        "pair_margins": pairs,
        "general_broken_answers": broken,
        "anchors_broken": f"{len(anchors_broken)}/{sum(anchors_right)}",
        "anchors_broken_answers": anchors_broken,
        "held_out_answers": held,
        **_held_out_unseen(plan, facts, held, settings.rephrasings_per_example),
        "near_miss_answers": near,
    }


def _held_out_unseen(plan: RoundPlan, facts: FactSet, held: list[str], per_example: int) -> dict[str, Any]:
    """Held-out questions the round trained on word for word (as a rephrasing, rephrase.py), and the score
    over the others: only those measure phrasings the round never saw. Also those that are vetting pairs
    (never trained on, but the round stopped when they said the fact)."""
    trained = {question_key(q) for q, _ in facts.taught}
    trained |= {question_key(p.messages[-1][1]) for p in rephrasings(plan.held.train, per_example)}
    unseen = [
        (a, w) for a, (q, w) in zip(held, facts.held_out, strict=True) if question_key(q) not in trained
    ]
    vetted = {question_key(p.messages[-1][1]) for p in plan.held.vetting if p.messages}
    return {
        "held_out_trained": [q for q, _ in facts.held_out if question_key(q) in trained],
        "held_out_vetted": [q for q, _ in facts.held_out if question_key(q) in vetted],
        "held_out_unseen": f"{sum(says(a, w) for a, w in unseen)}/{len(unseen)}",
    }


def _pair_margins(runner: ProbeRunner, plan: RoundPlan, trainer: LoraTrainer) -> dict[str, float]:
    """Each vetting pair's worst fact-token margin at the kept checkpoint (which pair the round waited on)."""
    data = runner._round_data(plan)
    out = {}
    for pair, e, facts in zip(plan.held.vetting, data.vetting, data.vetting_facts, strict=True):
        if facts:
            out[pair.messages[-1][1]] = round(trainer.vetting_scores([e], [facts])[1], 2)
    return out


def _summary(
    which: str, settings: TrainSettings, record: RoundRecord, verdict: GateResult, seconds: float
) -> dict[str, Any]:
    """The round's own numbers: settings, steps, the fact margin, the gate's verdict."""
    scores, cfg = record.eval, settings.trainer

    def score(key: str) -> float | None:
        return round(scores[key], 3) if key in scores else None

    return {
        "set": which,
        "unlikelihood_weight": cfg.unlikelihood_weight,
        "fact_margin": cfg.fact_margin,
        "negatives_per_step": cfg.negatives_per_step,
        "stop_step": record.steps,
        "planned_steps": record.max_steps,
        "kept_step": score("best_step"),
        "margin_before": score("vetting_fact_margin_before"),
        "margin_after": score("vetting_fact_margin_after"),
        "negatives": score("negatives"),
        "contrasts": score("contrasts"),
        "rephrasings": score("rephrasings"),
        "anchors_pinned": score("anchors_pinned"),
        "vetting_neighbours": score("vetting_neighbours"),
        "vetting_leaky_candidates": score("vetting_leaky_candidates"),
        "vetting_refused": score("vetting_refused"),
        "gate": "passed" if verdict.passed else "rejected",
        "gate_general_broken": f"{score('gate_general_broken')}/{score('gate_general_parent_correct')}",
        "gate_general_forgiven": score("gate_general_forgiven"),
        "gate_leaks": f"{score('gate_neighbour_leaks')}/{score('gate_neighbours')}",
        "kl_generic": score("kl_generic"),
        "reason": verdict.reason,
        "round_s": round(seconds),
    }


def parse(argv: list[str]) -> argparse.Namespace:
    """The probe's arguments."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.facts_probe", description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=sorted(SETS), required=True, help="which fact set to teach")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (kiln-train's default is 1)")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(".kiln/facts_probe"),
        help="where the base model's answers are kept",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    settings = TrainSettings.from_environ(
        {k: v for k, v in os.environ.items() if k.startswith("KILN_TRAIN_")}
    )
    print(json.dumps(run(args.set, args.cache, settings)), flush=True)


if __name__ == "__main__":
    main()
