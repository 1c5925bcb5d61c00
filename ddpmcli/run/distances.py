"""Distances between a sample cloud and reference points (compare sampler settings by a number)."""

from __future__ import annotations

import torch
from torch import Tensor

from ddpmcli.errors import SamplingError

__all__ = ["cloud_distances", "energy_distance", "sliced_wasserstein"]


def _subsample(x: Tensor, max_points: int, gen: torch.Generator) -> Tensor:
    x = x.reshape(x.shape[0], -1).double()
    if x.shape[0] <= max_points:
        return x
    return x[torch.randperm(x.shape[0], generator=gen)[:max_points]]


def energy_distance(x: Tensor, y: Tensor, *, max_points: int = 2000, seed: int = 0) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo 2013) between two point
    clouds [n, ...] and [m, ...], flattened per point; within-cloud means exclude the diagonal
    (the unbiased U-statistic, so it can be slightly negative for two draws of one law). Clouds
    above ``max_points`` are subsampled with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    a, b = _subsample(x, max_points, gen), _subsample(y, max_points, gen)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise SamplingError("energy distance needs at least 2 points in each cloud")
    xy = torch.cdist(a, b).mean()
    na, nb = a.shape[0], b.shape[0]
    xx = torch.cdist(a, a).sum() / (na * (na - 1))
    yy = torch.cdist(b, b).sum() / (nb * (nb - 1))
    return float(2 * xy - xx - yy)


def sliced_wasserstein(
    x: Tensor, y: Tensor, *, projections: int = 256, seed: int = 0, max_points: int = 4000
) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random unit directions of the squared
    W2 between the projected clouds (quantiles matched on a common grid; seeded directions)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = _subsample(x, max_points, gen), _subsample(y, max_points, gen)
    dirs = torch.randn(a.shape[1], projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ dirs, dim=0)
    pb, _ = torch.sort(b @ dirs, dim=0)
    m = max(pa.shape[0], pb.shape[0])
    q = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    qa = pa[(q * pa.shape[0]).long().clamp(max=pa.shape[0] - 1)]
    qb = pb[(q * pb.shape[0]).long().clamp(max=pb.shape[0] - 1)]
    return float(((qa - qb) ** 2).mean().sqrt())


def cloud_distances(samples: Tensor, reference: Tensor, *, seed: int = 0) -> dict[str, float]:
    """``{"energy_distance": ..., "sliced_w2": ...}`` between samples and reference points."""
    return {
        "energy_distance": energy_distance(samples, reference, seed=seed),
        "sliced_w2": sliced_wasserstein(samples, reference, seed=seed),
    }
