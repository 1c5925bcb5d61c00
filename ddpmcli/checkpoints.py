"""One loader for every checkpoint format, returning one :class:`LoadedModel`.

Formats (detected from the file, not its name):

- **native** ``ckpt.pt``: a plain dict written by :func:`save_native_checkpoint`, read with
  ``torch.load(weights_only=True)``::

      {"format": "ddpmcli", "version": 1,
       "architecture": "mlp" | "unet", "hparams": {...},  # models.build_model(arch, hparams)
       "state_dict": {name: tensor},
       "schedule": Schedule.spec dict (or {"betas": float64 tensor}),
       "prediction_type": "epsilon" | "sample" | "v_prediction",
       "learned_variance": bool,                           # output [prediction, v] along dim 1
       "data_shape": [2] | [C, H, W], "data_range": [lo, hi],
       "reference_samples": tensor [N, *data_shape] | None,
       "training": {...}}                                   # steps, loss, seed, command, ...

- **TorchScript** (``torch.jit.save``) and **torch.export** (``.pt2``) programs called as
  ``program(x_t, t)``, with the same metadata (everything but state_dict/architecture) as JSON in a
  ``ddpm.json`` extra file, or a sidecar ``<file>.ddpm.json``, or given to the loader (CLI flags).
- **diffusers** pipeline folder (``unet/``, ``scheduler/``) or bare unet folder (``config.json``
  + ``diffusion_pytorch_model.safetensors`` or ``.bin``), with ``pip install 'ddpmcli[diffusers]'``.
  Weights are read with safetensors or ``torch.load(weights_only=True)``, offline.

A checkpoint never runs code: a pickle that needs any class beyond tensors and plain containers is
refused. Every failure is one :class:`~ddpmcli.errors.CheckpointError` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ddpmcli import core, models
from ddpmcli.errors import CheckpointError, DdpmError, UsageError
from ddpmcli.output import atomic_write

__all__ = [
    "FORMAT_TAG",
    "FORMAT_VERSION",
    "METADATA_NAME",
    "LoadedModel",
    "checkpoint_metadata",
    "detect_format",
    "load_checkpoint",
    "save_exported_program",
    "save_native_checkpoint",
    "save_torchscript",
]

FORMAT_TAG = "ddpmcli"
FORMAT_VERSION = 1
METADATA_NAME = "ddpm.json"  # TorchScript / torch.export extra file
SIDECAR_SUFFIX = ".ddpm.json"  # or beside the file: model.pt -> model.pt.ddpm.json
DIFFUSERS_HINT = "pip install 'ddpmcli[diffusers]'"

Denoiser = Callable[[Tensor, Tensor], Tensor]
_Mover = Callable[[torch.device, "torch.dtype | None"], Denoiser]


@dataclass
class LoadedModel:
    """A checkpoint in any format, as the diagnostics use it.

    ``denoiser(x_t, t)`` takes ``x_t`` ``[B, *data_shape]`` and ``t`` int64 ``[B]`` *model*
    timesteps (for a respaced schedule, ``schedule.timesteps[i]``) and returns the raw output: the
    prediction
    (``prediction_type``), with the variance values ``v`` appended along dim 1 when
    ``learned_variance``. ``schedule`` is the training schedule, float64.
    """

    denoiser: Denoiser
    schedule: core.Schedule
    prediction_type: str
    learned_variance: bool
    data_shape: tuple[int, ...]
    data_range: tuple[float, float]
    reference_samples: Tensor | None
    info: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    _mover: _Mover | None = field(default=None, repr=False)

    def predict(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(prediction, v)``: the model output split along dim 1; ``v`` is None unless learned.

        ``v`` is improved-diffusion's variance interpolation value (nominally in [-1, 1]) for
        ``core.Schedule.model_log_variance("learned_range", ...)``.
        """
        out = self.denoiser(x_t, t.to(device=x_t.device, dtype=torch.long))
        if not self.learned_variance:
            return out, None
        channels = out.shape[1] // 2
        return out[:, :channels], out[:, channels:]

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> LoadedModel:
        """The same model on ``device`` in ``dtype`` (a new object; the schedule stays float64)."""
        dev = self.device if device is None else torch.device(device)
        if self._mover is None:
            raise CheckpointError("this model cannot be moved (no mover)")
        denoiser = self._mover(dev, dtype)
        return dataclasses.replace(
            self, denoiser=denoiser, device=dev, dtype=self.dtype if dtype is None else dtype
        )


