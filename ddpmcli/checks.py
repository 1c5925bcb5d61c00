"""Lint a schedule for known pitfalls (the library side of `ddpm check`).

Each check reads the core's float64 arrays and returns findings; nothing here prints. Severity:
``info`` (worth knowing), ``warning`` (likely to hurt samples or training), ``error`` (broken: the
command exits 1). Timesteps are 0-based as models take them (``t = T-1`` is the last).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ddpmcli.errors import name_parameters

if TYPE_CHECKING:
    from torch import Tensor

    from ddpmcli.core import Schedule

Severity = Literal["info", "warning", "error"]

# sqrt(alpha_bar_{T-1}) above this leaks visible signal into x_T (Stable Diffusion's 0.068 does;
# Lin et al. 2024); below it the terminal SNR is reported as info only.
SIGNAL_LEAK_THRESHOLD = 0.01
# A terminal SNR above 1 is an error: x_T then holds more of x0's variance (alpha_bar) than noise
# (1 - alpha_bar), so the prior N(0, I) is farther from q(x_T) than the data is from it (linear
# with T = 10 has 9.4). Between the two thresholds it is a warning.
TERMINAL_SNR_ERROR = 1.0
# diffusers' and improved-diffusion's beta cap for alpha_bar-defined schedules.
DEFAULT_BETA_CAP = 0.999
PROBE_STEPS = 50  # inference steps used to probe a config's spacing when --steps is not given


def probe_steps(num_steps: int) -> int:
    """Inference steps for the spacing probe: PROBE_STEPS, or T itself when T is smaller."""
    return min(PROBE_STEPS, num_steps)


@dataclass(frozen=True)
class Finding:
    """One line of `ddpm check`: severity, a stable code for scripts, the 0-based timesteps it
    concerns (ascending; empty when it concerns none: :func:`span_text` writes them as the table
    shows them, ``995-999`` or ``1-3,7``), and a sentence saying what and why."""

    severity: Severity
    code: str
    t: tuple[int, ...]
    message: str
    template: str = field(default="", repr=False, compare=False)
    """The message with the parameters it names as ``{fields}`` (empty: ``message`` names none)."""

    @classmethod
    def naming(cls, severity: Severity, code: str, t: tuple[int, ...], template: str) -> Finding:
        """A finding whose message names parameters (``{zero_terminal_snr}``): ``message`` shows
        them by name, :meth:`render` as the caller spells them (the CLI: flags)."""
        message = name_parameters(template, lambda name: name)
        return cls(severity, code, t, message, template)

    def render(self, name: Callable[[str], str]) -> str:
        """The message with each parameter it names shown as ``name(parameter)``."""
        return name_parameters(self.template, name) if self.template else self.message


SPAN_RUNS = 3  # runs of consecutive t written out in a span; more end in "and N more"


def _runs(ts: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for t in sorted(ts):
        if runs and t == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], t)
        else:
            runs.append((t, t))
    return runs


def span_text(ts: Sequence[int], most_runs: int | None = SPAN_RUNS) -> str:
    """Timesteps in the one span notation of `ddpm check`: runs of consecutive t as ``a-b``,
    joined by commas (``1-3,7,9-14``); past ``most_runs`` runs (None: no limit), ``... and N
    more t``."""
    runs = _runs(ts)
    shown = runs if most_runs is None or len(runs) <= most_runs else runs[: most_runs - 1]
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in shown)
    rest = sum(b - a + 1 for a, b in runs[len(shown) :])
    return f"{text} and {rest} more t" if rest else text


def _model_t(schedule: Schedule, indices: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(schedule.timesteps[i]) for i in indices)


def check_terminal_snr(schedule: Schedule) -> list[Finding]:
    """Signal left in x_T: info when negligible, a warning above SIGNAL_LEAK_THRESHOLD, an error
    above TERMINAL_SNR_ERROR (x_T is then more signal than noise)."""
    last = schedule.num_steps - 1
    snr = float(schedule.snr[last])
    leak = float(schedule.sqrt_alpha_bar[last])
    t = (int(schedule.timesteps[last]),)
    if snr == 0.0:
        return [
            Finding("info", "zero_terminal_snr", t, "terminal SNR is exactly 0: x_T is pure noise")
        ]
    value = f"terminal SNR is {snr:.6g} (sqrt(alpha_bar) = {leak:.6g})"
    if snr > TERMINAL_SNR_ERROR:
        message = (
            f"{value}, above {TERMINAL_SNR_ERROR:g}: x_T is more signal than noise, so the prior "
            "N(0, I) that sampling starts from is farther from q(x_T) than the data is; use more "
            "timesteps ({timesteps}) or larger betas"
        )
        return [Finding.naming("error", "terminal_snr_above_1", t, message)]
    message = (
        f"{value}: x_T keeps a trace of x0 that sampling from pure noise never has "
        "(Lin et al. 2024)"
    )
    if leak > SIGNAL_LEAK_THRESHOLD and schedule.path != "vp":
        # zero terminal SNR is a VP transform (refused off VP): the hint named a flag that fails
        fix = "a larger sigma_max lowers it" if schedule.path == "ve" else "s = 1 removes it"
        hint = f"{message}; {fix}"
        return [Finding("warning", "nonzero_terminal_snr", t, hint)]
    if leak > SIGNAL_LEAK_THRESHOLD:
        hint = message + "; see {zero_terminal_snr}"
        return [Finding.naming("warning", "nonzero_terminal_snr", t, hint)]
    return [Finding("info", "nonzero_terminal_snr", t, message)]


def check_beta_cap(schedule: Schedule, cap: float | None) -> list[Finding]:
    limit = DEFAULT_BETA_CAP if cap is None else cap
    zero_terminal = float(schedule.snr[-1]) == 0.0
    hits = [
        i
        for i, beta in enumerate(schedule.beta.tolist())
        if beta >= limit and not (zero_terminal and i == schedule.num_steps - 1)
    ]
    if not hits:
        return []
    ts = _model_t(schedule, hits)
    what = f"the cap max_beta = {limit:g}" if cap is not None else f"{limit:g} or more"
    return [
        Finding(
            "warning",
            "beta_cap",
            ts,
            f"{len(hits)} beta(s) reach {what}: alpha_bar there is set by the cap, not the "
            "schedule's formula",
        )
    ]


def check_monotonic(schedule: Schedule) -> list[Finding]:
    import torch

    rising = torch.nonzero(torch.diff(schedule.alpha_bar) >= 0).flatten().tolist()
    if not rising:
        return []
    i = int(rising[0]) + 1
    return [
        Finding(
            "error",
            "alpha_bar_not_decreasing",
            (int(schedule.timesteps[i]),),
            f"alpha_bar is not strictly decreasing at t = {int(schedule.timesteps[i])} "
            f"({float(schedule.alpha_bar[i - 1])!r} -> {float(schedule.alpha_bar[i])!r})",
        )
    ]


def check_respacing(schedule: Schedule, spacing: str | None, probe: bool) -> list[Finding]:
    """A respaced schedule whose last kept timestep is not T-1 starts sampling below full noise."""
    last_kept = int(schedule.timesteps[-1])
    big_t = schedule.num_train_timesteps
    if last_kept == big_t - 1:
        return []
    how = f"{spacing} spacing" if spacing else "this respacing"
    steps = f"with {schedule.num_steps} steps" + (" (probed)" if probe else "")
    return [
        Finding.naming(
            "warning",
            "respacing_skips_last_t",
            (last_kept,),
            f"{how} {steps} never visits t = {big_t - 1} (T-1): sampling starts at "
            f"t = {last_kept}, with less noise than the model was trained to remove; "
            "use {spacing} trailing",
        )
    ]


def check_precision(schedule: Schedule, dtype_name: str, in_play: bool = True) -> list[Finding]:
    """Values that a float32/float16 copy of the schedule loses: alpha_bar rounding to 1 (no noise
    added at all) or to the previous t's value, and 1/sqrt(alpha_bar) overflowing. A loss is a
    warning only where the dtype is ``in_play`` (the run uses it: a ``--dtype``, a config or
    checkpoint that says so), else an info-level note (issue 20: float16 findings warned users who
    never use float16)."""
    loss: Severity = "warning" if in_play else "info"
    import torch

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        dtype_name
    ]
    findings: list[Finding] = []
    ab = schedule.alpha_bar
    low = ab.to(dtype)
    ones = torch.nonzero(low == 1.0).flatten().tolist()
    if ones:
        findings.append(
            Finding(
                loss,
                f"{dtype_name}_alpha_bar_is_1",
                _model_t(schedule, ones),
                f"alpha_bar rounds to 1 in {dtype_name} at {len(ones)} t: there x_t = x0, "
                "sqrt(1 - alpha_bar) = 0, and no noise is added",
            )
        )
    ties = torch.nonzero((torch.diff(low.to(torch.float64)) >= 0) & (torch.diff(ab) < 0))
    ties_list = (ties.flatten() + 1).tolist()
    if ties_list:
        tied = _model_t(schedule, ties_list)
        first = int(schedule.timesteps[ties_list[0] - 1])
        together = (
            f"at the {len(tied) + 1} consecutive t {first}-{tied[-1]}"
            if len(_runs(ties_list)) == 1
            else f"at {len(tied)} t (each equal to the value at the t before it)"
        )
        findings.append(
            Finding(
                "info",
                f"{dtype_name}_alpha_bar_ties",
                tied,
                f"alpha_bar values are equal in {dtype_name} {together}: those timesteps "
                "cannot be told apart at that precision",
            )
        )
    positive = ab > 0  # a zero alpha_bar (zero terminal SNR) overflows in any precision
    overflow = positive & (
        ~torch.isfinite(schedule.sqrt_recip_alpha_bar.to(dtype))
        | ~torch.isfinite(schedule.sqrt_recipm1_alpha_bar.to(dtype))
        | (low == 0)
    )
    over = torch.nonzero(overflow).flatten().tolist()
    if over:
        findings.append(
            Finding(
                loss,
                f"{dtype_name}_recip_overflow",
                _model_t(schedule, over),
                f"1/sqrt(alpha_bar) overflows (or alpha_bar underflows to 0) in {dtype_name} at "
                f"{len(over)} t: x0 = x_t/sqrt(alpha_bar) - ... gives inf there",
            )
        )
    return findings


def check_prediction_type(schedule: Schedule, prediction_type: str) -> list[Finding]:
    if float(schedule.snr[-1]) != 0.0 or prediction_type != "epsilon":
        return []
    return [
        Finding(
            "error",
            "zero_snr_with_epsilon",
            (int(schedule.timesteps[-1]),),
            "zero terminal SNR with epsilon prediction: at t = T-1, x_t is pure noise, so "
            "predicting the noise says nothing about x0 (x0 = (x_t - eps)/0); "
            "use v_prediction (Lin et al. 2024)",
        )
    ]


def check_declared_timesteps(schedule: Schedule, declared: int | None) -> list[Finding]:
    """A config whose ``trained_betas`` length differs from its ``num_train_timesteps``: diffusers
    builds its timesteps from the one and indexes the other, so sampling breaks or skips steps."""
    if declared is None or declared == schedule.num_steps:
        return []
    return [
        Finding(
            "error",
            "trained_betas_length",
            (),
            f"trained_betas has {schedule.num_steps} values but num_train_timesteps is "
            f"{declared}: diffusers indexes one with the other (the schedule here uses the "
            f"{schedule.num_steps} betas)",
        )
    ]


def lint_schedule(
    schedule: Schedule,
    *,
    respaced: Schedule | None = None,
    prediction_type: str = "epsilon",
    beta_cap: float | None = None,
    spacing: str | None = None,
    probe_spacing: bool = False,
    dtypes: Sequence[str] = ("float32", "float16"),
    declared_timesteps: int | None = None,
    in_play: Sequence[str] = ("float32",),
) -> list[Finding]:
    """Every check, in a fixed order, on the training ``schedule``; the respacing check on
    ``respaced`` (the inference steps a sampler would take), when given; ``declared_timesteps``
    is a config's ``num_train_timesteps``, checked against the schedule's length; ``in_play``:
    the dtypes the run uses (a precision loss in any other dtype is a note, not a warning)."""
    findings = [
        *check_declared_timesteps(schedule, declared_timesteps),
        *check_monotonic(schedule),
        *check_terminal_snr(schedule),
        *check_beta_cap(schedule, beta_cap),
        *(check_respacing(respaced, spacing, probe_spacing) if respaced is not None else []),
        *check_prediction_type(schedule, prediction_type),
    ]
    for dtype in dtypes:
        findings += check_precision(schedule, dtype, dtype in in_play)
    return findings


def data_outside_range(
    x: Tensor, data_range: tuple[float, float], source: str, *, training: bool = False
) -> str | None:
    """A warning when values of ``x`` (data from ``source``) lie outside ``data_range``, with
    the fraction outside, the data's own span and the fix; None when all lie inside. The
    message names the parameter ``{data_range}`` (the CLI shows ``--data-range``).
    ``training``: the range is the one a checkpoint will record (train's ``--data-range``)."""
    import torch

    lo, hi = (float(v) for v in data_range)
    source = source.replace("{", "{{").replace("}", "}}")  # a literal in the template
    values = x.detach().to("cpu", torch.float64)
    outside = float(((values < lo) | (values > hi)).double().mean())
    if outside == 0.0:
        return None
    low, high = float(values.min()), float(values.max())
    span = f"{low:.4g},{high:.4g}"
    what = (
        f"{100 * outside:.3g}% of the values of {source} lie outside "
        + ("the data range given" if training else "the model's data range")
        + f" [{lo:g}, {hi:g}] (the data span [{low:.4g}, {high:.4g}])"
    )
    if training:
        return (
            f"{what}: the checkpoint would record a range that does not hold its own data, and "
            "sampling and reconstruct clip x0_hat to it; widen {data_range} (" + span + ") or "
            "drop it to record the data's own range"
        )
    return (
        f"{what}: the model never saw such values, and x0_hat clipped to its range cannot reach "
        "them. Map the data into the range, train on the data as it is (train records its own "
        "range), or, if the checkpoint's range is wrong, pass {data_range} " + span
    )
