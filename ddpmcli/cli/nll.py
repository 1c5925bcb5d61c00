"""`ddpm nll CKPT`: the variational bound of a checkpoint on data, term by term.

Thin: parse and validate the flags, load the checkpoint (as `ddpm sample` does), call
`ddpmcli.api.nll`, hand the rows to `ddpmcli.output`. torch is imported only inside the command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import typer

from ddpmcli import limits
from ddpmcli.cli.common import (
    NUM_SAMPLES_FLAGS,
    CheckpointArg,
    DeviceOpt,
    EvalDataOpt,
    EveryOpt,
    SeedOpt,
    ThreadsOpt,
    TSelectOpt,
    as_flags,
    join_ranks,
    reject_conflicts,
    samples_from,
    select_columns,
    select_rows,
    use_threads,
)
from ddpmcli.cli.data_options import evaluation_data
from ddpmcli.cli.nll_ode import (
    AtolOpt,
    BoundArgs,
    DequantizationOpt,
    ExactDivergenceOpt,
    MaxEvalsOpt,
    MethodOpt,
    OdeStepsOpt,
    ProbeKindOpt,
    ProbesOpt,
    RtolOpt,
    TEpsOpt,
    ode_settings,
    run_ode,
)
from ddpmcli.cli.option_groups import (
    NO_MODEL_FLAGS,
    NO_TABLE_FLAGS,
    ModelFlags,
    TableFlags,
    model_options,
    table_options,
)
from ddpmcli.cli.sample import DtypeOpt, VarianceOpt
from ddpmcli.errors import UsageError
from ddpmcli.output import note, progress

if TYPE_CHECKING:
    from ddpmcli.run import Strata


@model_options()
@table_options(leave_out=("t", "every", "plot"))
def nll(
    checkpoint: CheckpointArg,
    data: EvalDataOpt = None,
    n: Annotated[int, typer.Option(*NUM_SAMPLES_FLAGS, help="Samples to evaluate.")] = 64,
    seed: SeedOpt = 0,
    t: TSelectOpt = None,
    every: EveryOpt = None,
    t_random: Annotated[
        int | None,
        typer.Option(
            "--t-random",
            metavar="K",
            help="Evaluate about K timesteps: t = 0 and two drawn uniformly from each of "
            "(K-1)//2 equal strata (seeded): an unbiased estimate of the total whose ± includes "
            "the choice of t.",
        ),
    ] = None,
    variance: VarianceOpt = None,
    decoder: Annotated[
        Literal["auto", "discretized", "discretized_tanh", "continuous"],
        typer.Option(
            "--decoder",
            help="Decoder term at t = 0: discretized (8-bit data, bins of 2/255 on the data range, "
            "exact normal CDF; auto for images), discretized_tanh (the same with "
            "improved-diffusion's tanh approximation of the CDF, to reproduce its published "
            "numbers) or continuous (a Gaussian density for real-valued data: its bits/dim can be "
            "negative and do not compare with discrete ones; auto for vectors).",
        ),
    ] = "auto",
    per_sample: Annotated[
        bool,
        typer.Option(
            "--per-sample",
            help="One row per sample: its total (or estimate) in bits/dim, instead of per t.",
        ),
    ] = False,
    clip: Annotated[
        bool, typer.Option("--clip/--no-clip", help="Clip x0_hat to the data range.")
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="(sample, t) pairs per model call; default: auto."),
    ] = None,
    method: MethodOpt = "vb",
    exact_divergence: ExactDivergenceOpt = False,
    probes: ProbesOpt = 1,
    probe_kind: ProbeKindOpt = "rademacher",
    rtol: RtolOpt = 1e-5,
    atol: AtolOpt = 1e-5,
    max_evals: MaxEvalsOpt = 4000,
    ode_steps: OdeStepsOpt = None,
    t_eps: TEpsOpt = None,
    dequantization: DequantizationOpt = "auto",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    table: TableFlags = NO_TABLE_FLAGS,
    model_flags: ModelFlags = NO_MODEL_FLAGS,
    threads: ThreadsOpt = None,
) -> None:
    """The variational bound of a checkpoint on data, term by term, in bits/dim.

    Rows: for each t (0-based) the KL between the true posterior q(x_{t-1}|x_t, x0) and the
    model's p(x_{t-1}|x_t) with --variance (term kl), at t = 0 the decoder -log p(x0|x_1) (term
    decoder_discretized or decoder_continuous), then the prior KL(q(x_{T-1}|x0) || N(0, I)), then
    the total. Each is a mean over samples, with its standard error over samples; x0_mse and
    eps_mse per t. x_t uses the noise of (seed, sample, t): same seed, same numbers, whatever
    --batch-size or --device. Every t evaluated: the bound itself (term total). --t-random K: an
    unbiased importance-weighted estimate (term total_estimate; weight = how many t each
    evaluated t stands for) whose standard error adds the spread from the choice of t (two t per
    stratum). A fixed subset (--t, --every): the terms only, no total (a few fixed t can miss the
    bound by far more than any standard error would say). t = 0 is always evaluated. Streams
    (sample, t) pairs in chunks: memory does not grow with T.

    Examples:

      ddpm nll ckpt.pt --data moons --n 256

      ddpm nll ckpt.pt --n 64 --t-random 50 --format json
    """
    limits.check_count(n, "n")  # before torch and the checkpoint (issue 20)
    from ddpmcli import api
    from ddpmcli.checkpoints.latent import space_columns
    from ddpmcli.run import BOUND_COLUMNS, BoundResult, RunError, progress_observer

    table.check()
    reject_conflicts(
        ("--t", t is not None), ("--every", every is not None), ("--t-random", t_random is not None)
    )
    if batch_size is not None:
        limits.check_count(batch_size, "batch_size")
    picks_t = t is not None or every is not None or (method == "ode" and t_random is not None)
    ode = ode_settings(
        method, picks_t, exact_divergence, probes, probe_kind, rtol, atol, max_evals, ode_steps,
        t_eps, dequantization, seed, batch_size,
    )  # fmt: skip
    if per_sample and t_random is None and (t is not None or every is not None):
        raise UsageError(
            "--per-sample needs a total: every t, or --t-random K (a fixed --t/--every has none)"
        )
    cols = select_columns(
        table.columns, ["sample", "bits_per_dim"] if per_sample else list(BOUND_COLUMNS)
    )
    ranks, run_device = join_ranks(device)
    model = model_flags.load(checkpoint, run_device, dtype, data=data, seed=seed)
    use_threads(threads, model, ranks)
    num = model.schedule.num_steps
    strata, indices = _timesteps(num, t, every, t_random, seed)
    pairs = num if indices is None else len(set(indices) | {0})
    limits.check_run_sizes(
        model.data_shape, n=n, batch_size=batch_size, pairs_per_sample=pairs,
        rows_per_sample=1 if per_sample else 0,
    )  # fmt: skip
    picked = evaluation_data(model, data, n, seed, show=ranks.is_main, quiet=table.quiet)
    x0, reverse = picked.x0, api.declared_variance(model, variance)  # the checkpoint's
    cols = space_columns(model, cols)  # a latent model's columns say so (x0_mse_latent, ...)
    if ode is not None:  # --method ode|both (ddpmcli.cli.nll_ode); the bound's note is ours
        bound = BoundArgs(None if strata else indices, t_random, reverse, decoder, clip, pairs)
        run_ode(model, picked, ode, (method, bound, per_sample, checkpoint.name), table, ranks)
        return
    count = pairs * x0.shape[0]
    try:
        with progress(count, "bound", table.quiet) as bar, as_flags():
            result = cast(BoundResult, api.nll(  # method vb returns the bound
                model, x0, seed=seed, t=None if strata is not None else indices, t_random=t_random,
                variance=variance, decoder=decoder, clip=clip, batch_size=batch_size,
                observers=[progress_observer(bar)], ranks=ranks,
            ))  # fmt: skip
    except RunError as exc:  # the finite terms so far, then the error
        if exc.rows:
            table.emit(exc.rows, cols, f"nll {checkpoint.name}")
        raise
    rows = result.rows  # named as the model's space says (bits_per_dim_latent, ...)
    if per_sample and result.per_sample_total is not None:
        totals = result.per_sample_total.tolist()
        name = space_columns(model, ["bits_per_dim"])[0]
        rows = [{"sample": i, name: v} for i, v in enumerate(totals)]
    table.emit(rows, cols, f"nll {checkpoint.name}")
    if not table.quiet:
        _nll_note(result, result.decoder, decoder, int(x0.shape[0]), picked.source)


def _nll_note(result: Any, dec: str, asked: str, n: int, source: str) -> None:
    """The total on stderr with its uncertainty and the decoder used (and why), or why none."""
    decoders = {
        "discretized": "discretised 8-bit decoder (exact normal CDF)",
        "discretized_tanh": "discretised 8-bit decoder (improved-diffusion's tanh CDF)",
        "continuous": "continuous Gaussian density decoder (real-valued data)",
    }
    why = ""
    if asked == "auto":
        why = " (the default for images)" if dec != "continuous" else " (the default for vectors)"
    used = f"{decoders[dec]}{why}"
    if result.total_bpd is None:
        note(
            f"no total: a fixed subset of t does not bound -log p(x0) and its error is unknown; "
            f"use every t or --t-random K for an estimate with an honest ±; {used}"
        )
        return
    what = "estimated bound (± includes the choice of t)" if result.estimate else "bound"
    note(
        f"{what}: {result.total_bpd:.6g} ± {result.total_stderr or 0:.2g} bits/dim on "
        f"{samples_from(n, source)}; {used}"
    )


def _timesteps(
    num: int, t: str | None, every: int | None, t_random: int | None, seed: int
) -> tuple[Strata | None, list[int] | None]:
    """The strata of --t-random K (and the t they draw), or the fixed subset of --t/--every, or
    (None, None) for every t."""
    from ddpmcli.run import random_strata

    if t_random is not None:
        with as_flags():
            strata = random_strata(num, t_random, seed)
        return strata, strata.indices
    if t is not None or every is not None:
        return None, select_rows(t, every, num)
    return None, None


def register(app: typer.Typer) -> None:
    """Add `ddpm nll` to the app."""
    app.command("nll")(nll)
