"""The torch core of ddpm: every noise schedule, the forward process, the posterior, the
conversions between predictions and the terms of the variational bound, in float64.

Index convention (diffusers and improved-diffusion): timesteps are 0-based as the models take them.
``t = 0`` is one noising step, ``alpha_bar_prev[0] = 1``; the paper's step is ``t + 1``.

Modules, each importing torch and the standard library only (never printing, never touching files):

- :mod:`~ddpmcli.core.kinds`: the registry of schedule kinds and their stable constructors;
- :mod:`~ddpmcli.core.schedule`: :class:`Schedule`, every per-t array as a stored field, and
  :func:`extract`;
- :mod:`~ddpmcli.core.assemble`: every array of a schedule from a kind's stable parts, and the
  schedules of explicit betas or alpha_bars;
- :mod:`~ddpmcli.core.path_kinds`, :mod:`~ddpmcli.core.paths`: Gaussian paths other than VP
  (rectified flow, sigma space), their kinds and :func:`schedule_from_path`;
- :mod:`~ddpmcli.core.transforms`: zero terminal SNR, log-SNR shift, respacing, and
  :func:`make_schedule` / :func:`schedule_from_spec` that apply them;
- :mod:`~ddpmcli.core.likelihood`: the Gaussian KL, the decoders of x0 and :func:`vb_terms`;
- :mod:`~ddpmcli.core.thresholding`: :func:`dynamic_threshold` of a predicted x0.

``from ddpmcli import core`` keeps every name it has always had.
"""

from __future__ import annotations

from ddpmcli.core.assemble import schedule_from_alpha_bars, schedule_from_betas
from ddpmcli.core.kinds import (
    F64,
    PREDICTION_ALIASES,
    PREDICTION_TYPES,
    SCHEDULE_ALIASES,
    SCHEDULE_KINDS,
    SPACINGS,
    VARIANCE_TYPES,
    KindInfo,
    Params,
    canonical_kind,
    canonical_prediction_type,
)
from ddpmcli.core.likelihood import (
    DECODERS,
    approx_standard_normal_cdf,
    continuous_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood_tanh,
    normal_kl,
    vb_terms,
)
from ddpmcli.core.path_kinds import PATHS
from ddpmcli.core.paths import flow_shift_factor, schedule_from_path
from ddpmcli.core.schedule import (
    PATH_DEFAULT_QUANTITIES,
    PATH_QUANTITIES,
    QUANTITIES,
    Schedule,
    extract,
)
from ddpmcli.core.thresholding import DEFAULT_THRESHOLD_PERCENTILE, dynamic_threshold
from ddpmcli.core.transforms import (
    make_schedule,
    rescale_zero_terminal_snr,
    respace,
    respaced,
    respaced_timesteps,
    schedule_from_spec,
    shift_logsnr,
)

__all__ = [
    "DECODERS",
    "DEFAULT_THRESHOLD_PERCENTILE",
    "F64",
    "PREDICTION_ALIASES",
    "PATHS",
    "PATH_DEFAULT_QUANTITIES",
    "PATH_QUANTITIES",
    "PREDICTION_TYPES",
    "QUANTITIES",
    "SCHEDULE_ALIASES",
    "SCHEDULE_KINDS",
    "SPACINGS",
    "VARIANCE_TYPES",
    "KindInfo",
    "Params",
    "Schedule",
    "canonical_kind",
    "canonical_prediction_type",
    "approx_standard_normal_cdf",
    "continuous_gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood_tanh",
    "dynamic_threshold",
    "extract",
    "flow_shift_factor",
    "make_schedule",
    "normal_kl",
    "rescale_zero_terminal_snr",
    "respace",
    "respaced",
    "respaced_timesteps",
    "schedule_from_alpha_bars",
    "schedule_from_betas",
    "schedule_from_path",
    "schedule_from_spec",
    "shift_logsnr",
    "vb_terms",
]
