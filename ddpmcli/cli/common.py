"""Options shared by every command, as `Annotated` aliases, and the parsers behind them.

Use them as parameter types::

    def schedule(fmt: FormatOpt = "auto", columns: ColumnsOpt = None, t: TSelectOpt = None, ...):

Nothing here imports torch, numpy or matplotlib.

Timestep selection (`--t`) takes 0-based indices as models take them: a comma list of items, each
an integer `499`, an inclusive range `0-999`, or a Python-style slice `start:stop[:step]` (stop
excluded; `900:` runs to the end). Out-of-range values are usage errors naming the allowed range.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from ddpmcli.choices import (
    DeviceName,
    FormatName,
    prediction_type_choices,
    prediction_type_of,
)
from ddpmcli.cli.completion import check_kind, complete_columns, complete_data, complete_kind
from ddpmcli.cli.plot_args import PLOT_DEFAULT, PLOT_SUFFIXES, plot_suffix_error
from ddpmcli.errors import UsageError

PLOT_FOLDER = Path("plots")


def in_panel(panel: str) -> Callable[..., Any]:
    """A ``typer.Option`` maker whose options show under ``panel`` in the help."""

    def option(*names: str, **settings: Any) -> Any:
        return typer.Option(*names, rich_help_panel=panel, **settings)

    return option


FormatOpt = Annotated[
    FormatName,
    typer.Option(
        "--format",
        "-f",
        help="Output format: auto (a table on a terminal, TSV when piped), table, csv, tsv, json, "
        "jsonl. Machine formats print floats at full precision.",
    ),
]
NoHeaderOpt = Annotated[
    bool, typer.Option("--no-header", help="Omit the header line (csv/tsv only).")
]
ColumnsOpt = Annotated[
    str | None,
    typer.Option(
        "--columns",
        "-c",
        metavar="A,B",
        help="Comma-separated columns to print, in order.",
        autocompletion=complete_columns,
    ),
]
TSelectOpt = Annotated[
    str | None,
    typer.Option(
        "--t",
        metavar="T",
        help="Rows to print, 0-based: `0,499,999`, inclusive range `0-999`, slice `0:1000:100`.",
    ),
]
EveryOpt = Annotated[
    int | None,
    typer.Option("--every", min=1, metavar="K", help="Print every K-th row (t = 0, K, 2K, ...)."),
]
PlotOpt = Annotated[
    str | None,
    typer.Option(
        "--plot",
        metavar="[PATH]",
        help="Also write a figure (PNG, SVG or PDF by suffix; bare --plot: plots/<command>.png). "
        "The next word is the PATH only when it ends in .png, .svg or .pdf (else write "
        "--plot=PATH). The path written goes to stderr.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes.")]
DeviceOpt = Annotated[
    DeviceName,
    typer.Option("--device", help="Where to run: auto (cuda, then mps, then cpu), cpu, cuda, mps."),
]
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def _seed(value: int) -> int:
    """`--seed` is a 64-bit integer. Checked here rather than with click's min/max, whose help
    shows a 40-character range that breaks mid-number at 80 columns."""
    if not SEED_MIN <= value <= SEED_MAX:
        raise typer.BadParameter(f"{value} is not in the range of a 64-bit integer (-2^63..2^63-1)")
    return value


SeedOpt = Annotated[
    int,
    typer.Option(
        "--seed",
        metavar="INT",
        callback=_seed,
        help="Random seed, a 64-bit integer: same seed, same numbers.",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        max=1024,
        help="CPU threads for torch; default: OMP_NUM_THREADS if set, 1 for small models (the "
        "2-D MLP), else the cores this process may use (affinity, cgroup quota) divided among "
        "torchrun's processes on this machine.",
    ),
]
NUM_SAMPLES_FLAGS = ("--n", "--num-samples", "-n")
"""The sample-count flags: ``--num-samples`` and ``-n`` pass through launchers (torchrun rejects
``--n`` as an abbreviation of its own options)."""

# Checkpoint metadata: what a TorchScript / torch.export file without ddpm.json cannot tell itself.
PANEL_META = "Metadata (TorchScript / export programs without ddpm.json)"

CheckpointArg = Annotated[
    Path, typer.Argument(metavar="CKPT", help="Native .pt, TorchScript .pt, .pt2 or diffusers dir.")
]
MetaKindOpt = Annotated[
    str | None,
    typer.Option(
        "--kind",
        "-k",
        help="Training schedule kind.",
        rich_help_panel=PANEL_META,
        autocompletion=complete_kind,
        callback=check_kind,
    ),
]
MetaTimestepsOpt = Annotated[
    int | None,
    typer.Option("--timesteps", "-T", help="Training T (1000).", rich_help_panel=PANEL_META),
]


def _prediction_type(value: str | None) -> str | None:
    """`--prediction-type` in its one spelling (aliases eps, x0, v accepted), None unchanged."""
    if value is None:
        return None
    canonical = prediction_type_of(value)
    if canonical is None:
        raise typer.BadParameter(f"{value!r} is not one of {prediction_type_choices()}")
    return canonical


PREDICTION_HELP = (
    "epsilon | sample | v_prediction | flow (aliases eps, x0, v, flow_prediction, velocity)."
)
PredictionTypeOpt = Annotated[
    str,
    typer.Option("--prediction-type", help=PREDICTION_HELP, callback=_prediction_type),
]
"""`--prediction-type` with a default (train)."""
MaybePredictionTypeOpt = Annotated[
    str | None,
    typer.Option("--prediction-type", help=PREDICTION_HELP, callback=_prediction_type),
]
"""`--prediction-type` where None means the config's or checkpoint's own (check)."""
PredOpt = Annotated[
    str | None,
    typer.Option(
        "--prediction-type",
        help=PREDICTION_HELP,
        callback=_prediction_type,
        rich_help_panel=PANEL_META,
    ),
]
ShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--data-shape", metavar="D|C,H,W", help="Sample shape.", rich_help_panel=PANEL_META
    ),
]
EvalDataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="An .npy/.npz file, an image folder or a built-in set (moons, swiss_roll, gmm, "
        "shapes). Default: the checkpoint's reference samples.",
        autocompletion=complete_data,
    ),
]
LearnedOpt = Annotated[
    bool | None,
    typer.Option(
        "--learned-variance/--fixed-variance",
        help="Whether the output carries a variance channel (default: inferred).",
        rich_help_panel=PANEL_META,
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-program",
        help="Load TorchScript checkpoints, which run their own code when loaded: only for files "
        "you trust (also DDPM_TRUST_PROGRAM=1).",
    ),
]

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        metavar="MODULE:FACTORY",
        help="Your own architecture: FACTORY in an importable module (pkg.nets:make) or a file "
        "(adapters/mine.py:make) is called with the checkpoint path and a safe weight loader and "
        "returns the nn.Module (and optionally its metadata: num_classes and null_label make it "
        "class-conditional). Importing that module runs its code, your explicit choice; the "
        "weights are still read without running any.",
    ),
]

PANEL_CONDITIONING = "Conditioning (class-conditional and latent models)"
ClassLabelOpt = Annotated[
    str | None,
    typer.Option(
        "--class-label",
        metavar="K|A-B|all|random|null",
        help="Labels of a class-conditional model: K for every sample; A-B (or all) cycling by "
        "sample index; random, drawn from --seed and the sample index; null, the unconditional "
        "label. Labels follow the sample, not the batch. Default: the null label.",
        rich_help_panel=PANEL_CONDITIONING,
    ),
]
GuidanceOpt = Annotated[
    float | None,
    typer.Option(
        "--guidance-scale",
        metavar="S",
        help="Classifier-free guidance: null + S (label - null), the two passes in one model "
        "call; 1 (default) is the conditional model alone, one pass.",
        rich_help_panel=PANEL_CONDITIONING,
    ),
]
PromptOpt = Annotated[
    str | None,
    typer.Option(
        "--prompt",
        metavar="TEXT",
        help="The prompt of a text-conditional (Stable Diffusion-style) model; default empty. "
        "The text encoder runs once per prompt; --guidance-scale guides against the empty one.",
        rich_help_panel=PANEL_CONDITIONING,
    ),
]
TimeIdsOpt = Annotated[
    str | None,
    typer.Option(
        "--time-ids",
        metavar="H,W,TOP,LEFT,H,W",
        help="An SDXL-style model's added time ids: original height, width, crop top, left, "
        "target height, width in pixels (a refiner's: ..., aesthetic score); default the image "
        "size of the data shape, no crop.",
        rich_help_panel=PANEL_CONDITIONING,
    ),
]
MaxSequenceLengthOpt = Annotated[
    int | None,
    typer.Option(
        "--max-sequence-length",
        metavar="N",
        help="T5 tokens an SD3 or Flux model's prompt encoding reads, as diffusers' "
        "max_sequence_length; default the pipeline's (SD3 256, Flux 512); at most 512.",
        rich_help_panel=PANEL_CONDITIONING,
    ),
]
DecodeOpt = Annotated[
    bool,
    typer.Option(
        "--decode",
        help="A latent model: also the error of the VAE-decoded x0_hat against the image "
        "(mse_image, psnr_image); decodes every (sample, t) pair.",
        rich_help_panel=PANEL_CONDITIONING,
    ),
]


def conditioning_options(
    class_label: str | None, guidance_scale: float | None, seed: int = 0,
    prompt: str | None = None, time_ids: str | None = None,
    max_sequence_length: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """--class-label, --guidance-scale, --prompt, --time-ids, --max-sequence-length (and --seed
    for random labels) as keyword arguments for `checkpoints.load_checkpoint`."""
    return {
        "class_label": class_label,
        "guidance_scale": guidance_scale,
        "label_seed": seed,
        "prompt": prompt,
        **({"time_ids": time_ids} if time_ids is not None else {}),
        **({} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}),
    }


# ---------------------------------------------------------------------------------------------
# parsers


def _parse_int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not an integer") from None


def parse_t_selection(spec: str | None, num_steps: int, *, flag: str = "--t") -> list[int]:
    """Indices selected by a `--t` spec, in the order given (duplicates dropped), all in
    [0, num_steps). None selects every index."""
    allowed = f"allowed: 0..{num_steps - 1}"
    if spec is None:
        return list(range(num_steps))
    picked: list[int] = []
    seen: set[int] = set()

    def check(value: int, item: str) -> int:
        if not 0 <= value < num_steps:
            where = "" if item == str(value) else f" (in {item!r})"  # `--t 60`, said once
            raise UsageError(f"{flag} {value}{where} is out of range; {allowed}")
        return value

    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise UsageError(f"{flag}: empty item in {spec!r}; {allowed}")
        if ":" in item:
            parts = item.split(":")
            if len(parts) > 3:
                raise UsageError(f"{flag}: {item!r} is not start:stop[:step]")
            start = check(_parse_int(parts[0], flag), item) if parts[0] else 0
            stop = _parse_int(parts[1], flag) if parts[1] else num_steps
            if not 0 <= stop <= num_steps:
                raise UsageError(
                    f"{flag} stop {stop} (in {item!r}) is out of range; allowed: 0..{num_steps}"
                )
            step = _parse_int(parts[2], flag) if len(parts) == 3 and parts[2] else 1
            if step < 1:
                raise UsageError(f"{flag}: step {step} in {item!r} must be >= 1")
            values: Iterable[int] = range(start, stop, step)
        elif re.fullmatch(r"\d+\s*-\s*\d+", item):
            first, last = (int(p) for p in item.split("-"))
            check(first, item)
            check(last, item)
            if last < first:
                raise UsageError(
                    f"{flag}: range {item!r} runs backwards; write it as {last}-{first}"
                )
            values = range(first, last + 1)
        else:
            values = [check(_parse_int(item, flag), item)]
        for value in values:
            if value not in seen:
                seen.add(value)
                picked.append(value)
    return picked


def select_rows(spec: str | None, every: int | None, num_steps: int) -> list[int]:
    """Indices from `--t` or `--every` (the two conflict), all of them when neither is given."""
    from ddpmcli import limits

    reject_conflicts(("--t", spec is not None), ("--every", every is not None))
    if every is not None:
        limits.check_count(every, "every")
        rows: Sequence[int] = range(0, num_steps, every)
    else:
        rows = range(num_steps) if spec is None else parse_t_selection(spec, num_steps)
    try:
        limits.check_allocation(len(rows) * limits.ROW_BYTES, f"printing {len(rows)} rows")
    except UsageError as exc:
        raise UsageError(f"{exc}; select fewer with --t or --every") from None
    return list(rows)


def select_columns(
    spec: str | None, available: Sequence[str], default: Sequence[str] | None = None
) -> list[str]:
    """Columns named by `--columns a,b` (in that order), each one of ``available``; None gives
    ``default`` (or all of ``available``)."""
    if spec is None:
        return list(available if default is None else default)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise UsageError(f"--columns: no column named; allowed: {', '.join(available)}")
    unknown = [name for name in names if name not in available]
    if unknown:
        raise UsageError(
            f"--columns: unknown column {unknown[0]!r}; allowed: {', '.join(available)}"
        )
    return list(dict.fromkeys(names))


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """A `--data-shape` value, `D` or `C,H,W` (`x` also separates), as a tuple; None stays None."""
    if text is None:
        return None
    from ddpmcli import limits

    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--data-shape {text!r}: want D or C,H,W (integers)") from None
    return limits.check_sample_shape(shape, "--data-shape")


def loader_options(
    kind: str | None,
    timesteps: int | None,
    prediction_type: str | None,
    data_shape: str | None,
    learned_variance: bool | None = None,
    trust_program: bool = False,
    model: str | None = None,
) -> dict[str, Any]:
    """The metadata flags (--kind, -T, --prediction-type, --data-shape, --learned-variance),
    --trust-program and --model as keyword arguments for `checkpoints.load_checkpoint`; None
    leaves a field to the checkpoint (and trust to DDPM_TRUST_PROGRAM). ``model`` is a key only
    when given, so a caller may also pass ``model=`` to the loader itself."""
    factory = {} if model is None else {"model": model}
    return {
        **factory,
        "kind": kind,
        "timesteps": timesteps,
        "prediction_type": prediction_type,
        "data_shape": parse_shape(data_shape),
        "learned_variance": learned_variance,
        "trust_program": True if trust_program else None,
    }


def reject_conflicts(*flags: tuple[str, bool]) -> None:
    """UsageError when more than one of the given (flag name, was given) pairs is set."""
    given = [name for name, present in flags if present]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} cannot be used together")


def check_format_flags(fmt: str, no_header: bool) -> None:
    """`--no-header` only makes sense for csv/tsv (or auto, which is TSV when piped)."""
    if no_header and fmt not in ("auto", "csv", "tsv"):
        raise UsageError(f"--no-header applies to csv/tsv output, not --format {fmt}")


def resolve_plot_path(value: str | None, command: str) -> Path | None:
    """The figure path for `--plot [PATH]`, checked for suffix and writability before any work.

    None (no `--plot`) gives None; a bare `--plot` gives `plots/<command>.png`.
    """
    if value is None:
        return None
    path = PLOT_FOLDER / f"{command}.png" if value in (PLOT_DEFAULT, "") else Path(value)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise plot_suffix_error(str(path))
    from ddpmcli.files import check_writable

    # the default folder plots/ is ours to create; a folder the user names must exist
    return check_writable(path, what="plot", create_parents=value in (PLOT_DEFAULT, ""))


def parse_key_values(items: Sequence[str] | None, flag: str = "--param") -> dict[str, float]:
    """`name=value` pairs (repeatable `--param s=0.01`) as floats."""
    params: dict[str, float] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"{flag} {item!r}: expected name=value")
        try:
            params[name] = float(value)
        except ValueError:
            raise UsageError(f"{flag} {item!r}: {value!r} is not a number") from None
    return params


def samples_from(n: int, source: str) -> str:
    """How a run names its data on stderr: ``256 samples of moons``, ``256 of the checkpoint's
    reference samples`` (not "256 samples of reference samples")."""
    if source == "reference samples":
        return f"{n} of the checkpoint's reference samples"
    return f"{n} samples of {source}"


def warn_respacing(schedule: Any, spacing: str | None) -> None:
    """Wherever ``--steps N`` spreads a schedule with ``spacing`` (schedule, posterior, sample),
    the warning `ddpm check` reports as ``respacing_skips_last_t``, in the same words, when the
    steps never visit t = T-1 (issue 20: one rule, one warning). Other grids say nothing."""
    from ddpmcli.choices import SPACINGS

    if spacing not in SPACINGS or getattr(schedule, "path", "vp") != "vp":
        return
    from ddpmcli.checks import check_respacing
    from ddpmcli.output import warn

    for finding in check_respacing(schedule, spacing, probe=False):
        warn(finding.render(flag_name))


def flag_name(parameter: str) -> str:
    """The CLI flag of a library parameter: ``batch_size`` -> ``--batch-size``."""
    return "--" + parameter.replace("_", "-")


@contextlib.contextmanager
def as_flags(**flags: str) -> Iterator[None]:
    """Re-raise library errors that name parameters (``errors.ParameterError``, or any error
    built with ``DdpmError.naming``) naming our flags: ``flags`` maps a parameter to its flag
    where the two differ (``source="--data"``); the error boundary maps the rest by name."""
    from ddpmcli.errors import DdpmError, ParameterError

    try:
        yield
    except DdpmError as exc:
        if exc.template is None:
            raise
        shown = exc.render(lambda p: flags.get(p) or flag_name(p))
        if isinstance(exc, ParameterError):
            raise UsageError(shown) from None
        exc.args, exc.template = (shown,), None
        raise


def join_ranks(device: str) -> tuple[Any, str]:
    """Under torchrun (``WORLD_SIZE > 1``): join the process group and give this rank's device
    (``cuda`` becomes ``cuda:LOCAL_RANK``). One process: ``device`` unchanged, nothing imported
    beyond :mod:`ddpmcli.run.distributed`."""
    from ddpmcli.run.distributed import current
    from ddpmcli.run.runtime import resolve_device

    ranks = current()
    if not ranks.active:
        return ranks, device
    return ranks, str(ranks.device(resolve_device(device)))


def use_threads(threads: int | None, model: Any, ranks: Any) -> int:
    """Set torch's CPU threads: ``--threads``, else the default for this model and machine
    (:func:`ddpmcli.run.runtime.default_threads`). Returns the count in force."""
    from ddpmcli.run.runtime import apply_threads, default_threads, model_work

    if threads is None:
        numel = 1
        for d in getattr(model, "data_shape", ()):
            numel *= int(d)
        work = model_work(getattr(model, "denoiser", model), numel)
        threads = default_threads(work, local_world=ranks.local_world)
    return apply_threads(threads)
