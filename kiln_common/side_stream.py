"""A block of CUDA work on a side stream, ordered after the current stream's work and before its next."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def side_stream(device: torch.device, stream: torch.cuda.Stream | None = None) -> Iterator[torch.cuda.Stream]:
    """Run the block on `stream` (else a new one) as the current stream.

    The side stream first waits for what the current stream has queued, and the current stream then waits for
    the block, also when the block raises. Work is warmed this way before a CUDA graph capture (cuBLAS
    workspaces, the allocator's pools), and graphs are captured this way: a capture cannot run on the default
    stream.
    """
    side = stream if stream is not None else torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(side):
            yield side
    finally:
        torch.cuda.current_stream(device).wait_stream(side)