# ---------------------------------------------------------------------------------------------
# metadata shared by every format


@dataclass
class _Meta:
    schedule: core.Schedule | None = None
    prediction_type: str | None = None
    learned_variance: bool | None = None
    data_shape: tuple[int, ...] | None = None
    data_range: tuple[float, float] | None = None
    reference_samples: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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
    except DdpmError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    refs = raw.get("reference_samples")
    if refs is not None:
        if not isinstance(refs, Tensor):
            try:
                refs = torch.tensor(refs, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise CheckpointError(f"{where}: reference_samples is not an array") from None
        meta.reference_samples = refs
    return meta


def _schedule_from_stored(value: Any, where: str) -> core.Schedule:
    if isinstance(value, Tensor):
        return core.schedule_from_betas(value.to(torch.float64))
    if isinstance(value, Mapping):
        if "kind" not in value and "betas" in value:
            return core.schedule_from_betas(_f64(value["betas"]))
        return core.schedule_from_spec(value)
    raise CheckpointError(f"{where}: schedule must be a schedule spec dict or a tensor of betas")


def _f64(values: Any) -> Tensor:
    return (
        values.to(torch.float64)
        if isinstance(values, Tensor)
        else torch.tensor(values, dtype=torch.float64)
    )


def _shape(value: Any, where: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: data_shape {value!r} is not a list of integers") from None
    if not shape or any(d < 1 for d in shape) or len(shape) not in (1, 3):
        raise CheckpointError(f"{where}: data_shape {list(shape)} must be [D] or [C, H, W]")
    return shape


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
    """Metadata given by the caller (command-line flags): bad values are usage errors."""
    if schedule is None and kind is not None:
        schedule = core.make_schedule(kind, 1000 if timesteps is None else timesteps)
    shape = None
    if data_shape is not None:
        shape = tuple(int(d) for d in data_shape)
        if len(shape) not in (1, 3) or any(d < 1 for d in shape):
            raise UsageError(f"--data-shape {list(shape)}: want D or C,H,W with positive sizes")
    if data_range is not None and not data_range[0] < data_range[1]:
        raise UsageError(f"--data-range {list(data_range)}: low must be below high")
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
    ):
        value = getattr(given, name)
        setattr(merged, name, value if value is not None else getattr(file_meta, name))
    return merged


# ---------------------------------------------------------------------------------------------
# the loader


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    schedule: core.Schedule | None = None,
    kind: str | None = None,
    timesteps: int | None = None,
    prediction_type: str | None = None,
    learned_variance: bool | None = None,
    data_shape: Sequence[int] | None = None,
    data_range: tuple[float, float] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    check: bool = True,
) -> LoadedModel:
    """Load a checkpoint of any supported format as a :class:`LoadedModel`.

    Args:
        path: a native or TorchScript ``.pt``, a ``torch.export`` ``.pt2``, or a diffusers folder.
        schedule, kind, timesteps: the training schedule, for programs without metadata (``kind``
            builds ``core.make_schedule(kind, timesteps or 1000)``); overrides the file's.
        prediction_type, learned_variance, data_shape, data_range: likewise.
        device, dtype: where and in which dtype the model runs (schedule math stays float64).
        check: run one dummy forward pass to check the output shape against ``data_shape``.

    Raises:
        CheckpointError: one line saying what is wrong (or which flag to pass).
    """
    p = Path(path)
    given = _overrides(
        schedule, kind, timesteps, prediction_type, learned_variance, data_shape, data_range
    )
    fmt = detect_format(p)
    if fmt == "native":
        loaded = _load_native(p, given)
    elif fmt == "torchscript":
        loaded = _load_torchscript(p, given)
    elif fmt == "export":
        loaded = _load_exported(p, given)
    else:
        loaded = _load_diffusers(p, given)
    loaded.info.setdefault("path", str(p))
    loaded.info.setdefault("file_size", _size(p))
    if device != "cpu" or dtype not in (None, torch.float32):
        loaded = loaded.to(device, dtype)
    if check:
        _check_output_shape(loaded, str(p))
    return loaded


