"""Chunk sizes fitted to the model and the machine, by measuring the run itself.

A fixed guess at the model's activations cannot fit both a 2-D MLP (where packing thousands of
(sample, t) pairs into one call is several times faster) and a CIFAR-10-size UNet (where one call
of 80 images is slower than five calls of 16, and needs 1.6x the memory). So the loops start at
the batch a plain per-timestep loop would use, ``n`` samples, and grow the chunk only while
(a) the measured time per pair falls by more than a few percent and (b) the extra activations stay
inside a small memory allowance. Every timed chunk is real work: the calibration costs nothing.
The numbers of every loop here are independent of the chunk (counter-based noise), so adapting it
never changes a result.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from ddpmcli.errors import UsageError

__all__ = ["EXTRA_MEMORY", "AdaptiveChunks", "chunk_cap"]

# activations allowed beyond what a per-timestep loop over n samples would hold, on CPU/MPS.
EXTRA_MEMORY = 32 * 2**20
_ACTIVATION_FACTOR = 256  # activations per input value for the small UNets here (a guess: capped)
_MAX_CHUNK = 4096


def chunk_cap(
    numel_per_item: int,
    per_step: int,
    total: int,
    *,
    device: torch.device | str = "cpu",
    bytes_per_element: int = 4,
) -> int:
    """The largest chunk allowed: ``per_step`` (the batch of a plain loop over t, so never
    hungrier than it), or more when that many items' estimated activations
    (``numel x bytes x 256``) fit in :data:`EXTRA_MEMORY` (a quarter of the free memory on
    CUDA). Within ``[1, min(total, 4096)]``."""
    dev = torch.device(device)
    budget = EXTRA_MEMORY
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        budget = max(budget, free // 4)
    per_item = max(1, numel_per_item) * bytes_per_element * _ACTIVATION_FACTOR
    return max(1, min(total, _MAX_CHUNK, max(per_step, budget // per_item)))


class AdaptiveChunks:
    """``(start, stop)`` ranges over ``0 .. total``, their size fitted while iterating.

    The first chunk has ``start`` items and is a warm-up (first calls pay one-off costs); the
    second is timed at ``start``; then the size doubles (up to ``cap``) as long as the time per
    item of the new size is more than ``tolerance`` below the previous one, and settles on the
    smallest size within ``tolerance`` of the best seen. The time of a chunk is the wall time
    from handing out its range to the request for the next one: the caller's whole loop body.
    ``chunk`` is the settled (or current) size.
    """

    def __init__(self, total: int, *, start: int, cap: int, tolerance: float = 0.05) -> None:
        if start < 1 or cap < 1:
            raise UsageError(f"chunk sizes must be at least 1, got start {start}, cap {cap}")
        self.total = int(total)
        self.cap = max(1, min(int(cap), max(1, self.total)))
        self.chunk = min(int(start), self.cap)
        self.tolerance = float(tolerance)
        self.trials: list[tuple[int, float]] = []  # (size, seconds per item) of timed chunks

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pos, warm, settled = 0, False, self.chunk >= self.cap
        best: tuple[int, float] | None = None
        while pos < self.total:
            size = min(self.chunk, self.total - pos)
            began = time.perf_counter()
            yield pos, pos + size
            per_item = (time.perf_counter() - began) / size
            pos += size
            if settled or size < self.chunk:
                continue
            if not warm:  # the first chunk pays for lazy initialisation: not a fair sample
                warm = True
                continue
            self.trials.append((size, per_item))
            if best is not None and per_item > best[1] * (1.0 - self.tolerance):
                settled = True  # no real gain from the larger size: keep the smaller one
                self.chunk = best[0]
                continue
            best = (size, per_item)
            if self.chunk >= self.cap:
                settled = True
            else:
                self.chunk = min(self.cap, self.chunk * 2)
