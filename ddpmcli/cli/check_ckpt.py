"""`ddpm check CKPT`: the checkpoint side of `ddpm check` (the command itself lives with the
schedule commands, `ddpmcli/cli/schedule.py`, and hands a checkpoint here).

Thin: the flags a checkpoint needs beyond the schedule's (`--data`, `--n`, `--seed`, the model
metadata flags), one load, `ddpmcli.api_check.check`, rows to the output layer. Nothing here
imports torch at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ddpmcli import limits
from ddpmcli.cli.common import (
    NUM_SAMPLES_FLAGS,
    EvalDataOpt,
    MaxSequenceLengthOpt,
    ModelOpt,
    PromptOpt,
    SeedOpt,
    ShapeOpt,
    ThreadsOpt,
    TrustOpt,
    as_flags,
    check_format_flags,
    flag_name,
    in_panel,
    use_threads,
)
from ddpmcli.cli.data_options import DataRangeOpt
from ddpmcli.cli.option_groups import Command, ModelFlags, option_group
from ddpmcli.errors import UsageError

if TYPE_CHECKING:
    from ddpmcli.cli.schedule_options import ScheduleFlags

PANEL_CHECKPOINT = "Checkpoint (ddpm check CKPT)"
_option = in_panel(PANEL_CHECKPOINT)

CheckpointArgOpt = Annotated[
    Path | None,
    typer.Argument(
        metavar="[CKPT]",
        help="A checkpoint to check (native .pt, TorchScript, .pt2, a diffusers folder, or any "
        "file with --model): its schedule, and probes of what its model does.",
        show_default=False,
    ),
]
CKPT_COLUMNS: tuple[str, ...] = ("severity", "code", "t", "confidence", "message")
"""The columns of `ddpm check CKPT` (json/jsonl add ``numbers``, the values a probe rests on)."""
SCHEDULE_ONLY = (
    "beta_start", "beta_end", "max_beta", "param", "betas_file", "alpha_bars_file",
    "zero_terminal_snr", "logsnr_shift", "steps_offset", "scale_to_timesteps",
)  # fmt: skip
"""Schedule flags that build a schedule of their own: refused with a checkpoint."""


@dataclass(frozen=True)
class CheckpointFlags:
    """The flags `ddpm check CKPT` takes beyond the schedule's (which, with a checkpoint, mean:
    --kind/-T/--prediction-type its metadata, --steps/--spacing the sampler grid checked)."""

    data: EvalDataOpt = None
    n: Annotated[
        int,
        _option(*NUM_SAMPLES_FLAGS, min=1, help="Samples the behaviour probes run on."),
    ] = 32
    seed: SeedOpt = 0
    data_shape: ShapeOpt = None
    data_range: DataRangeOpt = None
    trust_program: TrustOpt = False
    model_factory: ModelOpt = None
    prompt: PromptOpt = None
    max_sequence_length: MaxSequenceLengthOpt = None
    threads: ThreadsOpt = None


NO_CHECKPOINT_FLAGS = CheckpointFlags()
"""The default of `check`'s ``ckpt_flags`` parameter (never used: the splice replaces it)."""


def checkpoint_options() -> Callable[[Command], Command]:
    """Splice the :class:`CheckpointFlags` options into `check` at its ``ckpt_flags``."""
    return option_group(CheckpointFlags, "ckpt_flags")


def looks_like_checkpoint(path: Path) -> bool:
    """Whether ``--from PATH`` names a checkpoint rather than a scheduler config: a file that
    is not JSON text (a torch pickle or zip archive)."""
    if not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
    except OSError:
        return False
    return head in (b"PK", b"\x80\x02") or head[:1] == b"\x80"


