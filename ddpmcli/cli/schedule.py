"""`ddpm schedule`, `ddpm compare`, `ddpm posterior`, `ddpm check`: schedules as rows and figures.

Thin commands: parse and validate the flags, build the schedule through `ddpmcli.configs` (which
calls the core), turn tensors into rows, hand them to `ddpmcli.output`. torch is imported only
inside the commands, so `ddpm --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ddpmcli.choices import DtypeName
from ddpmcli.cli.check_ckpt import (
    NO_CHECKPOINT_FLAGS,
    CheckpointArgOpt,
    CheckpointFlags,
    check_checkpoint,
    checkpoint_options,
    checkpoint_to_check,
)
from ddpmcli.cli.common import (
    FormatOpt,
    MaybePredictionTypeOpt,
    NoHeaderOpt,
    check_format_flags,
    flag_name,
    select_columns,
    select_rows,
)
from ddpmcli.cli.compare import compare
from ddpmcli.cli.option_groups import NO_TABLE_FLAGS, TableFlags, table_options
from ddpmcli.cli.schedule_options import NO_FLAGS, ScheduleFlags, schedule_options
from ddpmcli.errors import UsageError
from ddpmcli.output import emit, note, resolve_format

if TYPE_CHECKING:
    from ddpmcli.configs import BuiltSchedule
    from ddpmcli.core import Schedule

PANEL_OUTPUT = "Output"

TIMESTEP_NOTE = (
    "Timesteps are 0-based as models take them: t = 0 is one noising step, alpha_bar_prev[0] = 1, "
    "t = T-1 the last. After --steps, t indexes the kept steps and `timestep` is the model's t."
)


def _columns_of(built: BuiltSchedule) -> tuple[list[str], list[str]]:
    """(available, default) columns of a schedule table: t, timestep (respaced), the quantities."""
    from ddpmcli.core import PATH_DEFAULT_QUANTITIES, PATH_QUANTITIES, QUANTITIES

    available = ["t", "timestep", *QUANTITIES, *PATH_QUANTITIES]
    if built.schedule.path != "vp":  # README "Flows and sigma-space models": which columns
        return available, ["t", "timestep", *PATH_DEFAULT_QUANTITIES]
    default = ["t", *(["timestep"] if built.respaced else []), *QUANTITIES]
    return available, default


def schedule_rows(
    schedule: Schedule,
    indices: Sequence[int],
    columns: Sequence[str],
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per selected index: `t` (the index), `timestep` (the model's t), quantities."""
    import torch

    idx = torch.as_tensor(list(indices), dtype=torch.long)
    values: dict[str, list[Any]] = {
        "t": list(indices),
        # what the network is called with: an integer on VP, a float on other paths and on a
        # VP model's sigma grid (an Euler karras config's --steps: log-sigma interpolated t)
        "timestep": (
            schedule.timesteps if _integer_timesteps(schedule) else schedule.model_timestep
        )[idx].tolist(),
    }
    for name in columns:
        if name not in values and name not in (extra or {}):
            values[name] = schedule.quantity(name)[idx].tolist()
    rows = []
    for k in range(len(indices)):
        row = dict(extra or {})
        row.update({name: values[name][k] for name in columns if name in values})
        rows.append(row)
    return rows


def _integer_timesteps(schedule: Schedule) -> bool:
    return schedule.path == "vp" and bool(
        (schedule.model_timestep == schedule.timesteps.to(schedule.model_timestep.dtype)).all()
    )


def _plot(figure: Any, path: Path | None, quiet: bool, *args: Any) -> None:
    if path is None:
        return
    from ddpmcli.plotting.schedule import MAX_PLOT_POINTS

    steps = max((getattr(a, "num_steps", 0) for a in args), default=0)
    name = getattr(getattr(figure, "func", figure), "__name__", "")  # compare: a partial
    if steps > MAX_PLOT_POINTS and name != "plot_compare":
        note(f"the figure draws {MAX_PLOT_POINTS} of the {steps} timesteps, evenly spaced")
    written = figure(*args, path)
    if not quiet:
        note(f"wrote {written}")


# ---------------------------------------------------------------------------------------------
# ddpm schedule


