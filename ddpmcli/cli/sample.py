"""`ddpm sample CKPT`: watch a sampler step by step.

Thin: parse and validate the flags (every path checked before any work), load the checkpoint, call
`ddpmcli.run`, hand the rows to `ddpmcli.output`. torch, numpy and matplotlib are imported
only inside the commands, so `ddpm --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ddpmcli import limits
from ddpmcli.choices import (
    DtypeName,
    SamplerName,
    SampleSpacingName,
    VarianceType,
)
from ddpmcli.cli.common import (
    NUM_SAMPLES_FLAGS,
    CheckpointArg,
    DeviceOpt,
    SeedOpt,
    ThreadsOpt,
    as_flags,
    in_panel,
    join_ranks,
    reject_conflicts,
    select_columns,
    use_threads,
    warn_respacing,
)
from ddpmcli.cli.completion import complete_data
from ddpmcli.cli.option_groups import (
    NO_MODEL_FLAGS,
    NO_TABLE_FLAGS,
    ModelFlags,
    TableFlags,
    model_options,
    table_options,
)
from ddpmcli.cli.solver_options import (
    PANEL_SOLVER,
    ChurnOpt,
    CorrectorOpt,
    DpmFormOpt,
    EulerAtFinalOpt,
    FinalSigmasOpt,
    InitOpt,
    LowerOrderFinalOpt,
    OrderOpt,
    SigmasOpt,
    SnoiseOpt,
    SolverTypeOpt,
    StochasticOpt,
    TmaxOpt,
    TminOpt,
    parse_list,
    parse_sigmas,
    read_init,
    solver_flags_of,
)
from ddpmcli.errors import UsageError
from ddpmcli.output import check_writable, note, progress

if TYPE_CHECKING:
    from ddpmcli.checkpoints import LoadedModel

PANEL_SAMPLER = "Sampler"
_sampler_option = in_panel(PANEL_SAMPLER)  # an option of the Sampler panel of the help
_FLAGS = {
    "final_sigmas_type": "--final-sigmas",
    "final_sigma": "--final-sigmas",
    "timesteps": "--timestep-list",
}
TimestepListOpt = Annotated[
    str | None,
    in_panel(PANEL_SOLVER)(
        "--timestep-list",
        metavar="T1,T2,...",
        help="Visit exactly these training timesteps (0-based, distinct, any order: run from the "
        "largest down; diffusers' custom timesteps) instead of --steps/--spacing/--sigmas.",
    ),
]


def _parse_timesteps(text: str | None, **others: str | None) -> list[int] | None:
    """``--timestep-list 999,500,0`` as ints (a usage error naming the flag otherwise, or one of
    ``others``, the grid flags it replaces, given too)."""
    reject_conflicts(
        ("--sigmas", others["sigmas"] is not None), ("--steps", others["steps"] is not None)
    )
    for flag, value in others.items():
        reject_conflicts(("--timestep-list", text is not None), (f"--{flag}", value is not None))
    return parse_list(text, "--timestep-list", int, "whole numbers", "timestep")


SAVE_SUFFIXES = (".npz", ".png")
SUMMARY_COLUMNS = (
    "sampler",
    "variance",
    "eta",
    "steps",
    "n",
    "seed",
    "sample_mean",
    "sample_std",
    "energy_distance",
    "sliced_w2",
)

VarianceOpt = Annotated[
    VarianceType | None,
    _sampler_option(
        "--variance",
        help="Reverse-process variance: fixed_small (beta_tilde), fixed_large (beta; beta_tilde_1 "
        "at t = 0, improved-diffusion), learned_range (the model's variance channel). Default: "
        "the one the checkpoint declares its trainer used (an adapter's), else fixed_small.",
        show_default=False,
    ),
]
BatchOpt = Annotated[
    int | None, typer.Option("--batch-size", help="Samples per model call (default: all).")
]
DtypeOpt = Annotated[
    DtypeName,
    typer.Option("--dtype", help="Dtype the model runs in (the schedule is float64 until used)."),
]


def _spacing(model: LoadedModel, spacing: str | None) -> tuple[str, int]:
    """The respacing of ``sample --steps`` (:func:`ddpmcli.api.sampling_spacing`)."""
    from ddpmcli.api import sampling_spacing

    return sampling_spacing(model, spacing)


def _reference_flag(
    reference: str | None, old: str | None, n: int, batch: int | None
) -> str | None:
    """--references (or the old, hidden --reference); the counts checked before loading."""
    reject_conflicts(("--references", reference is not None), ("--reference", old is not None))
    limits.check_count(n, "n")  # before loading: the one count check and message
    if batch is not None:
        limits.check_count(batch, "batch_size")
    return reference if old is None else old


def _check_save(save: Path | None) -> Path | None:
    if save is None:
        return None
    if save.suffix.lower() not in SAVE_SUFFIXES:
        raise UsageError(
            f"--save {str(save)!r}: unknown file type {save.suffix or '(no suffix)'!r}; "
            f"allowed: {', '.join(SAVE_SUFFIXES)} (.png for image data)"
        )
    return check_writable(save, what="--save file")


@model_options()
@table_options(leave_out=("t", "every"))
def sample(
    ctx: typer.Context,
    checkpoint: CheckpointArg,
    sampler: Annotated[
        SamplerName | None,
        _sampler_option(
            "--sampler",
            help="ddpm: ancestral (Ho et al. 2020, Alg. 2); ddim: Song et al. 2021 with --eta; "
            "dpmpp-2m/-3m/-2m-sde: DPM-Solver++ (Lu et al. 2022b); unipc (Zhao et al. 2023); "
            "euler, euler-a, heun (Karras et al. 2022); flow-euler. Default: a diffusers "
            "folder's own scheduler where ddpm has it (said on stderr), else ddpm.",
        ),
    ] = None,
    variance: VarianceOpt = None,
    eta: Annotated[
        float,
        _sampler_option(
            "--eta",
            help="DDIM noise scale, >= 0 (0: deterministic; 1: ancestral with fixed_small).",
        ),
    ] = 0.0,
    steps: Annotated[
        str | None,
        _sampler_option(
            "--steps",
            metavar="N",
            help="Sampler steps: respace to N (1..T) with --spacing, or a section string "
            "(ddim50, 10,20,30). Default: all T. (train counts optimiser steps: --train-steps.)",
        ),
    ] = None,
    spacing: Annotated[
        SampleSpacingName | None,
        _sampler_option(
            "--spacing",
            help="How N steps are spread: leading/trailing/linspace over the training timesteps, "
            "or N noise levels between the model's sigma_min and sigma_max: karras (rho 7), "
            "exponential, beta, lu (uniform log-SNR). Default: the checkpoint's own (a diffusers "
            "scheduler's timestep_spacing, with its steps_offset), else trailing.",
        ),
    ] = None,
    clip: Annotated[
        bool,
        _sampler_option(
            "--clip/--no-clip",
            help="Clip x0_hat to the data range before each step.",
        ),
    ] = True,
    dynamic_threshold: Annotated[
        bool,
        _sampler_option(
            "--dynamic-threshold",
            help="Dynamic thresholding of x0_hat (Saharia et al. 2022) instead of --clip.",
        ),
    ] = False,
    percentile: Annotated[
        float,
        _sampler_option(
            "--percentile",
            help="Percentile of |x0_hat| for --dynamic-threshold.",
        ),
    ] = 0.995,
    n: Annotated[int, typer.Option(*NUM_SAMPLES_FLAGS, help="Number of samples.")] = 64,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    save: Annotated[
        Path | None,
        typer.Option(
            "--save",
            metavar="PATH",
            help=".npz of the samples (key 'samples'), or a .png grid (image data). Checked "
            "before sampling.",
        ),
    ] = None,
    trajectory_every: Annotated[
        int | None,
        typer.Option(
            "--trajectory-every", metavar="K", help="Keep x0_hat every K steps for --plot."
        ),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(
            "--references",
            metavar="NAME|PATH",
            help="Reference samples to measure the samples against (a data file or built-in "
            "set); default: the checkpoint's own (train --references N holds them out). A latent "
            "model's images are encoded by its VAE (latents are taken as given): compared in "
            "latent space.",
            autocompletion=complete_data,
        ),
    ] = None,
    old: Annotated[str | None, typer.Option("--reference", hidden=True)] = None,
    summary: Annotated[
        bool,
        typer.Option(
            "--summary", help="Print one summary row (with the distances) instead of per-step rows."
        ),
    ] = False,
    table: TableFlags = NO_TABLE_FLAGS,
    model_flags: ModelFlags = NO_MODEL_FLAGS,
    threads: ThreadsOpt = None,
    order: OrderOpt = None,
    solver_type: SolverTypeOpt = None,
    lower_order_final: LowerOrderFinalOpt = None,
    euler_at_final: EulerAtFinalOpt = None,
    final_sigmas: FinalSigmasOpt = None,
    corrector: CorrectorOpt = None,
    s_churn: ChurnOpt = None,
    s_tmin: TminOpt = None,
    s_tmax: TmaxOpt = None,
    s_noise: SnoiseOpt = None,
    stochastic: StochasticOpt = None,
    dpm_form: DpmFormOpt = None,
    init: InitOpt = None,
    sigmas: SigmasOpt = None,
    timestep_list: TimestepListOpt = None,
) -> None:
    """Sample from a checkpoint and show every step: one row per step.

    Columns: step (0 = noisiest), t (the model timestep, 0-based), variance (of the noise the step
    adds; 0 at the last step), xt_std and xt_std_expected = sqrt(ab_t var(data) + 1 - ab_t)
    (var(data) from the checkpoint's reference samples, else assumed 1), x0_min/x0_max/x0_std of
    the raw x0_hat, clip_fraction (share of raw x0_hat outside the data range), update_norm (mean
    ||x_{t-1} - x_t||). Same seed, same samples: the noise does not depend on --batch-size. The
    sampler's state is float32 (float64 with --dtype float64); only the model sees --dtype. For
    vector data with reference points, the energy distance (an unbiased estimate: it can dip
    below 0 at small --n) and sliced W2 of the samples to them go to stderr (or stdout with
    --summary). NaN/Inf in x_t stops the run: the rows so far are printed, exit 1.

    Examples:

      ddpm sample ckpt.pt --n 512 --steps 100 --plot plots/sample.png

      ddpm sample ckpt.pt --sampler ddim --eta 0 --steps 50 --summary

      ddpm sample ckpt.pt --variance fixed_large --save samples.npz --trajectory-every 100 --plot
    """
    table.check()
    reject_conflicts(("--summary", summary), ("--columns", table.columns is not None))
    _reject_idle_options(ctx, sampler or "", dynamic_threshold, table.plot is not None)
    reference = _reference_flag(reference, old, n, batch_size)
    plot_path, save_path = table.plot_path("sample"), _check_save(save)
    # usage errors above answer before torch is imported (issue 20: well under a second)
    from ddpmcli import api
    from ddpmcli.api_sampling import resolve_sampler
    from ddpmcli.run import RunError, progress_observer

    ranks, run_device = join_ranks(device)
    solver = solver_flags_of(ctx.params)  # --order ... --dpm-form (cli/solver_options.py)
    grid, x_init = parse_sigmas(sigmas), read_init(init)
    at = _parse_timesteps(timestep_list, steps=steps, sigmas=sigmas, spacing=spacing)
    model = model_flags.load(checkpoint, run_device, dtype, data=reference, seed=seed)
    use_threads(threads, model, ranks)
    limits.check_run_sizes(model.data_shape, n=n, batch_size=batch_size, one_batch_default=True)
    threshold = percentile if dynamic_threshold else None
    # the library's final_sigmas_type/final_sigma are the flag --final-sigmas (not -type, -sigma)
    with as_flags(**_FLAGS):  # settings that cannot run are refused before any data is read
        name, how, grid, solver, said = resolve_sampler(
            model, sampler, spacing, grid, solver, timesteps=at is not None
        )
        settings = api.sample_settings(
            model, n, name, variance=variance, eta=eta, clip=clip,
            dynamic_threshold=threshold, trajectory_every=trajectory_every, **solver,
        )  # fmt: skip
        schedule = api.sampling_schedule(model, steps, how, name, grid, timesteps=at)
    if steps is not None and steps.strip().isdigit():  # the warning check gives (issue 20)
        warn_respacing(schedule, api.sampling_spacing(model, how)[0])
    if said and not table.quiet:
        note(said)
    if save_path is not None and save_path.suffix.lower() == ".png" and len(model.data_shape) != 3:
        raise UsageError(f"--save {str(save_path)!r}: a .png grid needs image data; use .npz")
    title = f"sample {checkpoint.name} ({name}, {schedule.num_steps} steps)"
    cols = select_columns(table.columns, _step_columns())
    try:
        with progress(n * schedule.num_steps, "sampling", table.quiet) as bar, as_flags(**_FLAGS):
            run = api.sample(
                model, n, steps, name, seed=seed, variance=variance, eta=eta,
                grid=grid if grid is not None or at is not None else how,  # type: ignore[arg-type]
                timesteps=at, clip=clip, dynamic_threshold=threshold, batch_size=batch_size,
                references=reference, trajectory_every=trajectory_every, ranks=ranks,
                observers=[progress_observer(bar)], init=x_init, **solver,
            )  # fmt: skip
    except RunError as exc:  # NaN/Inf or the model's own failure: the rows so far, then the error
        if not summary and exc.rows:
            table.emit(exc.rows, cols, title)
        raise
    refs = run.references  # a latent model's: latents (its images encoded by the VAE)
    distances = _report(
        run, model, table, summary, (settings, schedule.num_steps, n, seed), cols, title
    )
    if save_path is not None and ranks.is_main:
        _save_samples(save_path, run.samples, model, schedule.name, table.quiet)
    if plot_path is not None and ranks.is_main:
        _plot(run, plot_path, model, refs, distances, title, table.quiet)


def _report(
    run: Any, model: LoadedModel, table: Any, summary: bool, what: tuple[Any, int, int, int],
    cols: list[str], title: str,
) -> dict[str, float]:  # fmt: skip
    """The rows (or the --summary row) and the distances to the references, which it returns;
    ``what`` = (settings, steps, n, seed)."""
    settings, steps, n, seed = what
    refs = run.references
    if not table.quiet:
        _reference_note(model, refs)
    distances = _distances(run.samples, refs, model.data_shape, seed)
    if summary:
        row = _summary_row(settings, steps, n, seed, run.samples, distances)
        table.emit([row], list(SUMMARY_COLUMNS), title, columns_option=False)
    else:
        table.emit(run.rows, cols, title)
        if distances and not table.quiet:
            note(", ".join(f"{k} {v:.6g}" for k, v in distances.items()) + " (to the reference)")
    return distances


def _plot(
    run: Any, path: Path, model: LoadedModel, refs: Any, distances: dict[str, float], title: str,
    quiet: bool,
) -> None:  # fmt: skip
    import torch

    from ddpmcli.plotting.sample import plot_sampling

    written = plot_sampling(
        run, path, data_range=model.data_range,
        reference=None if refs is None else refs.to(torch.float32), distances=distances,
        title=title,
    )  # fmt: skip
    if not quiet:
        note(f"wrote {written}")


def _step_columns() -> list[str]:
    from ddpmcli.run import STEP_COLUMNS

    return list(STEP_COLUMNS)


def _reject_idle_options(
    ctx: typer.Context, sampler: str, dynamic_threshold: bool, plotting: bool
) -> None:
    """A usage error for an option given where it changes nothing (issue 8): --percentile
    without --dynamic-threshold, --variance with ddim (its noise is --eta's), --trajectory-every
    without --plot (the frames are only drawn), --spacing without --steps, --eta with another
    sampler than ddim (check_sample_settings says the same of a non-zero eta)."""

    def given(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    idle = [
        ("--percentile", given("percentile") and not dynamic_threshold, "--dynamic-threshold"),
        ("--variance", given("variance") and sampler == "ddim", "--sampler ddpm"),
        ("--trajectory-every", given("trajectory_every") and not plotting, "--plot"),
        ("--spacing", given("spacing") and not given("steps"), "--steps"),
    ]
    if given("eta") and sampler != "ddim":  # the library's own words, before torch loads
        raise UsageError("--eta applies to --sampler ddim only")
    for flag, unused, needs in idle:
        if unused:
            raise UsageError(f"{flag} has no effect without {needs}; add {needs} or drop {flag}")


def _reference_note(model: LoadedModel, refs: Any) -> None:
    """Say what xt_std_expected's var(data) came from: 1 without references; a latent model
    compares its samples (latents) with the references' latents."""
    if refs is None:
        note("xt_std_expected assumes var(data) = 1 (no reference samples)")
    elif model.latent is not None:
        note("references compared in latent space (images encoded by the VAE)")


def _distances(samples: Any, refs: Any, data_shape: tuple[int, ...], seed: int) -> dict[str, float]:
    if refs is None or len(data_shape) != 1 or samples.shape[0] < 2 or refs.shape[0] < 2:
        return {}
    from ddpmcli.run import cloud_distances

    return cloud_distances(samples, refs, seed=seed)


def _summary_row(
    settings: Any, steps: int, n: int, seed: int, samples: Any, distances: dict[str, float]
) -> dict[str, Any]:
    return {
        "sampler": settings.sampler,
        "variance": settings.variance if settings.sampler == "ddpm" else None,
        "eta": settings.eta if settings.sampler == "ddim" else None,
        "steps": steps,
        "n": n,
        "seed": seed,
        "sample_mean": float(samples.double().mean()),
        "sample_std": float(samples.double().std(correction=0)),
        "energy_distance": distances.get("energy_distance"),
        "sliced_w2": distances.get("sliced_w2"),
    }


def _save_samples(path: Path, samples: Any, model: LoadedModel, schedule: str, quiet: bool) -> None:
    from ddpmcli.output import atomic_write

    data_range = model.data_range
    if model.latent is not None:  # a latent model's samples are saved as decoded images
        samples, data_range = model.latent.decode(samples), model.latent.image_range
    if path.suffix.lower() == ".png":
        from ddpmcli.plotting.sample import save_image_grid

        written = save_image_grid(samples, path, data_range)
    else:
        import numpy as np

        arr = samples.numpy()
        lo, hi = data_range
        written = atomic_write(
            path,
            lambda tmp: np.savez(
                tmp, samples=arr, data_range=np.array([lo, hi]), schedule=np.array(schedule)
            ),
        )
    if not quiet:
        note(f"wrote {written}")


def register(app: typer.Typer) -> None:
    """Add `ddpm sample` to the app (`ddpm nll` is in :mod:`ddpmcli.cli.nll`)."""
    app.command("sample")(sample)
