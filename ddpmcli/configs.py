"""Schedule inputs that come from files: diffusers ``scheduler_config.json`` and custom
betas / alpha_bars files, built into a schedule by :func:`build_schedule` (the compare specs that
name schedules in one string are in :mod:`ddpmcli.specs`).

The core never touches files; this module reads them and hands plain numbers to the core
(``make_schedule``, ``schedule_from_betas``, ``rescale_zero_terminal_snr``, ...). No formula is
re-derived here. torch is imported only inside functions (through the core), numpy only for .npy.

diffusers equivalence: diffusers builds its betas in float32 (``torch.linspace`` in float32,
``betas_for_alpha_bar`` rounded to float32) and takes ``alphas_cumprod`` as a float32 cumulative
product. The same named schedule built here in float64 agrees with diffusers' ``alphas_cumprod`` to
float32 precision (a few parts in 1e6 relative, the float32 cumprod's own rounding), and is the
more accurate of the two. ``trained_betas`` are taken as given (in float64).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ddpmcli import limits
from ddpmcli.errors import ParameterError, ScheduleError, UsageError, check_choice, verbatim

if TYPE_CHECKING:
    from ddpmcli.core import Schedule

# diffusers' beta_schedule names -> core kinds (the core registry's alias table maps
# squaredcos_cap_v2 -> cosine; these four are the ones DDPMScheduler builds).
DIFFUSERS_BETA_SCHEDULES: tuple[str, ...] = (
    "linear",
    "scaled_linear",
    "squaredcos_cap_v2",
    "sigmoid",
)
# Kinds whose core constants include beta_start/beta_end (diffusers ignores them for the cosine).
_USES_BETA_ENDS = ("linear", "scaled_linear", "sigmoid")
# DDPMScheduler's __init__ defaults, used for keys a config leaves out.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
CONFIG_NAMES: tuple[str, ...] = ("scheduler_config.json", "scheduler/scheduler_config.json")
CUSTOM_SUFFIXES: tuple[str, ...] = (".npy", ".txt", ".csv", ".tsv", ".json")
MAX_SCHEDULE_FILE_BYTES: int = 64 * 1024**2
"""Size limit of a custom schedule file (text, table or .npy): 64 MiB."""

What = Literal["betas", "alpha_bars"]


@dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers scheduler config turned into a core Schedule plus the settings samplers need.

    ``schedule`` has T = ``num_train_timesteps`` steps, 0-based as the model takes them.
    ``raw`` keeps every key of the file (e.g. ``_class_name``, ``thresholding``) untouched.
    ``declared_timesteps`` is the file's own ``num_train_timesteps``, which differs from
    ``num_train_timesteps`` when ``trained_betas`` has another length (``ddpm check`` reports it).
    """

    path: Path
    schedule: Schedule
    beta_schedule: str
    num_train_timesteps: int
    prediction_type: str
    timestep_spacing: str
    steps_offset: int
    rescale_betas_zero_snr: bool
    clip_sample: bool
    clip_sample_range: float
    variance_type: str
    class_name: str | None
    raw: Mapping[str, Any] = field(repr=False)
    declared_timesteps: int | None = None

    def respaced(self, steps: int | str, spacing: str | None = None) -> Schedule:
        """The schedule respaced to ``steps`` inference steps with this config's spacing and
        steps_offset (diffusers' ``set_timesteps``), unless ``spacing`` overrides it."""
        from ddpmcli import core

        return core.respaced(
            self.schedule, steps, spacing or self.timestep_spacing, self.steps_offset
        )


# ---------------------------------------------------------------------------------------------
# diffusers scheduler_config.json


def find_scheduler_config(path: str | Path) -> Path:
    """The config file itself, or ``scheduler_config.json`` / ``scheduler/scheduler_config.json``
    inside a folder (a scheduler folder or a whole pipeline)."""
    p = Path(path)
    if p.is_dir():
        for name in CONFIG_NAMES:
            if (p / name).is_file():
                return p / name
        raise ScheduleError(f"{p}: no {' or '.join(CONFIG_NAMES)} in this folder")
    return limits.check_regular_file(p, "scheduler config", error=ScheduleError)


def _read_json(path: Path) -> Any:
    return limits.read_json(path, "scheduler config", error=ScheduleError)


