"""`ddpm reconstruct CKPT`: noise data to x_t, let the checkpoint predict, rebuild x0, per t.

Thin: parse and validate the flags, load the checkpoint (`ddpmcli.api.load`) and data, call
`ddpmcli.api.reconstruct` (what Python callers get too), hand the rows to `ddpmcli.output`.
torch is imported only inside the command, so `ddpm --help` stays fast.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ddpmcli import limits
from ddpmcli.choices import DtypeName
from ddpmcli.cli.common import (
    NUM_SAMPLES_FLAGS,
    CheckpointArg,
    DecodeOpt,
    DeviceOpt,
    EvalDataOpt,
    EveryOpt,
    SeedOpt,
    ThreadsOpt,
    TSelectOpt,
    as_flags,
    join_ranks,
    reject_conflicts,
    select_columns,
    select_rows,
    use_threads,
)
from ddpmcli.cli.data_options import evaluation_data
from ddpmcli.cli.option_groups import (
    NO_MODEL_FLAGS,
    NO_TABLE_FLAGS,
    ModelFlags,
    TableFlags,
    model_options,
    table_options,
)
from ddpmcli.output import note, progress, warn


@model_options()
@table_options(leave_out=("t", "every"))
def reconstruct(
    checkpoint: CheckpointArg,
    data: EvalDataOpt = None,
    n: Annotated[int, typer.Option(*NUM_SAMPLES_FLAGS, min=1, help="Samples to reconstruct.")] = 64,
    seed: SeedOpt = 0,
    t: TSelectOpt = None,
    every: EveryOpt = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", min=1, help="(sample, t) pairs per model call; default: auto."
        ),
    ] = None,
    device: DeviceOpt = "cpu",
    dtype: Annotated[
        DtypeName,
        typer.Option("--dtype", help="Dtype the model runs in (the sweep's own math is float64)."),
    ] = "float32",
    clip: Annotated[
        bool, typer.Option("--clip/--no-clip", help="Clip x0_hat to the data range before mse.")
    ] = True,
    per_sample: Annotated[
        bool, typer.Option("--per-sample", help="One row per (t, sample) instead of per t.")
    ] = False,
    compare_optimal: Annotated[
        bool,
        typer.Option(
            "--compare-optimal",
            help="Also the error of the exact Bayes-optimal denoiser: for a finite set (a file, "
            "the reference samples; posterior over all its points) or a Gaussian mixture (gmm).",
        ),
    ] = False,
    table: TableFlags = NO_TABLE_FLAGS,
    model_flags: ModelFlags = NO_MODEL_FLAGS,
    decode: DecodeOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Reconstruct x0 from x_t at each t: mse, psnr, eps_mse, clip_fraction per noise level.

    For each sample and t: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, then x0_hat from the
    model's output by its prediction type. Each sample gets one noise eps, drawn from --seed and
    its index, and keeps it at every t (per-t numbers unbiased, curves across t correlated; same
    seed, same numbers up to float rounding, whatever --batch-size, --device or the other --t).
    Timesteps are 0-based as models take them (t = 0 is one noising step); default: 10 t spread
    from 0 to T-1.

    Examples:

      ddpm reconstruct ckpt.pt --data moons --n 256 --every 100

      ddpm reconstruct ckpt.pt --data gmm --compare-optimal --plot plots/gmm.png

      ddpm reconstruct model.pt2 --kind cosine --prediction-type v --data-shape 2 --data moons
    """
    from ddpmcli import api
    from ddpmcli.run import RunError, default_timesteps, progress_observer

    table.check()
    reject_conflicts(("--t", t is not None), ("--every", every is not None))
    plot_path = table.plot_path("reconstruct")
    ranks, run_device = join_ranks(device)
    model = model_flags.load(checkpoint, data=data, seed=seed)
    use_threads(threads, model, ranks)
    steps = model.schedule.num_steps
    indices = (
        default_timesteps(steps) if t is None and every is None else select_rows(t, every, steps)
    )
    limits.check_run_sizes(
        model.data_shape, n=n, batch_size=batch_size, pairs_per_sample=len(indices),
        rows_per_sample=len(indices) if per_sample else 0,
    )  # fmt: skip
    picked = evaluation_data(
        model, data, n, seed, show=ranks.is_main, quiet=table.quiet,
        compare_optimal=compare_optimal,
    )  # fmt: skip
    if ranks.is_main and (why := _undefined_x0(model, indices)) is not None:
        warn(why)
    title = f"reconstruct {checkpoint.name}"
    cols = _shown_columns(model, picked.optimal is not None, table.columns, per_sample, decode)
    try:
        total = len(indices) * picked.x0.shape[0]
        with progress(total, "reconstructing", table.quiet) as bar, as_flags():
            result = api.reconstruct(
                model, picked, indices, batch_size=batch_size, seed=seed, device=run_device,
                dtype=dtype, clip=clip, per_sample=per_sample, decode=decode,
                observers=[progress_observer(bar)], ranks=ranks,
            )  # fmt: skip
    except RunError as exc:  # the rows of every finite t, then the first bad t
        if exc.rows:
            table.emit(exc.rows, cols, title)
        raise
    rows = result.sample_rows if per_sample and result.sample_rows is not None else result.rows
    table.emit(rows, cols, title)
    if plot_path is not None and ranks.is_main:
        from ddpmcli.plotting.reconstruct import plot_reconstruction

        written = plot_reconstruction(
            result, plot_path, title=f"{checkpoint.name} on {picked.source}"
        )
        if not table.quiet:
            note(f"wrote {written}")


