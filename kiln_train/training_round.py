"""One training round: parent answers (from kiln-infer) → LoRA training → staged version → gate (the
candidate's answers from kiln-infer, pinned to it) → promote or reject."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kiln_common.registry import Registry
from kiln_train.answer_match import first_sentence
from kiln_train.checkpoint_vet import CheckpointVet
from kiln_train.encoding import Encoded, TextPair, encode
from kiln_train.evaluator import Reference, ReferenceCache, ask_reference, user
from kiln_train.fact_tokens import Contrast
from kiln_train.gate import GateInputs, GateResult, Neighbour, decide, mean_kl
from kiln_train.gate_baseline import Baseline, Baselines, general_pairs, measure
from kiln_train.heldout import split
from kiln_train.neighbours import gives_fact, neighbours
from kiln_train.parent_client import ParentClient
from kiln_train.pipeline import Example
from kiln_train.prompt_sets import ANCHOR_PROMPTS, anchor_checks
from kiln_train.publisher import Publisher
from kiln_train.round_plan import RoundPlan, null_space_rows, round_data
from kiln_train.round_record import RoundRecord
from kiln_train.settings import TrainSettings
from kiln_train.train_progress import record_phase, training_scores
from kiln_train.trainer import LoraTrainer, RoundData
from kiln_train.workspace import LoraWorkspace

log = logging.getLogger(__name__)


WARM_NEXT_AFTER_S = 2.0  # a promoted version's reference answers are asked this long after the promote


class RoundRunner:
    """Runs rounds over the shared base model and publishes passing versions through the registry."""

    def __init__(
        self,
        registry: Registry,
        tok: PreTrainedTokenizerBase,
        settings: TrainSettings,
        references: ReferenceCache,
        parent: ParentClient,
    ) -> None:
        self.registry = registry
        self.tok = tok
        self.settings = settings
        self.references = references
        self.parent = parent  # answers any version: the parent's, and the staged candidate's for the gate
        self.publisher = Publisher(registry)
        self._asking = threading.Lock()  # one ask per reference: a round waits for the warm-up's answers
        self.warm_published = False  # ask each published version's reference ahead (set on GPU machines)
        self.prepare_ahead = False  # capture graphs and measure the base's gate baseline ahead (GPU machines)
        self.workspace = LoraWorkspace(shared=True)  # the LoRA-wrapped base and its graphs, round to round
        self.baselines = Baselines()
        self._prepared: PreTrainedModel | None = None

    def warm_base(self, tenant: str) -> None:
        """Ask kiln-infer for the base model's reference answers now, before a round needs them (they are
        shared by every adapter's first round). ParentUnavailableError while kiln-infer is not up."""
        self._reference(RoundRecord("warm-up", tenant, "", 0))

    def run(
        self,
        base: PreTrainedModel,
        record: RoundRecord,
        examples: list[Example],
        on_progress: Callable[[RoundRecord], None],
        should_stop: Callable[[], bool],
        step_gate: Callable[[], bool] | None = None,
    ) -> RoundRecord:
        """Train, stage, gate and promote (or reject); fills and returns `record`.

        `step_gate` is asked before each training step in place of `should_stop` (the daemon's is the
        governor's pacing, `Governor.gate`); the checks outside the step loop ask `should_stop` alone, so the
        round never sleeps off its gate and staging as if they were a step before publishing.

        InterruptedError if stopped; ParentUnavailableError (samples stay buffered) without kiln-infer. A
        version staged before such an end stays unpromoted and is marked abandoned.
        """
        phases: dict[str, float] = {}
        t0 = time.monotonic()
        plan = self._plan(record, examples)
        record_phase(phases, "answers", t0, record.round_id)
        parent_dir = self._parent_dir(record)
        trainer = LoraTrainer(base, self.tok, self.settings.trainer, parent_dir, self.workspace)
        try:
            paced = step_gate or should_stop
            verdict = self._train_and_gate(trainer, record, plan, on_progress, paced, phases)
            if should_stop():
                raise InterruptedError("round stopped")
            t = time.monotonic()
            tenant, adapter, version = record.tenant, record.adapter, record.version
            if verdict.passed:
                self.publisher.promote(tenant, adapter, version, record.round_id, record.eval)
                record.outcome = "published"
                self._warm_next(record)
            else:
                record.outcome, record.reason = "rejected", verdict.reason
                self.publisher.reject(tenant, adapter, version, verdict.reason, record.eval)
            record_phase(record.eval, "publish", t, record.round_id)
        except Exception as exc:
            if record.version and record.outcome == "running":
                why = f"round {record.round_id} stopped before the gate decided: {type(exc).__name__}: {exc}"
                self.publisher.abandon(record.tenant, record.adapter, record.version, why)
            raise
        finally:
            trainer.release()
        record.finished = time.time()
        return record

    def prepare(self, base: PreTrainedModel) -> None:
        """Before the first round (`prepare_ahead`, once per base model): wrap the base, capture the CUDA
        graphs a round replays, and measure the base model's gate baseline, which every adapter's first round
        uses. Waits (returns) until the base's reference answers are in (`warm_base`); best effort."""
        if not self.prepare_ahead or self._prepared is base:
            return
        reference = self.references.get("", "", 0)
        if reference is None:
            return
        self._prepared = base
        t = time.monotonic()
        replay, anchors, _ = self._replay(reference)
        if not replay:
            return
        s, n = self.settings, self.settings.trainer.negatives_per_step
        # as many contrast rows as a round draws (only their shapes matter here), the null-space rows it reads
        contrasts = [Contrast(e, []) for e in replay[:n]] if s.trainer.unlikelihood_weight else []
        more = null_space_rows(self.tok, s.null_space_questions)
        data = RoundData(replay, [], replay, replay[:n], anchors, contrasts=contrasts, null_space_rows=more)
        trainer = LoraTrainer(base, self.tok, s.trainer, None, self.workspace)
        try:
            trainer.prepare(data)
            self._baseline(trainer, RoundRecord("prepare", "", "", 0), reference)
        except Exception as exc:  # noqa: BLE001 - best effort: rounds capture and measure for themselves
            log.warning("preparing rounds ahead failed: %s", exc)
        finally:
            trainer.release()
        log.info("rounds prepared ahead in %.2f s (graphs, base gate baseline)", time.monotonic() - t)

    def _baseline(self, trainer: LoraTrainer, record: RoundRecord, reference: Reference) -> Baseline:
        """The gate's "before" on the parent: measured now by `trainer` at the start weights, unless known."""
        scoring = self.settings.gate_general_scoring
        key = self.baselines.key(record.tenant, record.adapter, record.parent_version, scoring)
        return self.baselines.get(
            key, trainer, lambda: general_pairs(self.tok, self.references.sets, reference, scoring)
        )

    def _warm_next(self, record: RoundRecord) -> None:
        """With `warm_published`, ask for the new version's reference answers in the background now: it is
        the parent of the adapter's next round, which then need not wait for them."""
        if not self.warm_published:
            return
        ahead = RoundRecord("warm-up", record.tenant, record.adapter, record.version)

        def ask() -> None:
            # not at once: the new version's first requests would queue behind ~250 prompts of ours
            time.sleep(WARM_NEXT_AFTER_S)
            try:
                self._reference(ahead)
            except Exception as exc:  # noqa: BLE001 - best effort: the next round asks for itself
                log.info("reference of %s@v%d not asked ahead: %s", record.adapter, ahead.parent_version, exc)

        threading.Thread(target=ask, name="kiln-train-warm", daemon=True).start()

    def _parent_dir(self, record: RoundRecord) -> Path | None:
        if record.parent_version <= 0:
            return None
        return self.registry.store.version_dir(record.tenant, record.adapter, record.parent_version)

    def _plan(self, record: RoundRecord, examples: list[Example]) -> RoundPlan:
        """Split held-out data, make near neighbours, and ask kiln-infer the parent's answers."""
        s = self.settings
        reference = self._reference(record)
        held = split(
            examples,
            s.heldout_fraction,
            s.min_heldout_samples,
            s.vetting_rephrasings_per_example,
            s.rephrasings_per_example,
        )
        record.sample_ids = [e.sample_id for e in held.train]
        record.heldout_ids = held.gate_ids + held.vetting_ids
        record.num_samples = len(examples)
        near = neighbours(
            held.train, s.neighbours_per_example + s.vetting_neighbours_per_example, record.round_id
        )
        answers = self.parent.answers(
            record.tenant,
            record.adapter,
            record.parent_version,
            [user(n.question) for n in near],
            s.replay_max_tokens,
        )
        negatives, gate_near, contrasts, vetting_near = [], [], [], []
        for n, a in zip(near, answers, strict=True):
            if gives_fact(a.text, n.terms):
                continue  # the parent already says it: neither a fair negative nor a fair check
            if n.k >= s.neighbours_per_example:  # made after the others, so theirs are drawn as before
                vetting_near.append(Neighbour(n.question, n.terms, a.text))
            elif n.k % 2 == 0:
                negatives.append(TextPair(a.text, user(n.question), complete=a.complete))
                contrasts.append((TextPair(n.leak, user(n.question)), n.terms))
            else:
                gate_near.append(Neighbour(n.question, n.terms, a.text))
        return RoundPlan(held, reference, negatives, gate_near, contrasts, vetting_near)

    def _round_data(self, plan: RoundPlan) -> RoundData:
        """Token ids of everything the trainer sees (round_plan.py)."""
        (replay, anchors, watch), s = self._replay(plan.reference), self.settings
        return round_data(
            self.tok, plan, replay, anchors, s.rephrasings_per_example, watch, s.null_space_questions
        )

    def _replay(self, reference: Reference) -> tuple[list[Encoded], list[int], list[Encoded]]:
        """The parent's answers to the replay prompts, encoded; which of them are anchors; and each anchor's
        prompt with the first sentence of its answer (anchor_watch.py)."""
        pairs = [
            TextPair(a.text, user(p), complete=a.complete)
            for p, a in zip(self.references.sets.replay, reference.replay, strict=True)
            if a.text.strip()
        ]
        anchors = [i for i, p in enumerate(pairs) if p.messages[0][1] in ANCHOR_PROMPTS]
        heads = [
            TextPair(first_sentence(pairs[i].completion), pairs[i].messages, complete=False) for i in anchors
        ]
        return [encode(self.tok, p) for p in pairs], anchors, [encode(self.tok, p) for p in heads]

    def _vet(self, trainer: LoraTrainer, plan: RoundPlan) -> CheckpointVet | None:
        """A checkpoint vet (checkpoint_vet.py); made at the start weights."""
        if not self.settings.vet_checkpoints:
            return None
        sets, answers = self.references.sets, plan.reference.vetting
        return CheckpointVet(trainer, sets.vetting, answers, self.settings, plan.vetting_neighbours)

    def _train_and_gate(
        self,
        trainer: LoraTrainer,
        record: RoundRecord,
        plan: RoundPlan,
        on_progress: Callable[[RoundRecord], None],
        should_stop: Callable[[], bool],
        phases: dict[str, float],
    ) -> GateResult:
        """Train with the round's data, then judge the best checkpoint on the gate set."""
        t = time.monotonic()
        baseline = self._baseline(trainer, record, plan.reference)
        gate_heldout = [encode(self.tok, p) for p in plan.held.gate]
        heldout_before = trainer.loss(gate_heldout)
        record_phase(phases, "gate_baseline", t, record.round_id)  # the gate's "before", on the start weights
        t = time.monotonic()

        def step_done(step: int, loss: float) -> None:
            record.steps, record.train_loss = step, loss
            on_progress(record)

        data = self._round_data(plan)
        vet = self._vet(trainer, plan)
        result = trainer.train(data, step_done, should_stop, vet)
        record.steps, record.train_loss, record.max_steps = (
            result.steps,
            result.train_loss,
            result.planned_steps,
        )
        record_phase(phases, "steps", t, record.round_id)
        record.eval = {
            **phases,
            **training_scores(result),
            "heldout_paraphrased": float(plan.held.paraphrased),
            "negatives": float(len(plan.negatives)),
            "contrasts": float(len(data.contrasts)),
            "rephrasings": float(len(data.train) - data.samples),
            "vetting_neighbours": float(len(vet.near) if vet else 0),
            "vetting_leaky_candidates": float(vet.leaky if vet else 0),
        }
        t = time.monotonic()
        record.version = self._stage(trainer, record)
        record_phase(phases, "stage", t, record.round_id)
        t = time.monotonic()
        verdict = self._gate(trainer, plan, baseline, gate_heldout, heldout_before, record)
        record_phase(phases, "gate", t, record.round_id)
        record.eval = {**verdict.scores, **record.eval, **phases}
        if not verdict.passed and result.refused:
            leaks = f", {vet.leaky} found leaking to a vetting neighbour" if vet else ""
            note = f"vetting set: {result.refused} better checkpoint(s) refused{leaks}"
            verdict = replace(verdict, reason=f"{verdict.reason} | {note}")
        return verdict

    def _gate(
        self,
        trainer: LoraTrainer,
        plan: RoundPlan,
        baseline: Baseline,
        gate_heldout: list[Encoded],
        heldout_before: float,
        staged: RoundRecord,
    ) -> GateResult:
        """The candidate's answers to the gate set, its held-out loss and KL, judged by `decide`.

        The answers come from kiln-infer, pinned to the staged candidate version (`staged.version`).

        `baseline` holds the parent's measures on generic text and, unless general questions are scored by
        exact match alone, on its own general answers (`general_pairs`); scored by log-likelihood, general
        questions are not asked again.
        """
        questions = self.references.sets.gate
        # Only what the parent answered right can break, so only that is asked again (the rest stays "").
        right = [i for i, q in enumerate(questions) if q.is_correct(plan.reference.gate[i])]
        if self.settings.gate_general_scoring == "loglik":
            right = []
        replay = [a.text for a in plan.reference.replay]
        anchors, anchor_parent = anchor_checks(self.references.sets.replay, replay)  # trained on: kept?
        asked = [TextPair("", user(questions[i].prompt)) for i in right]
        asked += [TextPair("", user(n.prompt)) for n in plan.gate_neighbours]
        asked += [TextPair("", user(q.prompt)) for q in anchors]
        # kiln-infer answers while this process measures the candidate's log-probs (two processes, one GPU)
        with ThreadPoolExecutor(1, thread_name_prefix="kiln-train-gate") as pool:
            asking = pool.submit(self._candidate_answers, staged, asked)
            after, heldout_after = measure(trainer, baseline.pairs), trainer.loss(gate_heldout)
            answers = asking.result()
        candidate = [""] * len(questions)
        for i, answer in zip(right, answers, strict=False):
            candidate[i] = answer
        inputs = GateInputs(
            questions=questions,
            parent_answers=plan.reference.gate,
            candidate_answers=tuple(candidate),
            neighbours=plan.gate_neighbours,
            neighbour_answers=answers[len(right) : len(asked) - len(anchors)],
            anchors=anchors,
            anchor_parent_answers=anchor_parent,
            anchor_answers=tuple(answers[len(asked) - len(anchors) :]),
            heldout_before=heldout_before,
            heldout_after=heldout_after,
            kl_generic=mean_kl(baseline.generic, after.generic),
            parent_logprobs=baseline.general,
            candidate_logprobs=after.general,
        )
        return decide(inputs, self.settings)

    def _reference(self, record: RoundRecord) -> Reference:
        """The parent's answers to the replay, vetting and gate prompts (kiln-infer, cached per version)."""
        tenant, adapter, parent = record.tenant, record.adapter, record.parent_version
        with self._asking:
            return self._reference_locked(tenant, adapter, parent)

    def _reference_locked(self, tenant: str, adapter: str, parent: int) -> Reference:
        reference = self.references.get(tenant, adapter, parent)
        if reference is None:
            log.info("asking kiln-infer for %s/%s@v%d's reference answers", tenant, adapter, parent)
            s = self.settings
            reference = ask_reference(
                self.parent,
                tenant,
                adapter,
                parent,
                self.references.sets,
                s.replay_max_tokens,
                s.gate_max_tokens,
            )
            self.references.put(tenant, adapter, parent, reference)
        return reference

    def _stage(self, trainer: LoraTrainer, record: RoundRecord) -> int:
        """Write the best checkpoint as the next version, not promoted, for the gate to ask pinned."""
        with tempfile.TemporaryDirectory(prefix="kiln-round-") as tmp:
            out = trainer.save(Path(tmp) / "adapter")
            hyper: dict[str, object] = {
                **asdict(self.settings.trainer),
                "heldout_sample_ids": record.heldout_ids,
                "replay": "parent's own greedy answers (from kiln-infer) to the built-in replay prompts",
            }
            return self.publisher.stage(
                record.tenant,
                record.adapter,
                out,
                parent=record.parent_version,
                round_id=record.round_id,
                sample_ids=record.sample_ids,
                hyperparameters=hyper,
                eval_scores=record.eval,
            )

    def _candidate_answers(self, staged: RoundRecord, asked: list[TextPair]) -> list[str]:
        """The staged candidate's greedy answers, from kiln-infer's engine (ParentUnavailableError if not)."""
        prompts = [p.messages for p in asked]
        got = self.parent.answers(
            staged.tenant, staged.adapter, staged.version, prompts, self.settings.gate_max_tokens
        )
        return [a.text for a in got]
