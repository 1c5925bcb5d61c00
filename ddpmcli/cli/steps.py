"""`ddpm steps CKPT`: how many steps does each sampler need? One row per (sampler, steps).

Thin: parse the lists, load the checkpoint once, call :func:`ddpmcli.api_sampling.step_sweep`,
hand the rows to the output, draw the figure and say on stderr the cheapest (sampler, steps)
under ``--target``. torch and matplotlib are imported only inside the command.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import typer

from ddpmcli import limits
from ddpmcli.choices import DtypeName, SampleSpacingName, SweepDenoiserName
from ddpmcli.cli.common import (
    NUM_SAMPLES_FLAGS,
    CheckpointArg,
    DeviceOpt,
    EvalDataOpt,
    SeedOpt,
    ThreadsOpt,
    as_flags,
    join_ranks,
    select_columns,
    use_threads,
)
from ddpmcli.cli.option_groups import (
    NO_MODEL_FLAGS,
    NO_TABLE_FLAGS,
    ModelFlags,
    TableFlags,
    model_options,
    table_options,
)
from ddpmcli.errors import UsageError
from ddpmcli.output import note


def _names(text: str) -> list[str]:
    from ddpmcli.choices import SAMPLERS

    names = [v.strip() for v in text.split(",") if v.strip()]
    for spec in names:
        name = spec.split(":")[0].strip()  # options after a colon: dpmpp-3m:dpm-form=exact
        if name not in SAMPLERS:
            raise UsageError(f"--sampler {name!r} is unknown; allowed: {', '.join(SAMPLERS)}")
    if not names:
        raise UsageError("--sampler: give at least one sampler, e.g. ddim,dpmpp-2m,unipc")
    return names


def _counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(
            f"--steps {text!r}: give comma-separated step counts, e.g. 5,10,20"
        ) from None
    if not counts or min(counts) < 1:
        raise UsageError(f"--steps {text!r}: every count must be >= 1")
    limits.check_timesteps(max(counts), "--steps")  # before any grid (or check) is built
    return counts


@model_options()
@table_options(leave_out=("t", "every"))
def steps(
    checkpoint: CheckpointArg,
    sampler: Annotated[
        str,
        typer.Option(
            "--sampler",
            help="Samplers to compare, comma-separated; each may carry solver options after "
            "colons, NAME:OPTION=VALUE (dpmpp-3m:dpm-form=exact, unipc:order=3:corrector=off, "
            "euler:s-churn=1), to compare variants side by side.",
        ),
    ] = "ddim,dpmpp-2m,unipc",
    steps: Annotated[
        str, typer.Option("--steps", help="Step counts, comma-separated.")
    ] = "5,10,20,50",
    spacing: Annotated[
        SampleSpacingName | None,
        typer.Option(
            "--spacing",
            help="The grid rule every sampler uses (one grid per count), as sample takes it. "
            "Default: sample's, the checkpoint's own (a diffusers scheduler's timestep_spacing), "
            "else trailing.",
        ),
    ] = None,
    target: Annotated[
        float | None,
        typer.Option("--target", help="RMS error to reach: the cheapest row under it is named."),
    ] = None,
    reference_steps: Annotated[
        int | None,
        typer.Option(
            "--reference-steps",
            min=2,
            help="Steps of the converged unipc reference (halved once), more than every --steps "
            "count. Default: 500, at most T on a table spacing.",
        ),
    ] = None,
    denoiser: Annotated[
        SweepDenoiserName,
        typer.Option(
            "--denoiser",
            help="What the samplers run: the checkpoint's network, or the Bayes-optimal "
            "denoiser of --data (exact E[x0|x_t], float64): the samplers' error alone.",
        ),
    ] = "checkpoint",
    data: EvalDataOpt = None,
    n: Annotated[int, typer.Option(*NUM_SAMPLES_FLAGS, min=2, help="Samples per run.")] = 256,
    seed: SeedOpt = 0,
    clip: Annotated[bool, typer.Option("--clip/--no-clip", help="Clip x0_hat.")] = False,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    device: DeviceOpt = "cpu",
    dtype: Annotated[DtypeName, typer.Option("--dtype", help="Dtype the model runs in.")] = (
        "float32"
    ),
    table: TableFlags = NO_TABLE_FLAGS,
    model_flags: ModelFlags = NO_MODEL_FLAGS,
    threads: ThreadsOpt = None,
) -> None:
    """How many steps does a sampler need? Every run starts from the same x_T (--seed).

    One row per (sampler, steps): nfe (model evaluations per sample), rms_error of the final
    samples against the reference from the same x_T and rms_error_range (over the data range's
    width; empty on a latent model, whose samples are latents of no known range),
    reference_distance (energy distance of the sample set to the reference's: the fair
    measure for stochastic samplers; an unbiased estimate, below 0 at small --n is noise),
    data_distance (to the checkpoint's reference data, vector
    data), max_log_snr_gap (largest step in lambda = log(alpha/sigma)), stochastic, wall_s. The
    reference is a converged unipc run at --reference-steps, checked by halving (its remaining
    error goes to stderr). The empirical order of each sampler (slope over its two largest
    counts) goes to stderr and to the --plot legend; with --target, the cheapest (sampler,
    steps) under it. With --denoiser optimal every run, the reference included, samples the
    exact optimal denoiser of the data (--data: a data file or gmm; default the checkpoint's
    reference samples) on the checkpoint's schedule, in float64: the rows are then the
    samplers' own error, against a converged solve of that exact ODE.

    Examples:

      ddpm steps ckpt.pt --sampler ddim,dpmpp-2m,unipc --steps 5,10,20,50 --target 0.01 --plot

      ddpm steps ckpt.pt --denoiser optimal --sampler ddim,dpmpp-2m,unipc --steps 5,10,20
    """
    table.check()
    names, counts = _names(sampler), _counts(steps)
    _check_target(target, reference_steps)
    plot_path = table.plot_path("steps")
    from ddpmcli.api_sampling import SOLVER_OPTION_NAMES, step_sweep
    from ddpmcli.run.step_sweep import SWEEP_COLUMNS, cheapest, check_lists

    with as_flags(samplers="--sampler"):  # a repeated entry: refused before the model loads
        check_lists(names, counts)

    ranks, run_device = join_ranks(device)
    model = model_flags.load(checkpoint, run_device, dtype, seed=seed)
    use_threads(threads, model, ranks)
    limits.check_run_sizes(model.data_shape, n=n, batch_size=batch_size, one_batch_default=True)
    flags = {"samplers": "--sampler", "compare_optimal": "--denoiser optimal", "source": "--data"}
    # a sampler's own options (heun:s_churn=1) are not flags of steps: name them as options
    flags.update({k: f"the sampler option {k}" for k in SOLVER_OPTION_NAMES + ("final_sigma",)})
    with as_flags(**flags):
        result = step_sweep(
            model, names, counts, n=n, seed=seed, spacing=spacing, clip=clip,
            reference_steps=reference_steps, batch_size=batch_size, ranks=ranks,
            denoiser=denoiser, data=data,
        )  # fmt: skip
    title = f"steps {checkpoint.name} ({result.spacing})"
    table.emit(result.rows, select_columns(table.columns, list(SWEEP_COLUMNS)), title)
    if not table.quiet:
        if spacing is None:  # say which grid the default picked, as sample says its sampler
            note(f"spacing {result.spacing} (sample's default for this checkpoint; --spacing "
                 "overrides)")  # fmt: skip
        if denoiser == "optimal":
            of = data or "the checkpoint's reference samples"
            note(f"denoiser: the Bayes-optimal denoiser of {of} (exact E[x0|x_t], float64)")
        note(result.reference.describe())
        if result.orders:  # one count per sampler has no slope: no empty line
            note(", ".join(f"{k} order {v:.2f}" for k, v in result.orders.items()))
    if target is not None:
        note(_answer(cheapest(result.rows, target), target))
    if plot_path is not None and ranks.is_main:
        _plot(result, plot_path, title, target, table.quiet)


def _check_target(target: float | None, reference_steps: int | None) -> None:
    # --target nan/-1/inf ran the whole sweep and then answered nonsense; a reference count
    # past the limit was refused as '--steps must be ...', naming the wrong flag
    if target is not None and not (math.isfinite(target) and target > 0):
        raise UsageError(f"--target must be a finite RMS error > 0, got {target}")
    if reference_steps is not None and reference_steps > limits.MAX_TIMESTEPS:
        raise UsageError(
            f"--reference-steps must be between 2 and {limits.MAX_TIMESTEPS}, got {reference_steps}"
        )


def _answer(row: dict[str, Any] | None, target: float) -> str:
    if row is None:
        return f"no sampler reached RMS error {target:g} at these steps; try more --steps"
    return (
        f"cheapest under RMS error {target:g}: {row['sampler']} at {row['steps']} steps "
        f"({row['nfe']} model evaluations, error {row['rms_error']:.3g})"
    )


def _plot(result: Any, path: Any, title: str, target: float | None, quiet: bool) -> None:
    from ddpmcli.plotting.steps import plot_steps

    written = plot_steps(
        result.rows, result.orders, path, title=title, target=target,
        reference=result.reference.describe(),
    )  # fmt: skip
    if not quiet:
        note(f"wrote {written}")


def register(app: typer.Typer) -> None:
    app.command("steps")(steps)