def detect_format(path: Path) -> str:
    """``native``, ``torchscript``, ``export`` or ``diffusers``, from the file's contents."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        return "diffusers"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if head[:2] != b"PK":
        # not a zip: a legacy torch.save pickle or something else; torch.load tells us which
        return "native"
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint (its zip archive cannot be read)"
        ) from None
    if any(n.split("/", 1)[-1].startswith("code/") for n in names):
        return "torchscript"
    if any(n.endswith("archive_format") for n in names):
        return "export"
    return "native"


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _check_output_shape(loaded: LoadedModel, where: str) -> None:
    """One forward pass on zeros: the output must be [1, C, ...] or [1, 2C, ...] as declared."""
    x = torch.zeros((1, *loaded.data_shape), device=loaded.device, dtype=loaded.dtype)
    t = torch.zeros((1,), dtype=torch.long, device=loaded.device)
    try:
        with torch.inference_mode():
            out = loaded.denoiser(x, t)
    except Exception as exc:  # the model's own error: shape mismatch inside it, most likely
        raise CheckpointError(
            f"{where}: the model fails on inputs of data shape {list(loaded.data_shape)} "
            f"({_one_line(exc)}); pass the right --data-shape"
        ) from None
    want = list(x.shape)
    if (
        loaded.info.get("learned_variance_inferred")
        and isinstance(out, Tensor)
        and list(out.shape) == [want[0], 2 * want[1], *want[2:]]
    ):
        # no metadata said either way: twice the channels can only be (prediction, v)
        loaded.learned_variance = True
    if loaded.learned_variance:
        want[1] *= 2
    if not isinstance(out, Tensor) or list(out.shape) != want:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        hint = ""
        if isinstance(out, Tensor) and out.ndim == len(want) and out.shape[2:] == x.shape[2:]:
            if out.shape[1] == 2 * x.shape[1] and not loaded.learned_variance:
                hint = " (twice the channels: pass --learned-variance)"
        raise CheckpointError(
            f"{where}: model output shape {got} does not match data shape "
            f"{list(loaded.data_shape)} (expected {want}){hint}"
        )


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def _finish(
    meta: _Meta, where: str, flags_hint: bool
) -> tuple[core.Schedule, str, bool, tuple[int, ...], tuple[float, float]]:
    """Required metadata or one error naming the flags to pass."""
    missing = []
    if meta.schedule is None:
        missing.append("--kind (and --timesteps)")
    if meta.prediction_type is None:
        missing.append("--prediction-type")
    if meta.data_shape is None:
        missing.append("--data-shape")
    if missing:
        how = f"pass {', '.join(missing)}" if flags_hint else "it is missing"
        raise CheckpointError(
            f"{where}: no {', '.join(m.split()[0].lstrip('-') for m in missing)} in the "
            f"checkpoint's metadata; {how} (or add a {METADATA_NAME} extra file or a "
            f"{where}{SIDECAR_SUFFIX} sidecar)"
        )
    schedule, pred, shape = meta.schedule, meta.prediction_type, meta.data_shape
    if schedule is None or pred is None or shape is None:  # unreachable: checked above (for mypy)
        raise CheckpointError(f"{where}: incomplete metadata")
    return schedule, pred, bool(meta.learned_variance), shape, meta.data_range or (-1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# native


def _safe_torch_load(source: Path | io.BytesIO, where: str) -> Any:
    """``torch.load(weights_only=True)`` with every failure as one CheckpointError line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise CheckpointError(
                f"{where}: refused to load: the file needs the Python object {found.group(1)}, "
                "and a checkpoint may hold only tensors and plain containers (ddpm never runs code "
                "from a checkpoint)"
            ) from None
        raise CheckpointError(
            f"{where}: not a torch checkpoint (unreadable, truncated or unsupported content)"
        ) from None
    except Exception as exc:  # the safe unpickler raises many types on garbage (IndexError, ...)
        if isinstance(source, Path) and not zipfile.is_zipfile(source):
            # not torch's zip container: an old-style pickle, or not a checkpoint at all
            raise CheckpointError(
                f"{where}: not a torch checkpoint (unreadable, truncated or unsupported content)"
            ) from None
        raise CheckpointError(
            f"{where}: truncated or corrupt checkpoint ({_one_line(exc)[:120]})"
        ) from None


