"""`ddpm nll --method ode|both`: the probability-flow ODE's likelihood, alone or beside the
bound. The options, their checks (before any work) and the run; `ddpm nll` (``nll.py``) hands
over to :func:`run_ode` once the model and the data are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ddpmcli.choices import Dequantization, NllMethod, ProbeKind
from ddpmcli.cli.common import as_flags, samples_from, select_columns
from ddpmcli.errors import UsageError
from ddpmcli.output import note, progress

if TYPE_CHECKING:
    from ddpmcli.run.ode_likelihood import OdeResult, OdeSettings

MethodOpt = Annotated[
    NllMethod,
    typer.Option(
        "--method",
        help="vb: the variational bound term by term (the default); ode: the exact likelihood "
        "of the probability-flow ODE (Song et al. 2021), one row per sample with --per-sample; "
        "both: the two on the same samples, each row naming its convention.",
    ),
]
ExactDivergenceOpt = Annotated[
    bool,
    typer.Option(
        "--exact-divergence",
        help="ODE: the divergence exactly, one backward pass per data value (at most 64 "
        "values per sample: the 2-D sets), instead of Hutchinson probes.",
    ),
]
ProbesOpt = Annotated[
    int,
    typer.Option(
        "--probes",
        metavar="K",
        help="ODE: Hutchinson-Skilling probes per sample, fixed along its trajectory; their "
        "spread is the probe part of the ±.",
    ),
]
ProbeKindOpt = Annotated[
    ProbeKind, typer.Option("--probe-kind", help="ODE: the probes' distribution.")
]
RtolOpt = Annotated[
    float, typer.Option("--rtol", help="ODE: relative tolerance of the adaptive solver.")
]
AtolOpt = Annotated[
    float, typer.Option("--atol", help="ODE: absolute tolerance of the adaptive solver.")
]
MaxEvalsOpt = Annotated[
    int,
    typer.Option(
        "--max-evals",
        help="ODE: model evaluations allowed per sample; a solve that needs more stops, its "
        "row says so and the exit status is 1.",
    ),
]
OdeStepsOpt = Annotated[
    int | None,
    typer.Option(
        "--ode-steps",
        metavar="N",
        help="ODE: N equal RK4 steps (4N evaluations) instead of the adaptive solver.",
    ),
]
TEpsOpt = Annotated[
    float | None,
    typer.Option(
        "--t-eps",
        help="ODE: the model timestep where the ODE starts, the data's noise level (default: "
        "the schedule's first entry, t = 0 for DDPM: one noising step).",
    ),
]
DequantizationOpt = Annotated[
    Dequantization,
    typer.Option(
        "--dequantization",
        help="ODE: none (continuous data: a density, its bits/dim can be negative), uniform "
        "(8-bit data: u ~ U[0,1) added to each level, plus log2(256/(hi - lo)) bits/dim, 7 for "
        "[-1, 1]: score_sde's and VDM's numbers), auto (uniform for images, none otherwise).",
    ),
]


@dataclass(frozen=True)
class BoundArgs:
    """What `--method both` passes to the bound (as `ddpm nll` parsed it)."""

    indices: list[int] | None
    t_random: int | None
    variance: str
    decoder: str
    clip: bool
    pairs: int


def ode_settings(method: str, fixed_t: bool, *values: Any) -> OdeSettings | None:
    """The ODE's settings from the flags (``exact_divergence, probes, probe_kind, rtol, atol,
    max_evals, steps, t_eps, dequantization, seed, batch_size``), checked now, before the model
    loads; None for ``vb``. Bad values are one usage line naming the flag."""
    from ddpmcli.run.ode_likelihood import OdeSettings

    names = ("exact_divergence", "probes", "probe_kind", "rtol", "atol", "max_evals", "steps",
             "t_eps", "dequantization", "seed", "batch_size")  # fmt: skip
    settings = OdeSettings(**dict(zip(names, values, strict=True)))
    with as_flags(steps="--ode-steps"):
        settings.check(0)
    if method == "both" and fixed_t:
        raise UsageError("--method both compares totals: every t, or --t-random K")
    if method == "ode" and fixed_t:  # it printed the ODE's totals, --t/--every/--t-random unused
        raise UsageError(
            "--t/--every/--t-random pick the bound's rows; --method ode has none (or: both)"
        )
    idle = _ode_flags_given(settings)
    if method == "vb" and idle:  # they were ignored without a word
        raise UsageError(f"{', '.join(idle)}: ODE options; add --method ode or --method both")
    return None if method == "vb" else settings


def _ode_flags_given(settings: OdeSettings) -> list[str]:
    """The ODE flags set away from their defaults (what `--method vb` would ignore)."""
    return [
        flag for flag, value, default in (
            ("--exact-divergence", settings.exact_divergence, False),
            ("--probes", settings.probes, 1), ("--probe-kind", settings.probe_kind, "rademacher"),
            ("--rtol", settings.rtol, 1e-5), ("--atol", settings.atol, 1e-5),
            ("--max-evals", settings.max_evals, 4000), ("--ode-steps", settings.steps, None),
            ("--t-eps", settings.t_eps, None),
            ("--dequantization", settings.dequantization, "auto"),
        )
        if value != default
    ]  # fmt: skip


def _observer(bar: Any, n: int, pairs: int) -> Any:
    """Samples done: the ODE's first, then the bound's (``pairs`` evaluations a sample)."""

    def observe(event: Any) -> None:
        if event.row is None:
            done = event.done if event.loop == "ode" else n + event.done // max(pairs, 1)
            bar.update(completed=done)

    return observe


def run_ode(
    model: Any,
    picked: Any,
    ode: OdeSettings,
    what: tuple[str, BoundArgs, bool, str],
    table: Any,
    ranks: Any,
) -> None:
    """Run ``what`` = (method, the bound's arguments, per-sample rows, the checkpoint's name),
    emit the rows, then the notes (the bound's as `ddpm nll` writes it)."""
    from ddpmcli import api
    from ddpmcli.api_ode import NllComparison, OdeResult
    from ddpmcli.checkpoints.latent import space_columns
    from ddpmcli.run import RunError
    from ddpmcli.run.ode_likelihood import ODE_COLUMNS

    method, bound, per_sample, name = what
    x0 = picked.x0
    n = int(x0.shape[0])
    cols = space_columns(model, select_columns(table.columns, list(ODE_COLUMNS)))
    title = f"nll {name}"
    both = method == "both"
    try:
        with (
            progress(n * (2 if both else 1), "likelihood (samples)", table.quiet) as bar,
            as_flags(steps="--ode-steps"),
        ):
            result = api.nll(
                model, x0, seed=ode.seed, t=bound.indices, t_random=bound.t_random,
                variance=bound.variance, decoder=bound.decoder, clip=bound.clip,  # type: ignore[arg-type]
                batch_size=ode.batch_size, observers=[_observer(bar, n, bound.pairs)],
                ranks=ranks, method=method, ode=ode,  # type: ignore[arg-type]
            )  # fmt: skip
    except RunError as exc:  # the stopped samples' rows (all with --per-sample), then why
        shown = [r for r in exc.rows if per_sample or r.get("status") != "ok"]
        table.emit(shown, cols, title)
        raise
    rows = [r for r in result.rows if per_sample or r.get("sample") is None]
    table.emit(rows, cols, title)
    ode_result, vb = (
        (result.ode, result.vb) if isinstance(result, NllComparison) else (result, None)
    )
    if not isinstance(ode_result, OdeResult):  # pragma: no cover - method ode/both
        raise TypeError(type(ode_result).__name__)
    if not table.quiet:
        _ode_note(ode_result, n, picked.source)
        if vb is not None:
            from ddpmcli.cli.nll import _nll_note  # the bound's note, written once

            _nll_note(vb, vb.decoder, bound.decoder, n, picked.source)


def _ode_note(result: OdeResult, n: int, source: str) -> None:
    """The ODE total on stderr, its two ± and its convention."""
    probes = "" if result.probe_stderr is None else f" ± {result.probe_stderr:.2g} (probes)"
    if result.probe_stderr is None and "Hutchinson" in result.description:
        probes = " (one probe a sample: its spread is inside that ±; --probes 2 or more splits it)"
    spread = "" if result.total_stderr is None else f" ± {result.total_stderr:.2g} (samples)"
    evals = float(result.evals.double().mean())
    note(
        f"ode ({result.convention}): {result.total_bpd:.6g}{spread}{probes} bits/dim on "
        f"{samples_from(n, source)}, {evals:.0f} model evaluations per sample; "
        f"{result.description}"
    )
