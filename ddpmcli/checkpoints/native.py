"""The native format: a plain dict of tensors and containers, read with torch's safe loader."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ddpmcli import core, models
from ddpmcli.checkpoints.loaded import LoadedModel, load_state, loaded_model, module_mover
from ddpmcli.checkpoints.meta import (
    FORMAT_TAG,
    FORMAT_VERSION,
    _finish,
    _merge,
    _Meta,
    _parse_meta,
    _plain,
    checkpoint_metadata,
)
from ddpmcli.checkpoints.sizes import checked_build
from ddpmcli.checkpoints.unpickler import safe_torch_load
from ddpmcli.errors import CheckpointError
from ddpmcli.files import atomic_write


def load_native(p: Path, given: _Meta) -> LoadedModel:
    """A native checkpoint (what ``ddpm train`` writes): its dict checked, its metadata merged
    with ``given``, its network rebuilt from the architecture and hparams and its weights fitted."""
    where = str(p)
    obj = _native_dict(p, where)
    meta = _merge(_parse_meta(obj, where), given)
    finished = _finish(meta, where, flags_hint=False)
    shape = finished[3]
    arch = str(obj["architecture"])
    module, hparams = _native_network(obj, arch, shape, where)
    refs = meta.reference_samples
    if refs is not None and tuple(refs.shape[1:]) != shape:
        raise CheckpointError(
            f"{where}: reference samples have shape {list(refs.shape[1:])}, "
            f"data shape is {list(shape)}"
        )
    info = {
        "format": "native",
        "format_version": obj["version"],
        "architecture": arch,
        "hparams": hparams,
        "parameters": models.count_parameters(module),
        "training": _training(obj.get("training"), where),
    }
    return loaded_model(
        module,
        finished,
        info,
        references=None if refs is None else refs.to(torch.float32),
        mover=module_mover(module),
    )


def _training(value: Any, where: str) -> dict[str, Any]:
    """The ``training`` record: a dict of plain values (numbers, text, flags, lists of them)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{where}: training must be a dict, got {type(value).__name__}")
    plain = (str, int, float, bool, type(None))
    for key, item in value.items():
        items = item if isinstance(item, list | tuple) else [item]
        if not isinstance(key, str) or not all(isinstance(v, plain) for v in items):
            raise CheckpointError(
                f"{where}: training.{key} must be a number, text or a list of them, got "
                f"{type(item).__name__}"
            )
    return dict(value)


def _native_dict(p: Path, where: str) -> Mapping[str, Any]:
    """The checkpoint's dict, read by the restricted unpickler: our format tag, a version this
    ddpm reads, and the keys a network needs."""
    obj = safe_torch_load(p, where)
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
    return obj


def _native_network(
    obj: Mapping[str, Any], arch: str, shape: tuple[int, ...], where: str
) -> tuple[nn.Module, dict[str, Any]]:
    """The built-in network ``arch`` with the checkpoint's hparams and weights (in eval mode),
    refused when the hparams do not fit the data shape."""
    hparams = dict(obj["hparams"]) if isinstance(obj["hparams"], Mapping) else None
    if hparams is None:
        raise CheckpointError(f"{where}: hparams must be a dict")
    try:
        module = checked_build(
            lambda: models.build_model(arch, hparams), f"the {arch} network its hparams describe"
        )
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
    load_state(module, state, where)
    module.eval()
    return module, hparams


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