def _load_native(p: Path, given: _Meta) -> LoadedModel:
    where = str(p)
    obj = _safe_torch_load(p, where)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{where}: not a ddpmcli checkpoint (holds a {type(obj).__name__}, not a dict)"
        )
    if obj.get("format") != FORMAT_TAG:
        looks_like_state_dict = bool(obj) and all(isinstance(v, Tensor) for v in obj.values())
        extra = (
            " (a bare state dict: save it with ddpm's architecture and metadata)"
            if (looks_like_state_dict)
            else ""
        )
        raise CheckpointError(
            f"{where}: not a ddpmcli checkpoint (no format tag {FORMAT_TAG!r}){extra}"
        )
    version = obj.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{where}: checkpoint format version {version!r} is not supported (this ddpm reads "
            f"version {FORMAT_VERSION}; upgrade ddpmcli)"
        )
    for key in ("architecture", "hparams", "state_dict"):
        if key not in obj:
            raise CheckpointError(f"{where}: native checkpoint lacks {key!r}")
    meta = _merge(_parse_meta(obj, where), given)
    schedule, pred, learned, shape, rng = _finish(meta, where, flags_hint=False)
    arch = str(obj["architecture"])
    hparams = dict(obj["hparams"]) if isinstance(obj["hparams"], Mapping) else None
    if hparams is None:
        raise CheckpointError(f"{where}: hparams must be a dict")
    try:
        module = models.build_model(arch, hparams)
        fitted = models.default_hparams(arch, shape)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    clash = {
        k: v
        for k, v in fitted.items()
        if k in hparams and k != "learned_variance" and hparams[k] is not None and hparams[k] != v
    }
    if clash:
        held = ", ".join(f"{k}={hparams[k]}" for k in clash)
        raise CheckpointError(
            f"{where}: data shape {list(shape)} does not fit the {arch} network ({held})"
        )
    state = obj["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}: state_dict must be a dict of tensors")
    _load_state(module, state, where)
    module.eval()
    refs = meta.reference_samples
    if refs is not None and tuple(refs.shape[1:]) != shape:
        raise CheckpointError(
            f"{where}: reference samples have shape {list(refs.shape[1:])}, "
            f"data shape is {list(shape)}"
        )
    info = {
        "format": "native",
        "format_version": version,
        "architecture": arch,
        "hparams": hparams,
        "parameters": models.count_parameters(module),
        "training": dict(obj.get("training") or {}),
    }
    return LoadedModel(
        denoiser=module,
        schedule=schedule,
        prediction_type=pred,
        learned_variance=learned,
        data_shape=shape,
        data_range=rng,
        reference_samples=None if refs is None else refs.to(torch.float32),
        info=info,
        _mover=_module_mover(module),
    )