def _typed(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    value = raw.get(key, DIFFUSERS_DEFAULTS.get(key))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool:
        raise ScheduleError(f"{path}: {key} = {value!r} should be a {_type_name(kind)}")
    if not isinstance(value, kind):
        raise ScheduleError(f"{path}: {key} = {value!r} should be a {_type_name(kind)}")
    return value


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _config_schedule(raw: Mapping[str, Any], file: Path, big_t: int) -> Schedule:
    """The schedule a config's ``trained_betas`` or ``beta_schedule`` (with its beta ends) names,
    before ``rescale_betas_zero_snr``."""
    from ddpmcli import core

    trained = raw.get("trained_betas")
    if trained is not None:
        if not isinstance(trained, list):
            raise ScheduleError(f"{file}: trained_betas should be a list of numbers")
        if not trained:
            raise ScheduleError(f"{file}: trained_betas is empty")
        limits.check_timesteps(len(trained), f"{file}: trained_betas length", error=ScheduleError)
        return core.schedule_from_betas(trained, name="trained_betas")
    beta_schedule = _typed(raw, "beta_schedule", str, file)
    if beta_schedule not in DIFFUSERS_BETA_SCHEDULES:
        raise ScheduleError(
            f"{file}: beta_schedule {beta_schedule!r} is not supported; "
            f"allowed: {', '.join(DIFFUSERS_BETA_SCHEDULES)} (or trained_betas)"
        )
    kind = core.canonical_kind(beta_schedule)
    params: dict[str, float] = {}
    if kind in _USES_BETA_ENDS:
        params["beta_start"] = _typed(raw, "beta_start", float, file)
        params["beta_end"] = _typed(raw, "beta_end", float, file)
    return core.make_schedule(kind, big_t, zero_terminal_snr=False, logsnr_shift=0.0, **params)


def load_scheduler_config(path: str | Path) -> SchedulerConfig:
    """Read a diffusers ``scheduler_config.json`` (or a folder holding one) into the same schedule
    diffusers builds: ``beta_schedule`` linear | scaled_linear | squaredcos_cap_v2 | sigmoid, or
    ``trained_betas``; then ``rescale_betas_zero_snr`` (Lin et al. 2024, Algorithm 1).

    Missing keys take DDPMScheduler's defaults. Any problem with the file -> ScheduleError (exit 1)
    naming the file and the key.
    """
    from ddpmcli import core

    file = find_scheduler_config(path)
    raw = _read_json(file)
    if not isinstance(raw, dict):
        raise ScheduleError(f"{file}: expected a JSON object of scheduler settings")

    big_t = _typed(raw, "num_train_timesteps", int, file)
    limits.check_timesteps(big_t, f"{file}: num_train_timesteps", error=ScheduleError)
    beta_schedule = _typed(raw, "beta_schedule", str, file)
    zsnr = _typed(raw, "rescale_betas_zero_snr", bool, file)
    trained = raw.get("trained_betas")
    try:
        schedule = _config_schedule(raw, file, big_t)
        if zsnr:
            schedule = core.rescale_zero_terminal_snr(schedule)
        prediction_type = core.canonical_prediction_type(_typed(raw, "prediction_type", str, file))
    except ScheduleError as exc:
        message = str(exc)
        raise ScheduleError(
            message if message.startswith(str(file)) else f"{file}: {message}"
        ) from None

    spacing = _typed(raw, "timestep_spacing", str, file)
    if spacing not in core.SPACINGS:
        raise ScheduleError(
            f"{file}: timestep_spacing {spacing!r} is not supported; "
            f"allowed: {', '.join(core.SPACINGS)}"
        )
    steps_offset = _typed(raw, "steps_offset", int, file)
    if steps_offset < 0:
        raise ScheduleError(f"{file}: steps_offset = {steps_offset} must be >= 0")
    class_name = raw.get("_class_name")
    return SchedulerConfig(
        path=file,
        schedule=schedule,
        beta_schedule="trained_betas" if trained is not None else beta_schedule,
        num_train_timesteps=schedule.num_train_timesteps,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        rescale_betas_zero_snr=zsnr,
        clip_sample=_typed(raw, "clip_sample", bool, file),
        clip_sample_range=_typed(raw, "clip_sample_range", float, file),
        variance_type=str(raw.get("variance_type") or DIFFUSERS_DEFAULTS["variance_type"]),
        class_name=class_name if isinstance(class_name, str) else None,
        raw=dict(raw),
        declared_timesteps=big_t,
    )


# ---------------------------------------------------------------------------------------------
# custom betas / alpha_bars files


_COLUMN_NAMES: dict[str, tuple[str, ...]] = {
    "betas": ("betas", "beta"),
    "alpha_bars": ("alpha_bars", "alpha_bar", "alphas_cumprod"),
}


def _parse_number(text: str, path: Path, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ScheduleError(f"{path}: {where}: {text.strip()!r} is not a number") from None


def _numbers_from_text(text: str, path: Path) -> list[float]:
    values: list[float] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].replace(",", " ").split()
        values.extend(_parse_number(tok, path, f"line {lineno}") for tok in content)
    return values


def _numbers_from_table(text: str, path: Path, what: What, delimiter: str) -> list[float]:
    rows = [
        row
        for row in csv.reader(io.StringIO(text), delimiter=delimiter)
        if any(c.strip() for c in row)
    ]
    if not rows:
        return []
    header = [cell.strip() for cell in rows[0]]
    column = 0
    body = rows
    if any(_is_word(cell) for cell in header):
        names = _COLUMN_NAMES[what]
        matches = [i for i, name in enumerate(header) if name in names]
        if matches:
            column = matches[0]
        elif len(header) == 1:
            column = 0
        else:
            raise ScheduleError(
                f"{path}: no {what} column; header has {', '.join(header)} "
                f"(name one column {' or '.join(names)})"
            )
        body = rows[1:]
    elif len(header) != 1:
        raise ScheduleError(
            f"{path}: {len(header)} columns and no header; give one number per line, or a header "
            f"naming the {_COLUMN_NAMES[what][0]} column"
        )
    values = []
    for lineno, row in enumerate(body, start=len(rows) - len(body) + 1):
        if column >= len(row):
            raise ScheduleError(f"{path}: line {lineno} has no column {column + 1}")
        values.append(_parse_number(row[column], path, f"line {lineno}"))
    return values


def _is_word(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return True
    return False


def _numbers_from_json(data: Any, path: Path, what: What) -> list[float]:
    names = _COLUMN_NAMES[what]
    if isinstance(data, dict):
        key = next((name for name in names if name in data), None)
        if key is None:
            raise ScheduleError(f"{path}: expected a list or an object with key {names[0]!r}")
        data = data[key]
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        # rows as `ddpm schedule --format json` prints them
        key = next((name for name in names if name in data[0]), None)
        if key is None:
            raise ScheduleError(f"{path}: rows have no {names[0]!r} or {names[1]!r} key")
        data = [item.get(key) for item in data]
    if not isinstance(data, list):
        raise ScheduleError(f"{path}: expected a list of numbers")
    values = []
    for i, item in enumerate(data):
        if item is None:
            values.append(math.nan)  # null is how JSON writers spell nan/inf; reported below
        elif isinstance(item, int | float) and not isinstance(item, bool):
            values.append(float(item))
        elif isinstance(item, str):
            values.append(_parse_number(item, path, f"index {i}"))
        else:
            raise ScheduleError(f"{path}: index {i}: {item!r} is not a number")
    return values


def _numbers_from_npy(path: Path) -> list[float]:
    """The numbers of a 1-D numeric .npy file, its header checked against the file size before
    any array is allocated (a header may claim 10^12 rows)."""
    import numpy as np

    data = limits.read_bytes(
        path, "schedule file", limit=MAX_SCHEDULE_FILE_BYTES, error=ScheduleError
    )
    stream = io.BytesIO(data)
    shape, dtype = limits.npy_header(stream, len(data), str(path), error=ScheduleError)
    if len(shape) != 1:
        raise ScheduleError(f"{path}: expected a 1-D numeric array, got shape {shape} {dtype}")
    limits.check_timesteps(shape[0], f"{path}: array length", error=ScheduleError)
    array = np.frombuffer(data, dtype=dtype, count=shape[0], offset=stream.tell())
    return [float(x) for x in array.tolist()]


def read_numbers(path: str | Path, what: What = "betas") -> list[float]:
    """The numbers of a custom schedule file: .npy (1-D), .txt (one per line, `#` comments),
    .csv/.tsv (one column, or a header naming the column), .json (a list, or {"betas": [...]})."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in CUSTOM_SUFFIXES:
        raise ScheduleError(
            f"{p}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"allowed: {', '.join(CUSTOM_SUFFIXES)}"
        )
    limits.check_regular_file(p, "schedule file", error=ScheduleError)
    if suffix == ".npy":
        return _numbers_from_npy(p)
    data = limits.read_bytes(p, "schedule file", limit=MAX_SCHEDULE_FILE_BYTES, error=ScheduleError)
    if suffix == ".json":
        return _numbers_from_json(limits.parse_json(data, str(p), error=ScheduleError), p, what)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ScheduleError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    if suffix == ".txt":
        return _numbers_from_text(text, p)
    return _numbers_from_table(text, p, what, "," if suffix == ".csv" else "\t")


def load_custom_schedule(path: str | Path, what: What = "betas") -> Schedule:
    """A custom schedule from a file of betas or alpha_bars (see :func:`read_numbers`).

    NaN/Inf, betas outside (0, 1], alpha_bars outside [0, 1) or not strictly decreasing ->
    ScheduleError (exit 1) naming the file and the bad index (0-based).
    """
    from ddpmcli import core

    if what not in _COLUMN_NAMES:
        raise UsageError(f"what must be betas or alpha_bars, got {what!r}")
    values = read_numbers(path, what)
    if not values:
        raise ScheduleError(f"{path}: no numbers in file")
    limits.check_timesteps(len(values), f"{path}: number of {what}", error=ScheduleError)
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise ScheduleError(
                f"{path}: {what} index {i} is {value!r}; every value must be finite"
            )
    name = f"custom:{Path(path).name}"
    try:
        if what == "betas":
            return core.schedule_from_betas(values, name=name)
        return core.schedule_from_alpha_bars(values, name=name)
    except ScheduleError as exc:
        raise ScheduleError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# building a schedule from options (shared by the commands and by compare specs)


@dataclass
class ScheduleRequest:
    """Everything that picks a schedule on the command line or in a compare spec.

    Exactly one source: ``kind`` (a core kind or alias, or ``custom`` with a betas/alpha_bars file),
    ``from_file`` (a diffusers config). Transforms apply in order: zero terminal SNR, log-SNR shift,
    respacing to ``steps``.
    """

    kind: str | None = None
    timesteps: int | None = None
    params: dict[str, float] = field(default_factory=dict)
    from_file: str | None = None
    betas_file: str | None = None
    alpha_bars_file: str | None = None
    zero_terminal_snr: bool = False
    logsnr_shift: float = 0.0
    steps: str | None = None
    spacing: str | None = None
    steps_offset: int | None = None


@dataclass(frozen=True)
class BuiltSchedule:
    """A schedule with where it came from: the diffusers config (if any), and whether respaced."""

    schedule: Schedule
    config: SchedulerConfig | None = None
    respaced: bool = False


def _check_request(request: ScheduleRequest) -> str | None:
    """Refuse conflicting schedule choices (ParameterError naming the parameters, exit 2) before
    any file is read; the kind, lower-cased, or None."""
    from ddpmcli import core

    sources = ("from_file", "betas_file", "alpha_bars_file")
    given = ["{" + name + "}" for name in sources if getattr(request, name) is not None]
    if len(given) > 1:
        raise ParameterError(f"{' and '.join(given)} cannot be used together")
    kind = (request.kind or "").strip().lower() or None
    file_given = request.betas_file is not None or request.alpha_bars_file is not None
    if file_given and kind not in (None, "custom"):
        raise ParameterError(
            f"{given[0]} builds a custom schedule; it cannot be combined with "
            f"{{kind}} {verbatim(kind)}"
        )
    if kind == "custom" and not file_given:
        raise ParameterError("{kind} custom needs {betas_file} FILE or {alpha_bars_file} FILE")
    if request.from_file is not None and kind is not None:
        raise ParameterError(f"{{from_file}} and {{kind}} {verbatim(kind)} cannot be used together")
    if (request.from_file is not None or file_given) and (
        request.timesteps is not None or request.params
    ):
        what = "{timesteps}" if request.timesteps is not None else "schedule parameters"
        raise ParameterError(
            f"{what} cannot be combined with {given[0]} (the file fixes the schedule)"
        )
    for name in ("steps_offset", "spacing"):
        if getattr(request, name) is not None and request.steps is None:
            raise ParameterError(f"{{{name}}} needs {{steps}}")
    if request.spacing is not None:
        check_choice(request.spacing, core.SPACINGS, "spacing")
    return kind


def build_schedule(request: ScheduleRequest) -> BuiltSchedule:
    """Turn a request into a schedule through the core, rejecting conflicting choices first."""
    from ddpmcli import core

    kind = _check_request(request)
    config: SchedulerConfig | None = None
    if request.from_file is not None:
        config = load_scheduler_config(request.from_file)
        schedule = config.schedule
    elif request.betas_file is not None:
        schedule = load_custom_schedule(request.betas_file, "betas")
    elif request.alpha_bars_file is not None:
        schedule = load_custom_schedule(request.alpha_bars_file, "alpha_bars")
    else:
        timesteps = 1000 if request.timesteps is None else request.timesteps
        limits.check_timesteps(timesteps, "{timesteps}", error=ParameterError)
        schedule = core.make_schedule(
            kind or "linear", timesteps, zero_terminal_snr=False, logsnr_shift=0.0, **request.params
        )
    if request.zero_terminal_snr:
        if config is not None and config.rescale_betas_zero_snr:
            raise ParameterError(
                f"{verbatim(config.path)} already sets rescale_betas_zero_snr; "
                "drop {zero_terminal_snr}"
            )
        schedule = core.rescale_zero_terminal_snr(schedule)
    if request.logsnr_shift:
        schedule = core.shift_logsnr(schedule, request.logsnr_shift)
    respaced = request.steps is not None
    if request.steps is not None:
        spacing = request.spacing or (config.timestep_spacing if config else "leading")
        offset = request.steps_offset
        if offset is None:
            offset = config.steps_offset if config else 0
        steps: int | str = int(request.steps) if request.steps.strip().isdigit() else request.steps
        schedule = core.respaced(schedule, steps, spacing, offset)
    return BuiltSchedule(schedule=schedule, config=config, respaced=respaced)
