"""Counter-based seeded noise: every draw is a function of (seed, sample[, t]) and the shape only.

Nothing here depends on the batch size, the device, the order of the work or which other
timesteps are asked for, so a run split into chunks (or over ranks) draws the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ddpmcli.hashing import MASK64, splitmix64

__all__ = [
    "NOISE_BLOCK_VALUES",
    "SAMPLE_NOISE_VALUES",
    "generator",
    "noise_block_length",
    "pair_noise",
    "pair_seed",
    "randn",
    "sample_noise",
    "sample_noise_rows",
]


def pair_seed(seed: int, sample: int, block: int) -> int:
    """The generator seed of one noise block of ``sample``: a hash of all three, in [0, 2^64)."""
    return splitmix64(splitmix64(splitmix64(seed & MASK64) ^ sample) ^ block)


NOISE_BLOCK_VALUES = 1024  # values per generator call: amortises its ~5 us overhead, little waste


def noise_block_length(numel: int) -> int:
    """How many consecutive timesteps of one sample share a generator: up to 64, fewer for large
    samples, so that one block holds about :data:`NOISE_BLOCK_VALUES` values."""
    return max(1, min(64, NOISE_BLOCK_VALUES // max(1, numel)))


def pair_noise(
    seed: int, samples: Sequence[int], ts: Sequence[int], shape: Sequence[int]
) -> Tensor:
    """Standard normal noise ``[len(samples), *shape]``, float64 on CPU, one draw per pair
    ``(samples[j], ts[j])`` (the variational bound of ``ddpm nll`` uses it; the reconstruction
    sweep uses :func:`sample_noise`).

    The noise of ``(sample, t)`` is row ``t mod L`` of a ``[L, numel]`` block drawn by a
    generator seeded with ``pair_seed(seed, sample, t // L)``, ``L = noise_block_length(numel)``:
    it depends on ``(seed, sample, t)`` and the sample shape only, not on the batch size, the
    device, the order of the pairs or which other timesteps are asked for.
    """
    numel = math.prod(shape)
    length = noise_block_length(numel)
    out = torch.empty((len(samples), *shape), dtype=torch.float64)
    flat = out.view(len(samples), numel)
    groups: dict[tuple[int, int], list[int]] = {}
    for j, (s, t) in enumerate(zip(samples, ts, strict=True)):
        groups.setdefault((int(s), int(t) // length), []).append(j)
    gen = torch.Generator()
    for (s, b), rows in groups.items():
        gen.manual_seed(pair_seed(seed, s, b))
        block = torch.randn((length, numel), generator=gen, dtype=torch.float64)
        offsets = torch.tensor([int(ts[j]) - b * length for j in rows])
        flat[torch.tensor(rows)] = block[offsets]
    return out


SAMPLE_NOISE_VALUES = 1 << 16  # values per generator call of sample_noise
_NOISE_TAG = 0x5EED5A4D1E5  # keeps sample_noise's generator seeds apart from pair_seed's


def sample_noise_rows(numel: int) -> int:
    """How many consecutive samples share one generator in :func:`sample_noise`: about
    :data:`SAMPLE_NOISE_VALUES` values a block, between 1 and 256 samples."""
    return max(1, min(256, SAMPLE_NOISE_VALUES // max(1, numel)))


def sample_noise(seed: int, start: int, stop: int, shape: Sequence[int]) -> Tensor:
    """One standard normal noise tensor per sample, ``[stop - start, *shape]``, float64 on CPU:
    the noise ``eps_i`` of samples ``start .. stop - 1``.

    Sample ``i``'s noise is row ``i mod L`` of a ``[L, numel]`` block drawn by a generator
    seeded with a SplitMix64 hash of ``(seed, i // L)``, ``L = sample_noise_rows(numel)``: it
    depends on ``(seed, i)`` and the sample shape only (not on how many samples are drawn, the
    batch size or the device). ``ddpm reconstruct`` noises sample ``i`` with this same ``eps_i``
    at every t (common random numbers across t).
    """
    numel = math.prod(shape)
    rows = sample_noise_rows(numel)
    out = torch.empty((stop - start, numel), dtype=torch.float64)
    gen = torch.Generator()
    first = start // rows
    for block in range(first, -(-stop // rows) if stop > start else first):
        gen.manual_seed(splitmix64(splitmix64(seed & MASK64) ^ _NOISE_TAG ^ block))
        drawn = torch.randn((rows, numel), generator=gen, dtype=torch.float64)
        lo, hi = max(start, block * rows), min(stop, (block + 1) * rows)
        out[lo - start : hi - start] = drawn[lo - block * rows : hi - block * rows]
    return out.view(stop - start, *shape)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` (the CPU's where a backend has none) seeded with ``seed``."""
    try:
        gen = torch.Generator(device=device)
    except RuntimeError:  # a backend without its own generator
        gen = torch.Generator()
    return gen.manual_seed(int(seed))


def randn(
    shape: Sequence[int], gen: torch.Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise of ``shape`` on ``device`` drawn by ``gen`` (wherever ``gen`` is)."""
    if gen.device.type == device.type:
        return torch.randn(tuple(shape), generator=gen, device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=gen, dtype=dtype).to(device)
