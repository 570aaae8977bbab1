"""``model.row_streams``: a minibatch's rows in groups whose recurrences run side by side.

Why: at batch 32 every timestep of cuDNN's recurrence is a product over 32 rows, a few thread blocks on
a GPU of 132 multiprocessors, and the step waits on the latency of hundreds of such dependent kernels,
not on arithmetic (README "Using a GPU"). The rows of a minibatch never meet inside the recurrence, so
groups of them can run as separate calls on separate CUDA streams, whose kernels overlap; captured in a
CUDA graph, the streams become parallel branches. Autograd runs each group's backward on the stream
its forward ran on.

On a CPU there are no streams and the groups run one after another: the same arithmetic, which is how
the tests prove the groups compute what one call computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Result = TypeVar("Result")


class RowStreams:
    """The side streams a model's row groups run on, made once per device (a CUDA graph replays the
    streams it was captured with; new ones at every step would also cost a driver call each)."""

    def __init__(self) -> None:
        self._side: dict[torch.device, list[torch.cuda.Stream]] = {}

    def __deepcopy__(self, memo: dict[int, object]) -> RowStreams:
        return RowStreams()  # a copied model (weight averaging) makes streams of its own if it needs them

    def run(self, device: torch.device, groups: int, work: Callable[[int], Result]) -> list[Result]:
        """``work(g)`` for each group ``g``, concurrently on CUDA: group 0 on the current stream, the
        others on side streams forked from it (they start after what was queued before) and joined back
        (what is queued after waits for all of them)."""
        if device.type != "cuda":
            return [work(group) for group in range(groups)]
        current = torch.cuda.current_stream(device)
        side = self._side.get(device, [])
        if len(side) < groups - 1:
            side = self._side[device] = [torch.cuda.Stream(device) for _ in range(groups - 1)]
        side = side[: groups - 1]
        for stream in side:
            stream.wait_stream(current)
        results = [work(0)]
        for group, stream in enumerate(side, start=1):
            with torch.cuda.stream(stream):
                results.append(work(group))
        for stream in side:
            current.wait_stream(stream)
        return results
