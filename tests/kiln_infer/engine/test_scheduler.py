"""Scheduler and block manager on their own: token budget, chunking, fairness, preemption, ref counts."""

from __future__ import annotations

import torch

from kiln_infer.engine.block_manager import BlockManager
from kiln_infer.engine.config import EngineConfig
from kiln_infer.engine.scheduler import Scheduler
from kiln_infer.engine.sequence import Sequence, SequenceStatus
from kiln_infer.engine.types import AdapterRef, EngineRequest, SamplingParams
from kiln_infer.kernels.backend import TORCH_KERNELS
from kiln_infer.lora.adapter_manager import AdapterManager
from kiln_infer.lora.layers import LoraSlots
from kiln_infer.lora.peft_loader import LoraWeights

_arrivals = iter(range(10**6))


def make_seq(
    n_prompt: int, adapter: str | None = None, first_token: int = 1, background: bool = False
) -> Sequence:
    """A sequence with a prompt of `n_prompt` tokens (optionally on an empty adapter, or background)."""
    ref = AdapterRef(adapter, path=None) if adapter else None  # type: ignore[arg-type]
    request = EngineRequest(
        f"r{first_token}-{n_prompt}-{adapter}-{background}",
        list(range(first_token, first_token + n_prompt)),
        SamplingParams(),
        adapter=ref,
        background=background,
    )
    lora = LoraWeights(adapter, 1, {}, {}) if adapter else None
    return Sequence(request=request, seed=0, arrival=next(_arrivals), lora=lora)


def make_scheduler(num_blocks: int = 32, **kw: object) -> Scheduler:
    """A scheduler over a fresh block manager and two LoRA slots."""
    config = EngineConfig(block_size=4, num_kv_blocks=num_blocks, max_model_len=64, **kw)  # type: ignore[arg-type]
    slots = LoraSlots(1, {"q_proj": (4, 4)}, 2, 1, torch.float32, torch.device("cpu"), TORCH_KERNELS)
    return Scheduler(config, BlockManager(num_blocks, 4, True), AdapterManager(slots, 4))


def run_step(scheduler: Scheduler) -> list[tuple[Sequence, int]]:
    """Schedule, pretend the model ran, append token 0 to each sampling sequence."""
    batch = scheduler.schedule()
    for item in batch:
        item.seq.num_computed_tokens += item.num_tokens
        scheduler.blocks.register_computed(item.seq)
        if item.samples:
            item.seq.token_ids.append(0)
    return [(item.seq, item.num_tokens) for item in batch]


def test_token_budget_chunks_long_prompt_without_stalling_decodes() -> None:
    s = make_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    short = make_seq(3)
    s.add(short)
    assert run_step(s) == [(short, 3)]
    long = make_seq(20, first_token=100)
    s.add(long)
    for chunk in (7, 7, 6):  # the decode always gets its token; the prompt fills the rest of the budget
        assert run_step(s) == [(short, 1), (long, chunk)]
    assert long.num_computed_tokens == 20 and len(long.token_ids) == 21  # sampled after its last chunk


def test_round_robin_across_adapters() -> None:
    s = make_scheduler(max_num_batched_tokens=64, max_num_seqs=3)
    for i in range(4):
        s.add(make_seq(2, "busy", first_token=10 * i))
    quiet = make_seq(2, "quiet")
    s.add(quiet)
    admitted = [seq for seq, _ in run_step(s)]
    assert quiet in admitted  # not stuck behind the busy adapter's queue


def test_background_requests_wait_for_users_and_are_preempted_first() -> None:
    s = make_scheduler(num_blocks=16, max_num_batched_tokens=64, max_num_seqs=2)
    early = [make_seq(4, first_token=10 * i, background=True) for i in range(3)]  # a round's burst, first
    for seq in early:
        s.add(seq)
    user = make_seq(4, first_token=100)  # a user's request arrives after it, on the same (base) queue
    s.add(user)
    admitted = [seq for seq, _ in run_step(s)]
    assert admitted == [user, early[0]]  # the user goes first; a background one takes the seat left
    later = make_seq(4, first_token=200)
    s.add(later)
    s.finish(user)
    admitted = [seq for seq, _ in run_step(s)]
    assert later in admitted and early[1] not in admitted  # still waiting behind every user
    s.finish(later)
    assert early[1] in [seq for seq, _ in run_step(s)]  # no user waits: the burst goes on
    # out of blocks: the background sequence is preempted before any user's, however old it is
    s = make_scheduler(num_blocks=16, max_num_batched_tokens=64)
    old_background, user = make_seq(32, background=True), make_seq(32, first_token=300)
    s.add(old_background)
    s.add(user)
    run_step(s)
    run_step(s)
    assert old_background.status == SequenceStatus.WAITING and user.status == SequenceStatus.RUNNING


def test_background_requests_run_no_more_than_their_cap_while_users_are_admitted() -> None:
    s = make_scheduler(num_blocks=64, max_num_batched_tokens=256, max_num_seqs=8, max_background_seqs=2)
    burst = [make_seq(4, first_token=10 * i, background=True) for i in range(5)]  # a gate's questions
    for seq in burst:
        s.add(seq)
    assert [seq for seq, _ in run_step(s)] == burst[:2]  # room for 8, but 2 background at most
    users = [make_seq(4, first_token=100 + 10 * i) for i in range(4)]
    for seq in users:
        s.add(seq)
    admitted = [seq for seq, _ in run_step(s)]
    assert all(u in admitted for u in users) and not any(b in admitted for b in burst[2:])
    s.finish(burst[0])
    admitted = [seq for seq, _ in run_step(s)]
    assert burst[2] in admitted and burst[3] not in admitted  # one ended: one more starts
    assert sum(seq.background for seq in s.running) == 2


def test_preemption_frees_and_requeues_newest() -> None:
    s = make_scheduler(num_blocks=16, max_num_batched_tokens=64)
    old, new = make_seq(32), make_seq(32, first_token=200)
    s.add(old)
    s.add(new)
    run_step(s)  # both prefilled: 8 + 8 blocks, none left
    assert s.blocks.num_free == 0
    run_step(s)  # `old` needs a ninth block: `new` is preempted
    assert s.num_preemptions >= 1 and new.status == SequenceStatus.WAITING and not new.block_table
    assert old.status == SequenceStatus.RUNNING


def test_prefix_blocks_are_shared_with_ref_counts() -> None:
    s = make_scheduler()
    a, b = make_seq(13), make_seq(13)
    s.add(a)
    run_step(s)
    s.add(b)
    run_step(s)
    shared = a.block_table[:3]
    assert b.block_table[:3] == shared and all(s.blocks.blocks[i].ref_count == 2 for i in shared)
    assert b.num_computed_tokens == 13  # 12 from the cache + the last prompt token
    s.finish(a)
    s.finish(b)
    assert s.blocks.num_free == s.blocks.num_blocks
