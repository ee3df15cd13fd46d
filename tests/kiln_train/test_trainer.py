"""Training on the shared base: no copy, weights change, vetting loss drops, the base stays untouched."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kiln_common.model_loader import ModelSource, load_state_dict, load_tokenizer
from kiln_common.weight_share import SharedWeights, attach, export_manifest, pack_state_dict
from kiln_train.base_model import build_model_over
from kiln_train.encoding import IGNORE
from kiln_train.facts import invent_fact
from kiln_train.trainer import LoraTrainer, RoundData, TextPair, TrainerConfig, encode


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """kiln-train's CPU default: one torch thread (oversubscribed OpenMP threads spin and crawl)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def exported(smollm2: ModelSource, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedWeights]:
    """kiln-infer's side: the real SmolLM2 packed into shared-memory buckets."""
    shared = pack_state_dict(
        load_state_dict(smollm2, torch.float32, "cpu"), shm_dir=tmp_path_factory.mktemp("shm")
    )
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def attached(exported: SharedWeights) -> SharedWeights:
    """kiln-train's side: the same buckets mapped through the manifest."""
    return attach(export_manifest(exported))


def test_lora_training_on_shared_weights(
    attached: SharedWeights, exported: SharedWeights, smollm2: ModelSource
) -> None:
    base = build_model_over(attached.views, smollm2.config)
    params = dict(base.named_parameters())
    for name, view in attached.views.items():
        assert params[name].data_ptr() == view.data_ptr()  # the model IS the shared memory
    bucket = exported.buckets[0]
    assert all(
        bucket.data_ptr() <= v.data_ptr() < bucket.data_ptr() + bucket.numel()
        for v in exported.views.values()
    )
    before = {n: v.clone() for n, v in list(attached.views.items())[:6]}
    tok = load_tokenizer(smollm2)
    fact = invent_fact(7)
    pairs = [encode(tok, TextPair(a, (("user", q),))) for q, a in fact.teaching()]
    cfg = TrainerConfig(min_steps=6, max_steps=6, eval_every=3, lr=1e-3, replay_fraction=0.0)
    trainer = LoraTrainer(base, tok, cfg)
    lora_before = [p.detach().clone() for p in trainer.trainable()]
    result = trainer.train(RoundData(train=pairs[:5], vetting=pairs[5:], replay=[]))
    assert result.planned_steps == 6 and result.steps == 6
    assert set(result.timings) == {
        "setup",
        "capture",
        "wait",
        "compute",
        "eval",
        "vet",
    }  # where the time went
    assert 0 < result.timings["compute"] and sum(result.timings.values()) <= result.seconds
    assert result.heldout_after < result.heldout_before - 0.5
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, trainer.trainable(), strict=True))
    passes: list[int] = []  # the governor's pacing hook runs before every evaluation pass
    trainer.workspace.before_pass = lambda: passes.append(1)
    no_answer = encode(tok, TextPair("", (("user", "Hi"),), complete=False))
    logprobs = trainer.token_logprobs([no_answer, *pairs[5:]])  # teacher-forced, one per completion token
    assert logprobs.pop(0).numel() == 0
    assert [len(lp) for lp in logprobs] == [sum(t != IGNORE for t in p.labels) for p in pairs[5:]]
    mean_nll = -float(torch.cat(logprobs).sum()) / sum(len(lp) for lp in logprobs)
    assert mean_nll == pytest.approx(trainer.loss(pairs[5:]), rel=1e-4)
    assert len(passes) == 2 * -(-len(pairs[5:]) // trainer.eval_batch)  # token_logprobs', then loss's
    released = trainer.release()
    for n, v in before.items():
        assert torch.equal(attached.views[n], v)  # the frozen base is untouched
    assert (
        dict(released.named_parameters())["model.norm.weight"].data_ptr()
        == attached.views["model.norm.weight"].data_ptr()
    )