@schedule_options()
@table_options()
def schedule(
    ctx: typer.Context,
    flags: ScheduleFlags,
    table: TableFlags = NO_TABLE_FLAGS,
    list_kinds: Annotated[
        bool,
        typer.Option("--list-kinds", help="List the schedule kinds, their constants, sources."),
    ] = False,
) -> None:
    """Print a schedule: one row per t with beta, alpha_bar, SNR, posterior terms.

    Timesteps are 0-based as models take them (t = 0 is one noising step, t = T-1 the last).

    Examples:

      ddpm schedule --kind cosine --every 100

      ddpm schedule --kind cosine --t 999 --columns snr --format tsv --no-header

      ddpm schedule --kind linear -T 500 --scale-to-timesteps --format csv > linear.csv

      ddpm schedule --from scheduler_config.json --steps 50 --spacing trailing

      ddpm schedule --kind scaled_linear --zero-terminal-snr --plot plots/sd_zsnr.png
    """
    from ddpmcli.configs import build_schedule

    table.check()
    if list_kinds:
        _reject_with_list_kinds(ctx)
        return _list_kinds(table.fmt, table.no_header)
    plot_path = table.plot_path("schedule")
    built = build_schedule(flags.request())
    flags.warn_respacing(built)
    available, default = _columns_of(built)
    cols = select_columns(table.columns, available, default)
    indices = select_rows(table.t, table.every, built.schedule.num_steps)
    rows = schedule_rows(built.schedule, indices, cols)
    table.emit(rows, cols, built.schedule.name)
    from ddpmcli.plotting.schedule import plot_schedule

    _plot(plot_schedule, plot_path, table.quiet, built.schedule)


def _reject_with_list_kinds(ctx: typer.Context) -> None:
    """--list-kinds prints the registry: any other option given (bar the output format ones)
    would be ignored, so it is a usage error (issue 8)."""
    ignored = [
        param.opts[0]
        for param in ctx.command.params
        if param.name not in ("list_kinds", "fmt", "no_header")
        and param.name is not None
        and _given(ctx, param.name)
    ]
    if ignored:
        raise UsageError(
            f"--list-kinds prints every kind and takes no other option but --format and "
            f"--no-header; drop {', '.join(ignored)}"
        )


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _list_kinds(fmt: str, no_header: bool) -> None:
    from ddpmcli import core

    rows: list[dict[str, Any]] = []
    for name, info in core.SCHEDULE_KINDS.items():
        defaults = " ".join(f"{k}={v:g}" for k, v in info.defaults.items())
        rows.append(
            {"kind": name, "defaults": defaults, "summary": info.summary, "source": info.source}
        )
    for alias, target in core.SCHEDULE_ALIASES.items():
        rows.append({"kind": alias, "defaults": "", "summary": f"alias of {target}", "source": ""})
    rows.append(
        {
            "kind": "custom",
            "defaults": "",
            "summary": "betas or alpha_bars from --betas-file / --alpha-bars-file",
            "source": "",
        }
    )
    kind_columns = ["kind", "defaults", "summary", "source"]
    emit(rows, kind_columns, fmt, no_header=no_header, columns_option=False)


# ---------------------------------------------------------------------------------------------
# ddpm posterior

POSTERIOR_COLUMNS: tuple[str, ...] = (
    "t",
    "timestep",
    "beta",
    "posterior_variance",
    "variance_ratio",
    "posterior_log_variance_clipped",
    "posterior_mean_coef_x0",
    "posterior_mean_coef_xt",
    "fixed_small",
    "fixed_large",
    "learned_range",
)


