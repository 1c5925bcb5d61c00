"""Distances between a sample cloud and reference points (compare sampler settings by a number).

Same seed, same numbers on every thread count: each sum runs in a fixed order that does not depend
on torch's threads (issue 20: `torch.cdist(...).mean()` split its reduction by thread count and
moved the energy distance's last digits between --threads 1 and 2). Pairwise distances are formed
one by one in float64 blocks (no matrix-product shortcut, whose blocking follows the threads),
each row is reduced on its own, and the row sums are added with ``math.fsum`` (exactly rounded, so
their order does not matter either).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddpmcli.errors import SamplingError

__all__ = ["cloud_distances", "energy_distance", "sliced_wasserstein"]


def _subsample(x: Tensor, max_points: int, gen: torch.Generator) -> Tensor:
    x = x.reshape(x.shape[0], -1).double()
    if x.shape[0] <= max_points:
        return x
    return x[torch.randperm(x.shape[0], generator=gen)[:max_points]]


_BLOCK_VALUES = 1 << 22  # float64 values of one block of pairwise differences (32 MiB)


def _row_chunks(rows: int, per_row: int) -> range:
    return range(0, rows, max(1, _BLOCK_VALUES // max(1, per_row)))


def _distance_sum(a: Tensor, b: Tensor) -> float:
    """sum_ij |a_i - b_j| over float64 points [n, d] and [m, d], in a fixed order."""
    total: list[float] = []
    step = _row_chunks(a.shape[0], b.shape[0]).step
    for i in range(0, a.shape[0], step):
        # each distance on its own (cdist's matrix-product mode rounds by the threads' blocking)
        block = torch.cdist(a[i : i + step], b, compute_mode="donot_use_mm_for_euclid_dist")
        total.extend(block.sum(dim=1).tolist())
    return math.fsum(total)


def energy_distance(x: Tensor, y: Tensor, *, max_points: int = 2000, seed: int = 0) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo 2013) between two point
    clouds [n, ...] and [m, ...], flattened per point; within-cloud means exclude the diagonal
    (the unbiased U-statistic, so it can be slightly negative for two draws of one law). Clouds
    above ``max_points`` are subsampled with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    a, b = _subsample(x, max_points, gen), _subsample(y, max_points, gen)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise SamplingError("energy distance needs at least 2 points in each cloud")
    na, nb = a.shape[0], b.shape[0]
    xy = _distance_sum(a, b) / (na * nb)
    xx = _distance_sum(a, a) / (na * (na - 1))
    yy = _distance_sum(b, b) / (nb * (nb - 1))
    return 2 * xy - xx - yy


def sliced_wasserstein(
    x: Tensor, y: Tensor, *, projections: int = 256, seed: int = 0, max_points: int = 4000
) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random unit directions of the squared
    W2 between the projected clouds (quantiles matched on a common grid; seeded directions)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = _subsample(x, max_points, gen), _subsample(y, max_points, gen)
    dirs = torch.randn(a.shape[1], projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(_project(a, dirs), dim=0)
    pb, _ = torch.sort(_project(b, dirs), dim=0)
    m = max(pa.shape[0], pb.shape[0])
    q = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    qa = pa[(q * pa.shape[0]).long().clamp(max=pa.shape[0] - 1)]
    qb = pb[(q * pb.shape[0]).long().clamp(max=pb.shape[0] - 1)]
    squares = math.fsum((qa - qb).square().sum(dim=1).tolist())
    return math.sqrt(squares / (m * projections))


def _project(x: Tensor, dirs: Tensor) -> Tensor:
    """``x @ dirs`` [n, d] x [d, p], each entry a sum over d in one fixed order (elementwise, in
    row blocks: a matrix product's blocking, and so its rounding, follows the thread count)."""
    step = _row_chunks(x.shape[0], dirs.numel()).step
    parts = [
        (x[i : i + step, :, None] * dirs[None, :, :]).sum(dim=1) for i in range(0, x.shape[0], step)
    ]
    return torch.cat(parts) if parts else x.new_zeros(0, dirs.shape[1])


def cloud_distances(samples: Tensor, reference: Tensor, *, seed: int = 0) -> dict[str, float]:
    """``{"energy_distance": ..., "sliced_w2": ...}`` between samples and reference points."""
    return {
        "energy_distance": energy_distance(samples, reference, seed=seed),
        "sliced_w2": sliced_wasserstein(samples, reference, seed=seed),
    }
