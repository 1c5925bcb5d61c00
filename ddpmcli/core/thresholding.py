"""Thresholding of a predicted x0 (Saharia et al. 2022, section 2.3).

Imports torch and the standard library only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddpmcli.errors import ScheduleParameterError

DEFAULT_THRESHOLD_PERCENTILE = 0.995  # Saharia et al. 2022 (Imagen), section 2.3


def dynamic_threshold(
    x0: Tensor,
    percentile: float = DEFAULT_THRESHOLD_PERCENTILE,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> Tensor:
    """Dynamic thresholding of x0_hat per sample (Saharia et al. 2022, section 2.3).

    With x0 mapped to [-1, 1] by ``data_range``, s = max(quantile(|x0|, percentile), 1) over each
    sample's elements; x0 is clamped to [-s, s] and divided by s, then mapped back. s >= 1 leaves
    a sample already in range untouched.

    Args:
        x0: (B, ...) predicted clean data.
        percentile: p in (0, 1) (default 0.995, Imagen's).
        data_range: (lo, hi) with lo < hi, the data's nominal range.
    """
    if not 0 < percentile < 1:
        raise ScheduleParameterError(f"percentile must lie in (0, 1), got {percentile}")
    lo, hi = data_range
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ScheduleParameterError(f"data_range must be finite with lo < hi, got {data_range}")
    center, half = (lo + hi) / 2, (hi - lo) / 2
    z = (x0 - center) / half
    flat = z.abs().flatten(1)
    # the quantile in float32: torch.quantile takes no half-precision input, and the threshold
    # needs no more digits than that
    s = torch.quantile(flat.float(), percentile, dim=1).clamp(min=1.0).to(z.dtype)
    s = s.reshape(-1, *([1] * (z.ndim - 1)))
    z = torch.maximum(torch.minimum(z, s), -s) / s
    return z * half + center
