"""`ddpm check` findings for rectified-flow configs and their inference grids.

Each check compares the grid a diffusers scheduler builds (:mod:`ddpmcli.core.scheduler_grids`,
value for value) with what its settings mean, or looks at what lower precisions do to it:

- ``shift_applied_twice``: FlowMatchEulerDiscreteScheduler keeps ``sigma_min`` already shifted and
  shifts the grid between the ends again (diffusers #13243): SD3's last of 8 sigmas is 0.008929
  where one shift of 1/T gives 0.002994;
- ``dynamic_shift_without_mu`` / ``seq_len_extrapolated``: the resolution rule needs an image
  size, and outside [base_image_seq_len, max_image_seq_len] it extrapolates a line fitted inside
  (LTX-2 #291);
- ``training_shift_differs``: a shift the config records beside dynamic shifting, or one given
  as the training shift, against the shift the grid actually uses;
- ``flow_starts_at_s1``: the grid starts at s = 1, terminal SNR 0 (pure noise; the first step's
  log-SNR gap is infinite, which log-SNR solvers cannot take);
- ``{dtype}_...``: float16/bfloat16 copies of the grid: s within an ulp of 1 (alpha rounds to
  0), timesteps that collide; ``timestep_repeats``: an integer grid that repeats a timestep.

Nothing here prints; torch only inside functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ddpmcli.checks import PROBE_STEPS, Finding, Severity
from ddpmcli.errors import ScheduleError
from ddpmcli.scheduler_classes import FlowSettings, inference_grid, mu_of

if TYPE_CHECKING:
    from ddpmcli.configs import BuiltSchedule
    from ddpmcli.core.scheduler_grids import InferenceGrid

# a last sigma this much (relative) above the once-shifted one is reported as a double shift
DOUBLE_SHIFT_TOLERANCE = 1e-3
LOW_PRECISIONS: tuple[str, ...] = ("float16", "bfloat16")


def _t(grid: InferenceGrid, indices: list[int]) -> tuple[int, ...]:
    """The model timesteps (whole part) of grid positions (sampling order, 0 = first step): the
    t column of `ddpm check`, on the training scale (a flow's 1000 s)."""
    return tuple(sorted({int(grid.timesteps[i]) for i in indices}))


def check_double_shift(settings: FlowSettings, grid: InferenceGrid, steps: int) -> list[Finding]:
    """diffusers #13243: the last sigma against the static shift applied once to 1/T."""
    import torch

    from ddpmcli.core import grids

    static = not settings.dynamic and settings.shift != 1.0
    if settings.class_name != "FlowMatchEulerDiscreteScheduler" or not static or steps < 2:
        return []
    if settings.pipeline is not None or settings.conversion is not None:
        return []
    big_t = settings.num_train_timesteps
    last = float(grid.sigmas[-2])
    meant = float(
        grids.flow_shift(torch.tensor([1.0 / big_t], dtype=torch.float64), settings.shift)
    )
    if last <= meant * (1 + DOUBLE_SHIFT_TOLERANCE):
        return []
    message = (
        f"FlowMatchEulerDiscreteScheduler shifts sigma_min twice (diffusers #13243): the last "
        f"of {steps} sigmas is {last:.6g}, where shift {settings.shift:g} applied once to "
        f"1/{big_t} gives {meant:.6g} ({last / meant:.3g}x the noise left for the final step)"
    )
    return [Finding("warning", "shift_applied_twice", _t(grid, [steps - 1]), message)]


def check_dynamic_inputs(
    settings: FlowSettings, mu: float | None, seq_len: int | None
) -> list[Finding]:
    """Dynamic shifting with no mu, or a sequence length outside the fitted range."""
    if not settings.dynamic:
        return []
    if mu is None:
        return [
            Finding.naming(
                "warning",
                "dynamic_shift_without_mu",
                (),
                "use_dynamic_shifting is on but no mu is known: set_timesteps raises without "
                "one, and the grid depends on the image size; give {resolution}, "
                "{image_seq_len} or mu (--param mu=X) (the table shown is unshifted)",
            )
        ]
    lo, hi = settings.base_image_seq_len, settings.max_image_seq_len
    if seq_len is None or lo <= seq_len <= hi:
        return []
    side = "below" if seq_len < lo else "above"
    message = (
        f"image sequence length {seq_len} is {side} [base_image_seq_len, max_image_seq_len] = "
        f"[{lo}, {hi}]: mu = {mu:.6g} extrapolates the line fitted between base_shift "
        f"{settings.base_shift:g} and max_shift {settings.max_shift:g} (LTX-2 #291)"
    )
    return [Finding("warning", "seq_len_extrapolated", (), message)]


def effective_shift(settings: FlowSettings, mu: float | None) -> float | None:
    """The static-equivalent shift the grid uses: e^mu (exponential) or mu (linear) when dynamic,
    else the config's shift."""
    if not settings.dynamic:
        return settings.shift
    if mu is None:
        return None
    return math.exp(mu) if settings.time_shift_type == "exponential" else mu


def check_training_shift(
    settings: FlowSettings, mu: float | None, train_shift: float | None
) -> list[Finding]:
    """A known training shift (given, or the ``shift`` a dynamic config records but does not use)
    against the inference shift."""
    used = effective_shift(settings, mu)
    recorded = train_shift
    source = "the training shift given"
    if recorded is None and settings.dynamic and settings.shift != 1.0:
        recorded, source = settings.shift, "the config's shift (unused with dynamic shifting)"
    if used is None or recorded is None or math.isclose(used, recorded, rel_tol=0.05):
        return []
    message = (
        f"{source} is {recorded:g} but the grid is shifted by {used:.4g}"
        f"{' (e^mu, mu = ' + format(mu, '.4g') + ')' if settings.dynamic else ''}: a model "
        "trained at one shift and sampled at another spends its steps at other noise levels "
        "than it was trained to weight (diffusers #8501, Lumina-Image-2.0 #42)"
    )
    return [Finding("info", "training_shift_differs", (), message)]


def check_starts_at_one(grid: InferenceGrid) -> list[Finding]:
    if float(grid.sigmas[0]) != 1.0:
        return []
    return [
        Finding(
            "info",
            "flow_starts_at_s1",
            _t(grid, [0]),
            "the grid starts at s = 1: terminal SNR 0, x_T is pure noise (flow prediction "
            "handles it: x0 = x_t - v); the first step's log-SNR gap is infinite, which "
            "log-SNR multistep solvers (DPM-Solver, UniPC) cannot take as a step",
        )
    ]


def check_repeats(grid: InferenceGrid) -> list[Finding]:
    """An integer grid (truncated to int64, as DPM-Solver/UniPC do) that repeats a timestep."""
    values = grid.timesteps.tolist()
    repeats = [i for i in range(1, len(values)) if values[i] == values[i - 1]]
    if not repeats:
        return []
    message = (
        f"{len(repeats)} of the {len(values)} timesteps repeat the one before after "
        f"truncation to whole numbers ({grid.timestep_dtype}): those steps call the model at "
        "the same time for different noise levels"
    )
    return [Finding("warning", "timestep_repeats", _t(grid, repeats), message)]


def check_low_precision(
    grid: InferenceGrid, dtype_name: str, in_play: bool = True
) -> list[Finding]:
    """float16/bfloat16 copies of the grid: s rounding to 1 (alpha = 1 - s rounds to 0) before the
    first step, s rounding to 0, and timesteps (and the t/1000 Flux's transformer takes) that
    collide. Warnings where the dtype is ``in_play`` (a --dtype, a config or checkpoint that says
    so), else info-level notes, as :func:`ddpmcli.checks.check_precision` (issue 20)."""
    import torch

    level: Severity = "warning" if in_play else "info"

    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    findings: list[Finding] = []
    s = grid.sigmas[:-1]
    ones = [i for i, v in enumerate(s.to(dtype).tolist()) if v == 1.0 and float(s[i]) < 1.0]
    if ones:
        findings.append(
            Finding(
                level,
                f"{dtype_name}_s_rounds_to_1",
                _t(grid, ones),
                f"s rounds to 1 in {dtype_name} at {len(ones)} step(s) below 1: alpha = 1 - s "
                "is 0 there, the step sees pure noise and its x0 estimate carries no signal",
            )
        )
    zeros = [i for i, v in enumerate(s.to(dtype).tolist()) if v == 0.0 and float(s[i]) > 0.0]
    if zeros:
        findings.append(
            Finding(
                level,
                f"{dtype_name}_s_rounds_to_0",
                _t(grid, zeros),
                f"s rounds to 0 in {dtype_name} at {len(zeros)} step(s): no noise is left there "
                "and the step does nothing",
            )
        )
    exact = grid.timesteps.tolist()
    for scale, what in ((1.0, "timesteps"), (1000.0, "timesteps/1000")):
        low = (grid.timesteps / scale).to(dtype).tolist()
        hits = [i for i in range(1, len(low)) if low[i] == low[i - 1] and exact[i] != exact[i - 1]]
        if hits:
            findings.append(
                Finding(
                    level,
                    f"{dtype_name}_timesteps_collide",
                    _t(grid, hits),
                    f"{len(hits)} of the {len(low)} {what} equal the one before in "
                    f"{dtype_name}: a model called in {dtype_name} cannot tell those steps apart",
                )
            )
            break
    return findings


def lint_flow(
    settings: FlowSettings,
    *,
    steps: int | None = None,
    mu: float | None = None,
    image_seq_len: int | None = None,
    train_shift: float | None = None,
    in_play: Sequence[str] = (),
) -> list[Finding]:
    """Every flow check, on the grid of ``steps`` (PROBE_STEPS when None). ``mu`` or
    ``image_seq_len`` as for ``build_schedule``; ``train_shift``: the shift the model was
    trained with, when known; ``in_play``: the low precisions the run uses (their findings are
    warnings, the others notes)."""
    mu = mu_of(settings, mu, image_seq_len)
    findings = [
        *check_dynamic_inputs(settings, mu, image_seq_len),
        *check_training_shift(settings, mu, train_shift),
    ]
    if settings.dynamic and mu is None:
        return findings
    n = steps if steps is not None else PROBE_STEPS
    try:
        grid = inference_grid(settings, n, mu)
    except ScheduleError:  # a class whose grid ddpm does not reproduce: the settings' findings
        return findings
    findings += check_double_shift(settings, grid, n)
    findings += check_starts_at_one(grid)
    findings += check_repeats(grid)
    for dtype in LOW_PRECISIONS:
        findings += check_low_precision(grid, dtype, dtype in in_play)
    return findings


def lint_built_flow(
    built: BuiltSchedule, steps: str | None, findings: list[Finding], in_play: Sequence[str] = ()
) -> list[Finding]:
    """`ddpm check` on a flow config: the schedule findings, less the VP precision ones (a flow is
    computed as (1 - s) x0 + s eps, not from alpha_bar), plus :func:`lint_flow` on the grid of
    ``steps`` (a count) with the mu the schedule was built with."""
    config = built.config
    if config is None or config.flow is None:
        return findings
    kept = [f for f in findings if not f.code.startswith(("float32_", "float16_", "bfloat16_"))]
    count = int(steps) if steps is not None and steps.strip().isdigit() else None
    return kept + lint_flow(
        config.flow,
        steps=count,
        mu=built.mu,
        image_seq_len=built.image_seq_len,
        in_play=in_play,
    )
