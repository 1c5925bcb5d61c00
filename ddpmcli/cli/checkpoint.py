"""`ddpm info CKPT` and `ddpm train`: what a checkpoint holds; make a native one to diagnose.

Thin: parse and validate the flags, call `ddpmcli.checkpoints` / `ddpmcli.training`, hand rows to
`ddpmcli.output`. torch is imported only inside the commands, so `ddpm --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ddpmcli.choices import ArchitectureName
from ddpmcli.cli.common import (
    NUM_SAMPLES_FLAGS,
    ColumnsOpt,
    DeviceOpt,
    FormatOpt,
    MaybePredictionTypeOpt,
    NoHeaderOpt,
    QuietOpt,
    SeedOpt,
    ThreadsOpt,
    as_flags,
    check_format_flags,
    in_panel,
    parse_shape,
    select_columns,
)
from ddpmcli.cli.completion import complete_data
from ddpmcli.cli.data_options import TrainRangeOpt, parse_range, warn_outside_range
from ddpmcli.cli.option_groups import NO_MODEL_FLAGS, ModelFlags, model_options
from ddpmcli.cli.schedule_options import NO_FLAGS, ScheduleFlags, schedule_options
from ddpmcli.errors import UsageError
from ddpmcli.output import check_writable, emit, note, progress

if TYPE_CHECKING:
    from ddpmcli.checkpoints import LoadedModel

PANEL_TRAIN = "Training"
_train_option = in_panel(PANEL_TRAIN)  # an option of the Training panel of the help

INFO_COLUMNS = (
    "path",
    "format",
    "architecture",
    "parameters",
    "schedule",
    "kind",
    "timesteps",
    "terminal_snr",
    "terminal_alpha_bar",
    "prediction_type",
    "learned_variance",
    "data_shape",
    "data_min",
    "data_max",
    "reference_samples",
    "file_size",
    "train_steps",
    "train_loss",
)
MODEL_COLUMNS = (
    "num_classes",
    "null_label",
    "class_label",
    "guidance_scale",
    "prompt",
    "guidance",
    "time_ids",
    "text_encoders",
    "latent_shape",
    "vae",
    "noise_path",
    "shift",
    "grid",
)
"""Fields of conditional and latent models, and of paths other than VP (flow, sigma space): shown
by default only when a checkpoint has them."""


def info_row(model: LoadedModel) -> dict[str, Any]:
    """One row of `ddpm info` for a loaded checkpoint."""
    sched = model.schedule
    training = model.info.get("training") or {}
    refs = model.reference_samples
    return {
        "path": model.info.get("path"),
        "format": model.info.get("format"),
        "architecture": model.info.get("architecture"),
        "parameters": model.info.get("parameters"),
        "schedule": sched.name,
        "kind": sched.spec.get("kind", sched.name),
        "timesteps": sched.num_train_timesteps,
        "terminal_snr": float(sched.snr[-1]),
        "terminal_alpha_bar": float(sched.alpha_bar[-1]),
        "prediction_type": model.prediction_type,
        "learned_variance": model.learned_variance,
        "data_shape": "x".join(str(d) for d in model.data_shape),
        "data_min": model.data_range[0],
        "data_max": model.data_range[1],
        "reference_samples": 0 if refs is None else int(refs.shape[0]),
        "file_size": model.info.get("file_size"),
        "train_steps": training.get("steps"),
        "train_loss": training.get("final_loss"),
        **{name: model.info.get(name) for name in MODEL_COLUMNS},
        **_path_fields(sched),
    }


def _path_fields(sched: Any) -> dict[str, Any]:
    """noise_path, shift (a flow's static shift, e^mu under dynamic shifting) and the grid's
    sigma_t and model timestep ranges, for a schedule off VP."""
    if sched.path == "vp":
        return {}
    from ddpmcli import core

    shift = None
    kind = sched.spec.get("kind")
    if sched.path == "flow" and kind in core.SCHEDULE_KINDS:
        params = {**core.SCHEDULE_KINDS[kind].defaults, **sched.spec.get("params", {})}
        shift = core.flow_shift_factor(params)
    sig, ts = sched.sigma_t, sched.model_timestep
    grid = (
        f"{sched.num_steps} entries, sigma_t {float(sig[0]):.6g}..{float(sig[-1]):.6g}, "
        f"timestep {float(ts[0]):.6g}..{float(ts[-1]):.6g}"
    )
    return {"noise_path": sched.path, "shift": shift, "grid": grid}


@model_options(leave_out=())
def info(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            metavar="CKPT...", help="Native .pt, TorchScript .pt, .pt2 or diffusers dir."
        ),
    ],
    columns: ColumnsOpt = None,
    fmt: FormatOpt = "auto",
    no_header: NoHeaderOpt = False,
    model_flags: ModelFlags = NO_MODEL_FLAGS,
) -> None:
    """What a checkpoint holds: format, network and size, schedule (kind, T, terminal SNR),
    prediction type, data shape and range, file size. One row per checkpoint.

    A table shows one checkpoint as field/value lines; csv/tsv/json/jsonl give one record each.

    Examples:

      ddpm info ckpt.pt

      ddpm info ckpt.pt --format json

      ddpm info model.pt2 --kind cosine --prediction-type v --data-shape 2
    """
    from ddpmcli.output import resolve_format

    check_format_flags(fmt, no_header)
    cols = select_columns(columns, INFO_COLUMNS + MODEL_COLUMNS)
    # never runs the model: metadata, parameter counts and shapes from the file itself
    rows = [info_row(model_flags.load(path, inspect_only=True)) for path in checkpoints]
    if columns is None:  # the fields of conditional and latent models only where one has them
        cols = list(INFO_COLUMNS)
        cols += [c for c in MODEL_COLUMNS if any(row[c] is not None for row in rows)]
    if resolve_format(fmt) == "table" and len(rows) == 1:
        vertical = [{"field": c, "value": rows[0][c]} for c in cols]
        emit(vertical, ["field", "value"], "table", title=f"info {checkpoints[0].name}")
        return
    emit(rows, cols, fmt, no_header=no_header, title="info")


def _training_data(
    data: str,
    data_shape: str | None,
    n: int | None,
    references: int | None,
    width: int | None,
    batch_size: int | None,
    seed: int,
) -> tuple[Any, Any, tuple[float, float]]:
    """``train``'s data, held-out references and data range, sizes checked before any is drawn:
    a built-in set (``n`` samples) or a file used whole."""
    from ddpmcli import data as datasets

    shape = parse_shape(data_shape)
    builtin = datasets.BUILTIN_DATASETS.get(data) if not Path(data).exists() else None
    if builtin is not None and shape is not None and shape != builtin.data_shape:
        raise UsageError(
            f"--data-shape {data_shape}: the built-in set {data!r} has samples of shape "
            f"{','.join(str(d) for d in builtin.data_shape)}"
        )
    datasets.check_training_sizes(
        builtin.data_shape if builtin else (shape or (1,)),
        n=n, batch_size=batch_size, references=references, width=width,
    )  # fmt: skip
    if builtin is not None:
        x = datasets.get_data(data, n=n or 10000, seed=seed, data_shape=shape)
        refs_n = (
            references if references is not None else (512 if len(builtin.data_shape) == 1 else 64)
        )
        refs = datasets.builtin_dataset(data, refs_n, seed + 1) if refs_n else None
        data_range = builtin.data_range
    else:
        if n is not None:
            raise UsageError("--n draws from a built-in set; a file is used whole")
        x = datasets.load_data(data, shape)
        refs_n = references if references is not None else (512 if x.ndim == 2 else 64)
        refs = x[:refs_n] if refs_n else None
        # the data's own range when it leaves [-1, 1] (issue 8: a ring of radius 3 recorded
        # [-1, 1], and every later clip cut it silently); [-1, 1] otherwise, the usual convention
        lo, hi = float(x.min()), float(x.max())
        data_range = (-1.0, 1.0) if lo >= -1.0 and hi <= 1.0 else (lo, hi)
    return x, refs, data_range


def _training_prediction(schedule: Any, prediction_type: str | None) -> str:
    """The prediction type to train: the flag, else a flow's velocity, v where the terminal SNR is
    zero (epsilon cannot rebuild x0 where alpha_t = 0), else epsilon; epsilon at zero terminal SNR
    is refused, as `ddpm check` judges it an error."""
    zero_terminal = float(schedule.snr[-1]) == 0.0
    if prediction_type is None:
        if schedule.path == "flow":
            return "flow"
        return "v_prediction" if zero_terminal else "epsilon"
    from ddpmcli import core

    if zero_terminal and core.canonical_prediction_type(prediction_type) == "epsilon":
        raise UsageError(
            "--prediction-type epsilon with a zero terminal SNR: at the last t, x_t is pure noise "
            "and x0 = (x_t - eps)/0 is undefined; train v (or flow on a flow path) instead"
        )
    return prediction_type


@schedule_options(respacing=False)
def train(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            metavar="NAME|PATH",
            help="A built-in set (moons, swiss_roll, gmm, shapes) or a .npy/.npz file or image "
            "folder (values mapped to [-1, 1]; uint8 from 0-255).",
            autocompletion=complete_data,
        ),
    ] = "moons",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where to write the native checkpoint.")
    ] = Path("ckpt.pt"),
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace the --out file if it exists (default: refuse)."),
    ] = False,
    n: Annotated[
        int | None,
        typer.Option(
            *NUM_SAMPLES_FLAGS, min=1, help="Training samples drawn from a built-in set (10000)."
        ),
    ] = None,
    data_shape: Annotated[
        str | None,
        typer.Option("--data-shape", metavar="D|C,H,W", help="Resize/check file data to it."),
    ] = None,
    prediction_type: MaybePredictionTypeOpt = None,
    learned_variance: Annotated[
        bool,
        typer.Option(
            "--learned-variance",
            help="Also learn the variance (improved-diffusion hybrid loss, 2x output channels).",
        ),
    ] = False,
    architecture: Annotated[
        ArchitectureName,
        typer.Option("--architecture", help="Network: auto (mlp for vectors, unet for images)."),
    ] = "auto",
    width: Annotated[
        int | None,
        typer.Option("--width", min=1, help="MLP hidden width (128) / UNet base channels (32)."),
    ] = None,
    steps: Annotated[
        int,
        _train_option(
            "--train-steps",
            "--steps",
            min=1,
            help="Optimiser steps (--steps is an alias; elsewhere --steps counts sampler steps).",
        ),
    ] = 2000,
    batch_size: Annotated[
        int | None,
        _train_option(
            "--batch-size",
            min=1,
            help="Batch size (vectors 1024, images 64).",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        _train_option(
            "--lr",
            help="Adam learning rate, cosine decay to 10% (mlp 3e-3, unet 1e-3).",
        ),
    ] = None,
    ema: Annotated[
        float,
        _train_option(
            "--ema",
            metavar="DECAY",
            help="EMA decay of the saved weights; 0: off.",
        ),
    ] = 0.995,
    references: Annotated[
        int | None,
        typer.Option(
            "--references",
            min=0,
            help="Held-out reference samples stored in the checkpoint (512; images 64).",
        ),
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
    flags: ScheduleFlags = NO_FLAGS,
    threads: ThreadsOpt = None,
    data_range_opt: TrainRangeOpt = None,
) -> None:
    """Train a built-in network (an MLP for vectors, a small UNet for images); save a checkpoint.

    Loss: MSE to the prediction type's target (eps, x0, v, or a flow's velocity eps - x0; the
    default is flow on a --kind flow path, v at zero terminal SNR, else epsilon) at t uniform; with
    --learned-variance the improved-diffusion hybrid L_simple + 0.001 L_vlb. Any schedule kind and
    its options, as for `ddpm schedule`. Same seed, same weights. The checkpoint is written
    atomically, and an existing --out file is replaced only with --force; a progress bar with the
    loss shows on a terminal.

    Examples:

      ddpm train --data moons --steps 2000 --out ckpt.pt

      ddpm train --data shapes --kind cosine --prediction-type v --steps 500 --out shapes.pt
    """
    import torch

    from ddpmcli.checkpoints import save_native_checkpoint
    from ddpmcli.configs import build_schedule
    from ddpmcli.run import progress_observer, resolve_device
    from ddpmcli.run.runtime import default_threads
    from ddpmcli.training import default_architecture, refuse_overwrite, train_denoiser

    check_writable(out, what="checkpoint")
    refuse_overwrite(out, force)
    if not 0.0 <= ema < 1.0:
        raise UsageError(f"--ema {ema}: decay must lie in [0, 1) (0 turns EMA off)")
    built = build_schedule(flags.request())
    schedule, config = built.schedule, built.config
    if prediction_type is None and config is not None and "prediction_type" in config.raw:
        prediction_type = config.prediction_type  # --from sd2-v trained epsilon, its config v
    prediction_type = _training_prediction(schedule, prediction_type)
    recorded = parse_range(data_range_opt)
    x, refs, data_range = _training_data(data, data_shape, n, references, width, batch_size, seed)
    if recorded is not None:
        data_range = recorded
        warn_outside_range(x, data_range, data, training=True)
    data_shape_t = tuple(int(d) for d in x.shape[1:])
    arch = default_architecture(data_shape_t) if architecture == "auto" else architecture
    hparams = {} if width is None else {"hidden" if arch == "mlp" else "base_channels": width}
    bar_fields = {"loss": "-"}
    with progress(steps, "training", quiet, fields=bar_fields) as bar, as_flags(ema_decay="--ema"):
        shown = progress_observer(bar, {"loss": "loss_smoothed"})
        result = train_denoiser(
            x, schedule, prediction_type=prediction_type, learned_variance=learned_variance,
            architecture=arch, hparams=hparams, steps=steps, batch_size=batch_size, lr=lr,
            seed=seed, ema_decay=ema or None, device=resolve_device(device), observers=[shown],
            threads=threads or default_threads(1 if arch == "mlp" else None),
        )  # fmt: skip
    training = {
        "data": data,
        "n": int(x.shape[0]),
        "steps": steps,
        "batch_size": result.batch_size,
        "lr": result.lr,
        "ema": ema,
        "seed": seed,
        "final_loss": result.final_loss,
        "seconds": result.seconds,
        "torch": torch.__version__,
    }
    save_native_checkpoint(
        out, result.model, architecture=result.architecture, hparams=result.hparams,
        schedule=schedule, prediction_type=prediction_type, data_shape=data_shape_t,
        learned_variance=learned_variance, data_range=data_range, reference_samples=refs,
        training=training,
    )  # fmt: skip
    if not quiet:
        note(
            f"wrote {out} ({result.architecture}, {steps} steps in {result.seconds:.1f} s, "
            f"final loss {result.final_loss:.4g})"
        )


def register(app: typer.Typer) -> None:
    """Add `ddpm info` and `ddpm train` to the app."""
    app.command("info")(info)
    app.command("train")(train)