def _shown_columns(
    model: Any, optimal: bool, columns: str | None, per_sample: bool, decode: bool
) -> list[str]:
    """The columns to show (``--columns`` picks among them), named as the API's rows name them:
    a latent model's say so (mse -> mse_latent, ...), ``--decode`` adds the image errors."""
    from ddpmcli.checkpoints.latent import DECODED_COLUMNS, space_columns

    available = [*_columns(model, per_sample, optimal), *DECODED_COLUMNS[: 2 * decode]]
    return space_columns(model, select_columns(columns, available))


def _columns(model: Any, per_sample: bool, optimal: bool) -> tuple[str, ...]:
    """The columns a sweep's rows hold (``ReconstructionResult.columns``/``sample_columns``)."""
    from ddpmcli.run import AGGREGATE_COLUMNS, OPTIMAL_COLUMNS
    from ddpmcli.run.sweep import path_columns

    rest = path_columns(model.schedule) + AGGREGATE_COLUMNS[1:]
    rest += OPTIMAL_COLUMNS if optimal else ()
    return ("t", "sample", *rest) if per_sample else ("t", *rest)


def register(app: typer.Typer) -> None:
    """Add `ddpm reconstruct` to the app."""
    app.command("reconstruct")(reconstruct)


def _undefined_x0(model: Any, indices: list[int]) -> str | None:
    """Why an epsilon model's x0 is NaN at the ``indices`` where alpha_t = 0 (a flow's s = 1,
    a zero terminal SNR): x0 = (x_t - sigma_t eps)/alpha_t divides by zero there. None if none."""
    from ddpmcli import core

    if core.canonical_prediction_type(model.prediction_type) != "epsilon":
        return None
    zero = [i for i in indices if float(model.schedule.alpha_t[i]) == 0.0]
    if not zero:
        return None
    shown = ", ".join(str(i) for i in zero)
    return (
        f"t = {shown}: alpha_t = 0 (x_t is pure noise), so x0 from an epsilon prediction, "
        "(x_t - sigma_t eps)/alpha_t, is undefined: mse and psnr are NaN there (a v, x0 or flow "
        "model rebuilds x0 at every t)"
    )
