"""Checkpoint metadata shared by every format: what the file says, what the caller gives, merged.

The fields (schedule, prediction type, learned variance, data shape and range, reference samples)
come from a native checkpoint's dict, a program's ``ddpm.json`` extra file or sidecar, a diffusers
scheduler config, or the caller (command-line flags, which win). ``_Meta.extra`` keeps what a
format knows beyond them (a diffusers scheduler's ``timestep_spacing`` and ``steps_offset``), and
the loader copies it into ``LoadedModel.info``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ddpmcli import core, limits
from ddpmcli.errors import CheckpointError, DdpmError, ParameterError, verbatim

FORMAT_TAG = "ddpmcli"
FORMAT_VERSION = 1
METADATA_NAME = "ddpm.json"  # TorchScript / torch.export extra file
SIDECAR_SUFFIX = ".ddpm.json"  # or beside the file: model.pt -> model.pt.ddpm.json


@dataclass
class _Meta:
    schedule: core.Schedule | None = None
    prediction_type: str | None = None
    learned_variance: bool | None = None
    data_shape: tuple[int, ...] | None = None
    data_range: tuple[float, float] | None = None
    reference_samples: Tensor | None = None
    variance: str | None = None  # the reverse variance its trainer evaluated with (an adapter's)
    extra: dict[str, Any] = field(default_factory=dict)
    shape_from_data: tuple[int, ...] | None = None  # the --data's sample shape: used only when
    # neither the file nor the caller gives a data shape


def checkpoint_metadata(
    schedule: core.Schedule,
    prediction_type: str,
    data_shape: Sequence[int],
    *,
    learned_variance: bool = False,
    data_range: tuple[float, float] = (-1.0, 1.0),
    **extra: Any,
) -> dict[str, Any]:
    """The JSON-able metadata dict stored in native checkpoints and ``ddpm.json`` files."""
    return {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "schedule": schedule.spec,
        "prediction_type": core.canonical_prediction_type(prediction_type),
        "learned_variance": bool(learned_variance),
        "data_shape": [int(d) for d in data_shape],
        "data_range": [float(data_range[0]), float(data_range[1])],
        **extra,
    }


def _parse_meta(raw: Mapping[str, Any], where: str) -> _Meta:
    """Validate metadata from a file; every problem is one CheckpointError naming ``where``."""
    meta = _Meta()
    try:
        if raw.get("schedule") is not None:
            meta.schedule = _schedule_from_stored(raw["schedule"], where)
        if raw.get("prediction_type") is not None:
            meta.prediction_type = core.canonical_prediction_type(str(raw["prediction_type"]))
        if raw.get("learned_variance") is not None:
            meta.learned_variance = bool(raw["learned_variance"])
        if raw.get("data_shape") is not None:
            meta.data_shape = _shape(raw["data_shape"], where)
        if raw.get("data_range") is not None:
            meta.data_range = _range(raw["data_range"], where)
        if raw.get("variance") is not None:
            meta.variance = _variance(raw["variance"])
    except DdpmError as exc:  # named once: some of these already say where
        text = str(exc)
        raise CheckpointError(
            text if text.startswith(f"{where}: ") else f"{where}: {text}"
        ) from None
    refs = raw.get("reference_samples")
    if refs is not None:
        if not isinstance(refs, Tensor):
            try:
                refs = torch.tensor(refs, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise CheckpointError(f"{where}: reference_samples is not an array") from None
        if refs.ndim < 2 or refs.shape[0] < 1:
            raise CheckpointError(
                f"{where}: reference_samples of shape {list(refs.shape)} hold no samples"
            )
        if refs.is_floating_point() and not bool(torch.isfinite(refs).all()):
            bad = int((~torch.isfinite(refs)).sum())
            raise CheckpointError(f"{where}: reference_samples hold {bad} NaN or infinite value(s)")
        meta.reference_samples = refs
    return meta


def _variance(value: Any) -> str:
    """A declared reverse variance: one of ``core.VARIANCE_TYPES``."""
    if value not in core.VARIANCE_TYPES:
        raise CheckpointError(
            f"variance {value!r} is unknown; allowed: {', '.join(core.VARIANCE_TYPES)}"
        )
    return str(value)


def _schedule_from_stored(value: Any, where: str) -> core.Schedule:
    """A stored schedule, its length checked before any per-t array is built."""
    if isinstance(value, Tensor | list | tuple):  # betas, as a tensor or a plain list
        _check_length(value, "schedule")
        return core.schedule_from_betas(_f64(value))
    if isinstance(value, Mapping):
        if "kind" not in value and "betas" in value:
            _check_length(value["betas"], "schedule.betas")
            return core.schedule_from_betas(_f64(value["betas"]))
        for name in ("betas", "alpha_bars", "alpha_t", "sigma_t", "model_timestep"):
            if name in value:  # a path's arrays (core.schedule_from_path's spec) too
                _check_length(value[name], f"schedule.{name}")
        if "timesteps" in value:
            steps = value["timesteps"]
            steps = int(steps) if isinstance(steps, float) and steps.is_integer() else steps
            limits.check_timesteps(steps, "schedule.timesteps", error=CheckpointError)
        _check_spec_schema(value)
        try:
            return core.schedule_from_spec(value)
        except (TypeError, ValueError, OverflowError, AttributeError, KeyError) as exc:
            raise CheckpointError(f"schedule: not a valid schedule spec ({exc})") from None
    raise CheckpointError(
        f"{where}: schedule must be a schedule spec dict or a tensor (or list) of betas"
    )


def _check_spec_schema(value: Mapping[str, Any]) -> None:
    """The types of a stored schedule spec's fields, checked at the edge (one line each)."""
    kind = value.get("kind")
    if "kind" in value and not isinstance(kind, str):
        raise CheckpointError(f"schedule.kind must be a name, got {type(kind).__name__}")
    params = value.get("params", {})
    if not isinstance(params, Mapping):
        raise CheckpointError(
            f"schedule.params must be a dict of numbers, got {type(params).__name__}"
        )
    for name, number in params.items():
        if not _is_finite_number(number):
            shown = repr(number) if len(repr(number)) < 40 else f"{type(number).__name__} ..."
            raise CheckpointError(f"schedule.params.{name} must be a finite number, got {shown}")


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer past float range (10**400)
        return False