def _load_state(module: nn.Module, state: Mapping[str, Any], where: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        raise CheckpointError(
            f"{where}: state dict does not match the architecture: {', '.join(parts)} keys"
        )
    for key, value in state.items():
        if not isinstance(value, Tensor) or value.shape != own[key].shape:
            got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(
                f"{where}: state dict does not match the architecture: {key!r} has shape {got}, "
                f"the model wants {list(own[key].shape)}"
            )
    module.load_state_dict(dict(state), strict=True)


def _module_mover(module: nn.Module) -> _Mover:
    def move(device: torch.device, dtype: torch.dtype | None) -> Denoiser:
        moved = module.to(device=device) if dtype is None else module.to(device=device, dtype=dtype)
        return moved

    return move


def save_native_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    architecture: str,
    hparams: Mapping[str, Any],
    schedule: core.Schedule,
    prediction_type: str,
    data_shape: Sequence[int],
    learned_variance: bool = False,
    data_range: tuple[float, float] = (-1.0, 1.0),
    reference_samples: Tensor | None = None,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write a native checkpoint atomically (temporary file + rename); returns the path.

    The file holds only tensors and plain containers, so ``torch.load(weights_only=True)`` reads it.
    """
    if architecture not in models.ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {architecture!r}")
    payload: dict[str, Any] = checkpoint_metadata(
        schedule,
        prediction_type,
        data_shape,
        learned_variance=learned_variance,
        data_range=data_range,
    )
    payload.update(
        architecture=architecture,
        hparams=_plain(dict(hparams)),
        state_dict={k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
        reference_samples=None
        if reference_samples is None
        else reference_samples.detach().to("cpu", torch.float32).clone(),
        training=_plain(dict(training or {})),
    )
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


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


# ---------------------------------------------------------------------------------------------
# TorchScript and torch.export


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* are deprecated in torch 2.x; still supported
        yield


def _sidecar_meta(p: Path, embedded: str | bytes | None, where: str) -> _Meta:
    text: str | bytes | None = embedded if embedded else None
    sidecar = p.with_name(p.name + SIDECAR_SUFFIX)
    if sidecar.exists():
        try:
            text = sidecar.read_text(encoding="utf-8")
        except OSError as exc:
            raise CheckpointError(f"{sidecar}: cannot read ({exc.strerror or exc})") from None
        where = str(sidecar)
    if not text:
        return _Meta()
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: {METADATA_NAME} is not valid JSON ({exc})") from None
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{where}: {METADATA_NAME} must hold a JSON object")
    return _parse_meta(raw, where)


def _load_torchscript(p: Path, given: _Meta) -> LoadedModel:
    where = str(p)
    extra = {METADATA_NAME: ""}
    try:
        with _quiet_deprecation():
            module = torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    except (RuntimeError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{where}: corrupt TorchScript archive ({_one_line(exc)[:120]})"
        ) from None
    module.eval()
    meta = _merge(_sidecar_meta(p, extra.get(METADATA_NAME), where), given)
    schedule, pred, learned, shape, rng = _finish(meta, where, flags_hint=True)
    info = {
        "format": "torchscript",
        "learned_variance_inferred": meta.learned_variance is None,
        "architecture": getattr(module, "original_name", "TorchScript"),
        "parameters": sum(t.numel() for t in module.parameters()),
    }
    return LoadedModel(
        denoiser=module,
        schedule=schedule,
        prediction_type=pred,
        learned_variance=learned,
        data_shape=shape,
        data_range=rng,
        reference_samples=meta.reference_samples,
        info=info,
        _mover=_module_mover(module),
    )


def _load_exported(p: Path, given: _Meta) -> LoadedModel:
    where = str(p)
    extra: dict[str, Any] = {METADATA_NAME: ""}
    try:
        with _quiet_deprecation():
            program = torch.export.load(str(p), extra_files=extra)
    except Exception as exc:  # torch.export raises many types for a bad archive
        raise CheckpointError(
            f"{where}: corrupt torch.export archive ({_one_line(exc)[:120]})"
        ) from None
    meta = _merge(_sidecar_meta(p, extra.get(METADATA_NAME), where), given)
    schedule, pred, learned, shape, rng = _finish(meta, where, flags_hint=True)
    module = program.module()
    static_batch = _static_batch(program)
    program_dtype = _program_dtype(program)

    def mover(device: torch.device, dtype: torch.dtype | None) -> Denoiser:
        # An exported graph bakes its dtypes in, so it keeps its own and we cast at the boundary.
        module.to(device)
        return _ExportedDenoiser(module, static_batch, program_dtype)

    info = {
        "format": "export",
        "learned_variance_inferred": meta.learned_variance is None,
        "architecture": "torch.export program",
        "parameters": sum(t.numel() for t in program.state_dict.values()),
    }
    if static_batch is not None:
        info["static_batch"] = static_batch
    return LoadedModel(
        denoiser=_ExportedDenoiser(module, static_batch, program_dtype),
        schedule=schedule,
        prediction_type=pred,
        learned_variance=learned,
        data_shape=shape,
        data_range=rng,
        reference_samples=meta.reference_samples,
        info=info,
        _mover=mover,
    )


class _ExportedDenoiser:
    """Calls an exported program: casts to its dtype, and splits/pads to a static batch size."""

    def __init__(self, module: Any, static_batch: int | None, dtype: torch.dtype) -> None:
        self.module = module
        self.static_batch = static_batch
        self.dtype = dtype

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        out_dtype = x.dtype
        x = x.to(self.dtype)
        if self.static_batch is None or x.shape[0] == self.static_batch:
            return self.module(x, t).to(out_dtype)
        b = self.static_batch
        outs = []
        for start in range(0, x.shape[0], b):
            xs, ts = x[start : start + b], t[start : start + b]
            n = xs.shape[0]
            if n < b:  # pad the last chunk by repeating its first sample
                xs = torch.cat([xs, xs[:1].expand(b - n, *xs.shape[1:])])
                ts = torch.cat([ts, ts[:1].expand(b - n)])
            outs.append(self.module(xs, ts)[:n])
        return torch.cat(outs).to(out_dtype)


def _static_batch(program: Any) -> int | None:
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            val = node.meta.get("val")
            if val is not None and hasattr(val, "shape") and len(val.shape) > 0:
                first = val.shape[0]
                return int(first) if isinstance(first, int) else None
    return None


def _program_dtype(program: Any) -> torch.dtype:
    for value in program.state_dict.values():
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.dtype
    return torch.float32


def save_torchscript(
    model: nn.Module | torch.jit.ScriptModule,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Script ``model`` (unless scripted) and save it, with ``metadata`` as ``ddpm.json``."""
    with _quiet_deprecation():
        scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.script(model)
        files = {METADATA_NAME: json.dumps(dict(metadata))} if metadata is not None else {}
        return atomic_write(
            path, lambda tmp: torch.jit.save(scripted, str(tmp), _extra_files=files)
        )


def save_exported_program(
    model: nn.Module,
    path: str | os.PathLike[str],
    example: tuple[Tensor, Tensor],
    metadata: Mapping[str, Any] | None = None,
    *,
    dynamic_batch: bool = True,
) -> Path:
    """``torch.export`` ``model`` at ``example`` inputs (batch dynamic) and save it as ``.pt2``."""
    dynamic: Any = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic = ({0: batch}, {0: batch})
    program = torch.export.export(model, example, dynamic_shapes=dynamic)
    files = {METADATA_NAME: json.dumps(dict(metadata))} if metadata is not None else None
    return atomic_write(path, lambda tmp: torch.export.save(program, str(tmp), extra_files=files))


# ---------------------------------------------------------------------------------------------
# diffusers

_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)


