"""side_stream: a side stream's work is ordered with the current stream's; a graph captured on it replays."""

from __future__ import annotations

import pytest
import torch

from kiln_common.side_stream import side_stream

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)"
    ),
]


def test_the_block_sees_queued_work_and_the_current_stream_sees_the_block() -> None:
    device = torch.device("cuda")
    main = torch.cuda.current_stream(device)
    x = torch.zeros(1 << 22, device=device)
    x.add_(1.0)  # queued on the current stream, maybe not run yet
    with side_stream(device) as side:
        assert torch.cuda.current_stream(device) == side and side != main
        x.mul_(3.0)
    assert torch.cuda.current_stream(device) == main
    assert float(x.sum()) == 3.0 * x.numel()  # read on the current stream, after the block


def test_the_current_stream_comes_back_when_the_block_raises() -> None:
    device = torch.device("cuda")
    main = torch.cuda.current_stream(device)
    with pytest.raises(ValueError), side_stream(device):
        raise ValueError("boom")
    assert torch.cuda.current_stream(device) == main


def test_a_graph_captured_on_a_given_stream_replays() -> None:
    from kiln_train.graph_step import capture

    device = torch.device("cuda")
    x = torch.ones(64, device=device)
    stream = torch.cuda.Stream(device)
    graph, out = capture(lambda: x * 2.0, device, stream)
    x.fill_(5.0)
    graph.replay()
    torch.cuda.synchronize(device)
    assert torch.equal(out, torch.full_like(x, 10.0))