def _check_length(values: Any, field_name: str) -> None:
    if isinstance(values, (Tensor, list, tuple)):
        limits.check_timesteps(max(len(values), 1), f"{field_name} length", error=CheckpointError)


def _f64(values: Any) -> Tensor:
    return (
        values.to(torch.float64)
        if isinstance(values, Tensor)
        else torch.tensor(values, dtype=torch.float64)
    )


def _shape(value: Any, where: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{where}: data_shape {value!r} is not a list of integers") from None
    if not shape or any(d < 1 for d in shape) or len(shape) not in (1, 3):
        raise CheckpointError(f"{where}: data_shape {list(shape)} must be [D] or [C, H, W]")
    check_data_shape(shape, f"{where}: data_shape", CheckpointError)
    return shape


def check_data_shape(shape: Sequence[int], what: str, error: type[DdpmError]) -> None:
    """One sample of ``shape`` must be a sane size and a small batch of it must fit
    (:func:`ddpmcli.limits.check_sample_shape`)."""
    limits.check_sample_shape(tuple(shape), what, error=error)


def _range(value: Any, where: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: data_range {value!r} is not [low, high]") from None
    if not lo < hi:
        raise CheckpointError(f"{where}: data_range [{lo}, {hi}] must have low < high")
    return lo, hi


def _overrides(
    schedule: core.Schedule | None,
    kind: str | None,
    timesteps: int | None,
    prediction_type: str | None,
    learned_variance: bool | None,
    data_shape: Sequence[int] | None,
    data_range: tuple[float, float] | None,
) -> _Meta:
    """Metadata given by the caller (the CLI: flags): bad values are ParameterErrors (exit 2)
    naming the parameter."""
    if schedule is None and kind is not None:
        if timesteps is not None:
            limits.check_timesteps(timesteps, "{timesteps}", error=ParameterError)
        schedule = core.make_schedule(kind, 1000 if timesteps is None else timesteps)
    shape = None
    if data_shape is not None:
        shape = limits.check_sample_shape(tuple(data_shape), "{data_shape}", error=ParameterError)
    if data_range is not None and not data_range[0] < data_range[1]:
        raise ParameterError(f"{{data_range}} {list(data_range)}: low must be below high")
    return _Meta(
        schedule=schedule,
        prediction_type=None
        if prediction_type is None
        else core.canonical_prediction_type(prediction_type),
        learned_variance=learned_variance,
        data_shape=shape,
        data_range=data_range,
    )


def _merge(file_meta: _Meta, given: _Meta) -> _Meta:
    """Values given by the caller win over the file's."""
    merged = _Meta(extra=dict(file_meta.extra))
    for name in (
        "schedule",
        "prediction_type",
        "learned_variance",
        "data_shape",
        "data_range",
        "reference_samples",
        "shape_from_data",
        "variance",
    ):
        value = getattr(given, name)
        setattr(merged, name, value if value is not None else getattr(file_meta, name))
    return merged


def _finish(
    meta: _Meta, where: str, flags_hint: bool
) -> tuple[core.Schedule, str, bool, tuple[int, ...], tuple[float, float]]:
    """Required metadata or one error naming the parameters to pass (the CLI: its flags)."""
    missing: list[tuple[str, str]] = []  # (what is missing, the parameters that give it)
    if meta.schedule is None:
        missing.append(("kind", "{kind} (and {timesteps})"))
    if meta.prediction_type is None:
        missing.append(("prediction-type", "{prediction_type}"))
    if meta.data_shape is None:
        meta.data_shape = meta.shape_from_data
    if meta.data_shape is None:
        missing.append(("data-shape", "{data_shape}"))
    if missing:
        how = f"pass {', '.join(m[1] for m in missing)}" if flags_hint else "it is missing"
        raise CheckpointError.naming(
            f"{verbatim(where)}: no {', '.join(m[0] for m in missing)} in the checkpoint's "
            f"metadata; {how} (or add a {METADATA_NAME} extra file or a "
            f"{verbatim(where)}{SIDECAR_SUFFIX} sidecar)"
        )
    schedule, pred, shape = meta.schedule, meta.prediction_type, meta.data_shape
    if schedule is None or pred is None or shape is None:  # unreachable: checked above (for mypy)
        raise CheckpointError(f"{where}: incomplete metadata")
    return schedule, pred, bool(meta.learned_variance), shape, meta.data_range or (-1.0, 1.0)


def _plain(value: Any) -> Any:
    """Only JSON-like values (what weights_only unpickling allows), tensors kept."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor) or value is None:
        return value
    for kind in (bool, int, float, str):  # plain builtins only (torch.__version__ is a subclass)
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def _sidecar_meta(p: Path, embedded: str | bytes | None, where: str) -> _Meta:
    """Metadata from ``<file>.ddpm.json`` beside ``p`` (it wins), else the embedded extra file."""
    text: str | bytes | None = embedded if embedded else None
    sidecar = p.with_name(p.name + SIDECAR_SUFFIX)
    if os.path.lexists(sidecar):
        raw = limits.read_json(sidecar, "metadata sidecar", error=CheckpointError)
        where = str(sidecar)
    elif not text:
        return _Meta()
    else:
        raw = limits.parse_json(text, f"{where}: {METADATA_NAME}", error=CheckpointError)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{where}: {METADATA_NAME} must hold a JSON object")
    return _parse_meta(raw, where)
