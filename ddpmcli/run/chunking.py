"""The automatic chunk: (sample, t) pairs per model call, fitted to the data and the machine.

One fixed count cannot fit both a 2-D MLP (where packing thousands of pairs into one call is
several times faster) and a CIFAR-10-size UNet (where one call of 80 images is slower than five
calls of 16, and needs 1.6x the memory). So the chunk is the batch a plain per-timestep loop
would use, ``n`` samples, or more only while the estimated extra activations stay inside a small
memory allowance: thousands of pairs for vectors, one timestep's batch for images.

The choice is a function of the sizes alone, never of measured timings: a float32 model's output
can change in its last bits with the batch it is called at, so a timing-dependent chunk would
make two runs with the same seed print different digits.

When one timestep's batch alone is estimated to hold more activations than that allowance (large
images), the chunk is half of it (or the allowance's worth of items, if more) on the CPU and MPS,
so the sweep holds clearly less than the plain loop: its own float64 buffers and the few MB of
libtorch code its float64 schedule math pages in then fit under the loop's peak. At
google/ddpm-cifar10-32's size (``benchmarks/bench_chunk.py``, 16 images x 5 t, quiet machine,
median of 5) a chunk of 16 held 1.005x and 1.031x the diffusers loop's peak RSS in two runs (live
memory with a fixed malloc threshold: 643 MB against 633 MB); the chunk this gives, 10, held
0.85x (live 598 MB) at 1.01x the loop's time (``benchmarks/bench_chunk_time.py``, one process,
interleaved; chunk 16 1.00x, 8 0.98x). On CUDA the allowance is a quarter of the free memory and
the chunk is never below one timestep's batch.
"""

from __future__ import annotations

import torch

__all__ = ["EXTRA_MEMORY", "chunk_cap"]

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
    CUDA); off CUDA, when ``per_step`` items' activations alone exceed it, half of ``per_step``
    (rounded up) or the allowance's worth of items, whichever is more. Within
    ``[1, min(total, 4096)]``."""
    dev = torch.device(device)
    budget = EXTRA_MEMORY
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        budget = max(budget, free // 4)
    per_item = max(1, numel_per_item) * bytes_per_element * _ACTIVATION_FACTOR
    fits = budget // per_item
    floor = per_step
    if dev.type != "cuda" and fits < per_step:
        floor = max(-(-per_step // 2), fits)
    return max(1, min(total, _MAX_CHUNK, max(floor, fits)))