def _diffusers_layout(p: Path) -> tuple[Path, Path | None]:
    """(unet folder, scheduler_config.json or None) of a pipeline or bare unet folder."""
    if (p / "unet" / "config.json").is_file():
        unet_dir = p / "unet"
    elif (p / "config.json").is_file():
        unet_dir = p
    else:
        raise CheckpointError(
            f"{p}: not a diffusers folder (no unet/config.json or config.json); a folder must be a "
            "diffusers pipeline or unet"
        )
    candidates = [
        p / "scheduler" / "scheduler_config.json",
        p / "scheduler_config.json",
        unet_dir.parent / "scheduler" / "scheduler_config.json",
    ]
    return unet_dir, next((c for c in candidates if c.is_file()), None)


@contextlib.contextmanager
def _offline_quiet() -> Iterator[None]:
    """No network, no log noise, no progress bars while diffusers is in use."""
    saved = {
        k: os.environ.get(k)
        for k in ("HF_HUB_OFFLINE", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")
    }
    os.environ.update(
        HF_HUB_OFFLINE="1", DIFFUSERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _import_diffusers() -> Any:
    try:
        with _offline_quiet():
            import diffusers
            from diffusers.utils import logging as dlogging
    except ImportError:
        raise CheckpointError(
            f"loading a diffusers folder needs the optional extra: {DIFFUSERS_HINT}"
        ) from None
    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    return diffusers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({_one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    return raw


def _read_diffusers_weights(unet_dir: Path) -> dict[str, Tensor]:
    index = [
        unet_dir / f"diffusion_pytorch_model.{ext}.index.json" for ext in ("safetensors", "bin")
    ]
    files: list[Path] = []
    for idx in index:
        if idx.is_file():
            weight_map = _read_json(idx).get("weight_map", {})
            files = [unet_dir / name for name in sorted(set(weight_map.values()))]
            break
    else:
        first = next((unet_dir / n for n in _WEIGHT_NAMES if (unet_dir / n).is_file()), None)
        if first is None:
            raise CheckpointError(
                f"{unet_dir}: no weights (diffusion_pytorch_model.safetensors or .bin) "
                "in the unet folder"
            )
        files = [first]
    state: dict[str, Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise CheckpointError(
                    f"reading {f.name} needs safetensors: {DIFFUSERS_HINT}"
                ) from None
            try:
                state.update(load_file(str(f), device="cpu"))
            except Exception as exc:  # safetensors raises its own SafetensorError
                raise CheckpointError(
                    f"{f}: truncated or corrupt safetensors file ({_one_line(exc)})"
                ) from None
        else:
            loaded = _safe_torch_load(f, str(f))
            if not isinstance(loaded, Mapping):
                raise CheckpointError(f"{f}: not a state dict")
            state.update(loaded)
    return state


def _load_diffusers(p: Path, given: _Meta) -> LoadedModel:
    where = str(p)
    unet_dir, scheduler_file = _diffusers_layout(p)
    diffusers = _import_diffusers()
    config = _read_json(unet_dir / "config.json")
    class_name = str(config.get("_class_name", "UNet2DModel"))
    if class_name != "UNet2DModel":
        raise CheckpointError(
            f"{where}: diffusers model {class_name} is not supported "
            "(only the unconditional UNet2DModel)"
        )
    if config.get("class_embed_type") or config.get("num_class_embeds"):
        raise CheckpointError(f"{where}: class-conditional UNet2DModel is not supported")
    with _offline_quiet():
        try:
            unet = diffusers.UNet2DModel.from_config(config)
        except Exception as exc:
            raise CheckpointError(
                f"{unet_dir / 'config.json'}: bad UNet2DModel config ({_one_line(exc)})"
            ) from None
        state = _read_diffusers_weights(unet_dir)
        _load_state(unet, state, where)
    unet.eval()

    file_meta = _Meta()
    if scheduler_file is not None:
        file_meta = _diffusers_scheduler_meta(scheduler_file)
    in_ch = int(unet.config.in_channels)
    out_ch = int(unet.config.out_channels)
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    file_meta.data_shape = (in_ch, h, w)
    file_meta.learned_variance = out_ch == 2 * in_ch
    file_meta.data_range = (-1.0, 1.0)
    meta = _merge(file_meta, given)
    schedule, pred, learned, shape, rng = _finish(meta, where, flags_hint=True)
    info = {
        "format": "diffusers",
        "architecture": class_name,
        "parameters": models.count_parameters(unet),
        "diffusers_version": getattr(diffusers, "__version__", "?"),
        "scheduler_config": None if scheduler_file is None else str(scheduler_file),
    }
    return LoadedModel(
        denoiser=_DiffusersDenoiser(unet),
        schedule=schedule,
        prediction_type=pred,
        learned_variance=learned,
        data_shape=shape,
        data_range=rng,
        reference_samples=None,
        info=info,
        _mover=lambda d, dt: _DiffusersDenoiser(unet.to(device=d, dtype=dt)),
    )


class _DiffusersDenoiser:
    """``unet(x_t, t).sample`` as a plain callable."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        out: Tensor = self.unet(x, t, return_dict=False)[0]
        return out


def _diffusers_scheduler_meta(path: Path) -> _Meta:
    """Schedule and prediction type from a scheduler_config.json (read by ddpmcli.configs)."""
    from ddpmcli import configs  # lazily: only diffusers folders need it

    try:
        config = configs.load_scheduler_config(path)
    except DdpmError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return _Meta(
        schedule=config.schedule,
        prediction_type=core.canonical_prediction_type(config.prediction_type),
        extra={"variance_type": config.variance_type, "clip_sample": config.clip_sample},
    )