@schedule_options()
@table_options()
def posterior(
    flags: ScheduleFlags,
    v: Annotated[
        float,
        typer.Option(
            "--v",
            min=-1.0,
            max=1.0,
            help="Model output v in [-1, 1] for the learned_range column (0 = midway).",
        ),
    ] = 0.0,
    table: TableFlags = NO_TABLE_FLAGS,
) -> None:
    """Posterior diagnostics: beta_tilde against beta, mean coefficients, sampler variances.

    Columns: posterior_variance is beta_tilde = (1 - alpha_bar_prev)/(1 - alpha_bar) beta and
    variance_ratio = beta_tilde/beta; fixed_small, fixed_large and learned_range are the variances
    samplers use (improved-diffusion: fixed_small is beta_tilde with its t = 0 value clipped to
    beta_tilde[1], fixed_large is beta with beta_tilde[1] at t = 0, learned_range interpolates their
    logs with frac = (v + 1)/2). The prior KL(q(x_T|x0) || N(0, I)) in bits/dim for unit-variance
    data goes to stderr (stdout stays rows).

    Timesteps are 0-based as models take them (t = 0 is one noising step, t = T-1 the last).

    Examples:

      ddpm posterior --kind linear --t 0,1,487,999

      ddpm posterior --kind cosine --v 0.5 --every 100 --format csv

      ddpm posterior --kind cosine --plot plots/posterior.pdf
    """
    import math

    if not math.isfinite(v):  # click's range lets nan through: every comparison with it is false
        raise UsageError(f"--v must be a number in [-1, 1], got {v}")
    from ddpmcli.configs import build_schedule

    table.check()
    plot_path = table.plot_path("posterior")
    built = build_schedule(flags.request())
    flags.warn_respacing(built)
    sched = built.schedule
    default = [c for c in POSTERIOR_COLUMNS if c != "timestep" or built.respaced]
    available = list(POSTERIOR_COLUMNS)
    if sched.path != "vp":  # the path's own posterior; the VP columns on request
        from ddpmcli.core import PATH_QUANTITIES

        available += PATH_QUANTITIES
        default = ["t", "timestep", *PATH_QUANTITIES, "fixed_small", "fixed_large", "learned_range"]
    cols = select_columns(table.columns, available, default)
    rows = posterior_rows(sched, select_rows(table.t, table.every, sched.num_steps), cols, v)
    table.emit(rows, cols, f"{sched.name} posterior")
    if not table.quiet:
        kl = sched.prior_kl_bits_per_dim_unit_variance()
        note(f"prior KL(q(x_T|x0) || N(0,I)) = {kl!r} bits/dim for unit-variance data")
    from ddpmcli.plotting.schedule import plot_posterior

    _plot(plot_posterior, plot_path, table.quiet, sched, v)


def posterior_rows(
    schedule: Schedule, indices: Sequence[int], columns: Sequence[str], v: float
) -> list[dict[str, Any]]:
    """Rows of `ddpm posterior`: core quantities plus the samplers' variances at each index."""
    import torch

    var_values = torch.full((schedule.num_steps,), float(v), dtype=torch.float64)
    derived = {
        "variance_ratio": schedule.variance_ratio,
        "fixed_small": torch.exp(schedule.sampler_log_variance("fixed_small")),
        "fixed_large": torch.exp(schedule.sampler_log_variance("fixed_large")),
        "learned_range": torch.exp(schedule.sampler_log_variance("learned_range", var_values)),
    }
    base = [c for c in columns if c not in derived]
    rows = schedule_rows(schedule, indices, base)
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    picked = {name: derived[name][idx].tolist() for name in columns if name in derived}
    return [
        {c: picked[c][k] if c in picked else row[c] for c in columns} for k, row in enumerate(rows)
    ]


# ---------------------------------------------------------------------------------------------
# ddpm check

CHECK_COLUMNS: tuple[str, ...] = ("severity", "code", "t", "message")