def checkpoint_to_check(
    checkpoint: Path | None, flags: ScheduleFlags
) -> tuple[Path | None, ScheduleFlags]:
    """The checkpoint `check` runs on, and its schedule flags: ``--from`` naming a checkpoint
    file is checked as one (with a note saying so); ``--from`` naming a pipeline folder still
    lints its scheduler config, with a note that `ddpm check DIR` also probes the model."""
    import dataclasses

    from ddpmcli.output import note

    path = flags.from_file
    if checkpoint is not None or path is None:
        return checkpoint, flags
    if looks_like_checkpoint(path):
        note(f"--from {path} is a checkpoint: checked as `ddpm check {path}`")
        return path, dataclasses.replace(flags, from_file=None)
    if path.is_dir() and any((path / d / "config.json").is_file() for d in ("unet", "transformer")):
        note(
            f"{path} is a pipeline: this checks its scheduler config; `ddpm check {path}` also "
            "probes what its model does"
        )
    return None, flags


def _refuse_schedule_flags(flags: ScheduleFlags) -> None:
    given = [
        name for name in SCHEDULE_ONLY
        if getattr(flags, name) not in (None, False, 0.0, [], ())
    ]  # fmt: skip
    if given:
        names = ", ".join(flag_name(name) for name in given)
        raise UsageError(f"{names}: a schedule flag; with a checkpoint, check uses its own")


def _steps(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--steps {text!r}: with a checkpoint, a number of steps") from None


def check_checkpoint(
    path: Path,
    flags: ScheduleFlags,
    ckpt_flags: CheckpointFlags,
    prediction_type: str | None,
    fmt: str,
    no_header: bool,
) -> None:
    """`ddpm check CKPT`: load, lint and probe, emit one row per finding; exit 1 on an error."""
    from ddpmcli.api_check import check
    from ddpmcli.checks import SPAN_RUNS, span_text
    from ddpmcli.cli.data_options import evaluation_data
    from ddpmcli.output import emit, resolve_format
    from ddpmcli.run.distributed import current

    check_format_flags(fmt, no_header)
    _refuse_schedule_flags(flags)
    if flags.from_file is not None:
        raise UsageError("--from and a checkpoint cannot be used together")
    steps = _steps(flags.steps)
    c = ckpt_flags
    model = ModelFlags(
        kind=flags.kind, timesteps=flags.timesteps, prediction_type=prediction_type,
        data_shape=c.data_shape, data_range=c.data_range, trust_program=c.trust_program,
        model_factory=c.model_factory, prompt=c.prompt, max_sequence_length=c.max_sequence_length,
    ).load(path, data=c.data, seed=c.seed)  # fmt: skip
    use_threads(c.threads, model, current())
    # --n 10**9 built the data set first (8 GB, the bug handler under a memory cap)
    limits.check_run_sizes(model.data_shape, n=c.n, batch_size=None, one_batch_default=True)
    data: Any = None
    if c.data is not None or model.reference_samples is not None:
        data = evaluation_data(model, c.data, c.n, c.seed, show=True, quiet=True)
    with as_flags(x0="--data", n="--n", steps="--steps", spacing="--spacing"):
        result = check(model, data, n=c.n, seed=c.seed, steps=steps, spacing=flags.spacing)
    as_list = fmt in ("json", "jsonl")
    most_runs = SPAN_RUNS if resolve_format(fmt) == "table" else None
    rows = []
    for f in result.findings:
        row = _row(f, as_list, most_runs, span_text)
        rows.append(row)
    columns = [*CKPT_COLUMNS, "numbers"] if as_list else list(CKPT_COLUMNS)
    emit(rows, columns, fmt, no_header=no_header, title=f"check {path.name}",
         columns_option=False)  # fmt: skip
    if result.failed:
        raise typer.Exit(1)


def _row(finding: Any, as_list: bool, most_runs: int | None, span: Any) -> dict[str, Any]:
    from ddpmcli.api_check import finding_row

    row = finding_row(finding, flag_name)
    if not as_list:
        row["t"] = span(finding.t, most_runs)
        row["confidence"] = "" if row["confidence"] is None else f"{row['confidence']:.2f}"
    return row