@schedule_options()
@checkpoint_options()
def check(
    checkpoint: CheckpointArgOpt = None,
    flags: ScheduleFlags = NO_FLAGS,
    prediction_type: MaybePredictionTypeOpt = None,
    fmt: FormatOpt = "auto",
    no_header: NoHeaderOpt = False,
    ckpt_flags: CheckpointFlags = NO_CHECKPOINT_FLAGS,
    dtype: Annotated[
        DtypeName | None,
        typer.Option(
            "--dtype",
            help="The dtype the model runs in: its precision losses are warnings (float16's "
            "and bfloat16's are notes unless it is the one; float32's always warn).",
        ),
    ] = None,
) -> None:
    """Lint a schedule or a diffusers config for known pitfalls, one finding per line.

    Findings (severity info, warning or error): non-zero terminal SNR and its value, betas
    hitting the cap, alpha_bar not strictly decreasing, a respacing that never visits t = T-1
    (diffusers' leading; a config is probed at 50 steps), float32/float16 precision loss
    (alpha_bar rounding to 1, 1/sqrt(alpha_bar) overflowing), zero terminal SNR with epsilon
    prediction, a terminal SNR above 1 (an error: x_T is more signal than noise). Exit 1 when any
    finding is an error, else 0: it can gate a script. Column t: the timesteps a finding concerns,
    as runs (1-3,7; a table shortens long lists); in json/jsonl always a list of ints ([] for
    none).

    With a checkpoint (CKPT; --from refuses one, with a hint): its schedule as above, then probes of
    what its model does on --data (default: its reference samples, else noise), each a finding
    with a confidence: the prediction type and timestep convention that fit its outputs, its x0
    range, a latent model's VAE scaling, the sampler's start, a null label. A declared setting
    the model contradicts is an error.

    Timesteps are 0-based as models take them (t = 0 is one noising step, t = T-1 the last).

    Examples:

      ddpm check --from scheduler_config.json

      ddpm check ckpt.pt --data moons --format json

      ddpm check --kind scaled_linear --zero-terminal-snr --prediction-type v_prediction

      ddpm check --kind linear --steps 50 --spacing leading --format tsv | grep warning
    """
    from ddpmcli import core
    from ddpmcli.checks import SPAN_RUNS, lint_schedule, probe_steps, span_text
    from ddpmcli.configs import build_schedule, spacing_of

    checkpoint, flags = checkpoint_to_check(checkpoint, flags)  # --from CKPT: with a note
    if checkpoint is not None:
        return check_checkpoint(checkpoint, flags, ckpt_flags, prediction_type, fmt, no_header)
    check_format_flags(fmt, no_header)
    # --steps/--spacing/--steps-offset are probed below, not built into the schedule
    steps, spacing, steps_offset = flags.steps, flags.spacing, flags.steps_offset
    if steps is None and (spacing is not None or steps_offset is not None):
        raise UsageError("--spacing/--steps-offset need --steps")
    built = build_schedule(flags.request(respacing=False))
    sched, config = built.schedule, built.config
    pred = core.canonical_prediction_type(
        prediction_type or (config.prediction_type if config else "epsilon")
    )
    used_spacing = spacing_of(spacing, config)  # the one rule (sample's too)
    respaced = None
    if steps is not None or config is not None:
        offset = (
            steps_offset if steps_offset is not None else (config.steps_offset if config else 0)
        )
        probe = steps or probe_steps(sched.num_steps)
        respaced = core.respaced(sched, probe, used_spacing, offset)
    findings = lint_schedule(
        sched,
        respaced=respaced,
        prediction_type=pred,
        beta_cap=_cap(sched),
        spacing=used_spacing,
        probe_spacing=steps is None,
        declared_timesteps=config.declared_timesteps if config else None,
        in_play=("float32",) if dtype is None else ("float32", dtype),
    )
    if config is not None and config.flow is not None:  # a flow: the checks of its own grid
        from ddpmcli.flow_checks import lint_built_flow

        findings = lint_built_flow(built, steps, findings, () if dtype is None else (dtype,))
    # JSON: t is always a list of ints (the timesteps concerned, [] for none); text: a span,
    # shortened only in a table
    as_list = fmt in ("json", "jsonl")
    most_runs = SPAN_RUNS if resolve_format(fmt) == "table" else None
    rows = [
        {
            "severity": f.severity,
            "code": f.code,
            "t": list(f.t) if as_list else span_text(f.t, most_runs),
            "message": f.render(flag_name),
        }
        for f in findings
    ]
    emit(rows, CHECK_COLUMNS, fmt, no_header=no_header, title=sched.name, columns_option=False)
    if any(f.severity == "error" for f in findings):
        raise typer.Exit(1)


def _cap(schedule: Schedule) -> float | None:
    """The kind's max_beta (as built), or None for kinds without a cap."""
    from ddpmcli import core

    kind = schedule.spec.get("kind")
    info = core.SCHEDULE_KINDS.get(kind) if isinstance(kind, str) else None
    if info is None or "max_beta" not in info.defaults:
        return None
    return float(schedule.spec.get("params", {}).get("max_beta", info.defaults["max_beta"]))


def register(app: typer.Typer) -> None:
    """Add schedule, compare, posterior and check to the `ddpm` app."""
    app.command("schedule")(schedule)
    app.command("compare")(compare)
    app.command("posterior")(posterior)
    app.command("check")(check)
