"""One loader for every checkpoint format, returning one :class:`LoadedModel`.

Formats (detected from the file, not its name), one module each:

- **native** ``ckpt.pt`` (:mod:`.native`): a plain dict written by :func:`save_native_checkpoint`,
  read with ``torch.load(weights_only=True)``::

      {"format": "ddpmcli", "version": 1,
       "architecture": "mlp" | "unet", "hparams": {...},  # models.build_model(arch, hparams)
       "state_dict": {name: tensor},
       "schedule": Schedule.spec dict (or {"betas": float64 tensor}),
       "prediction_type": "epsilon" | "sample" | "v_prediction",
       "learned_variance": bool,                           # output [prediction, v] along dim 1
       "data_shape": [2] | [C, H, W], "data_range": [lo, hi],
       "reference_samples": tensor [N, *data_shape] | None,
       "training": {...}}                                   # steps, loss, seed, command, ...

- **TorchScript** (``torch.jit.save``) and **torch.export** (``.pt2``) programs (:mod:`.programs`)
  called as ``program(x_t, t)``, with the same metadata (everything but state_dict/architecture)
  as JSON in a ``ddpm.json`` extra file, or a sidecar ``<file>.ddpm.json``, or given to the loader.
- **diffusers** pipeline folder (``unet/``, ``scheduler/``) or bare unet folder (:mod:`.diffusers`).
- **your own architecture** (``model="MODULE:FACTORY"``, :mod:`.user`): any file the factory reads.

Trust: a pickle that needs any class beyond tensors and plain containers is refused (native files
by torch's safe loader, every pickled ``.pt2`` member by :mod:`.unpickler` before torch reads the
archive). TorchScript is code, so it is loaded only with ``trust_program`` (or
``DDPM_TRUST_PROGRAM=1``). Every failure is one :class:`~ddpmcli.errors.CheckpointError` line.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ddpmcli import core, limits
from ddpmcli.checkpoints import conditioning
from ddpmcli.checkpoints.diffusers import DIFFUSERS_HINT, load_diffusers
from ddpmcli.checkpoints.loaded import Denoiser, LoadedModel, check_output_shape
from ddpmcli.checkpoints.meta import (
    FORMAT_TAG,
    FORMAT_VERSION,
    METADATA_NAME,
    SIDECAR_SUFFIX,
    _overrides,
    checkpoint_metadata,
)
from ddpmcli.checkpoints.native import load_native, save_native_checkpoint
from ddpmcli.checkpoints.programs import (
    TRUST_ENV,
    load_exported,
    load_torchscript,
    save_exported_program,
    save_torchscript,
    trust_from_env,
)
from ddpmcli.checkpoints.user import load_user_model, load_weights
from ddpmcli.errors import CheckpointError

__all__ = [
    "DIFFUSERS_HINT",
    "FORMAT_TAG",
    "FORMAT_VERSION",
    "METADATA_NAME",
    "SIDECAR_SUFFIX",
    "TRUST_ENV",
    "Denoiser",
    "LoadedModel",
    "checkpoint_metadata",
    "detect_format",
    "load_checkpoint",
    "load_weights",
    "save_exported_program",
    "save_native_checkpoint",
    "save_torchscript",
]


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
    shape_from_data: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    check: bool = True,
    trust_program: bool | None = None,
    inspect_only: bool = False,
    model: str | None = None,
    class_label: str | int | None = None,
    guidance_scale: float | None = None,
    label_seed: int = 0,
    prompt: str | None = None,
    time_ids: str | Sequence[float] | None = None,
    max_sequence_length: int | None = None,
) -> LoadedModel:
    """Load a checkpoint of any supported format as a :class:`LoadedModel`.

    Args:
        path: a native or TorchScript ``.pt``, a ``torch.export`` ``.pt2``, or a diffusers folder.
        schedule, kind, timesteps: the training schedule, for programs without metadata (``kind``
            builds ``core.make_schedule(kind, timesteps or 1000)``); overrides the file's.
        prediction_type, learned_variance, data_shape, data_range: likewise.
        shape_from_data: the sample shape of the data the model will see, used only when
            neither ``data_shape`` nor the file gives one (a program without metadata).
        device, dtype: where and in which dtype the model runs (schedule math stays float64);
            None keeps the weights' dtype (a diffusers folder stored in float16 stays float16).
        check: run one forward pass on a batch of distinct rows to check the output shape.
        trust_program: load TorchScript (which runs its own code); None reads
            ``DDPM_TRUST_PROGRAM``. Default: refused.
        inspect_only: read metadata and parameter shapes only and never run the model (no
            check; an untrusted TorchScript is read from its archive, and its denoiser refuses
            to run). What ``ddpm info`` uses.
        model: ``MODULE:FACTORY``, the user's own architecture (:mod:`.user`): the factory is
            imported and called with ``path`` and a safe weight loader, whatever the format.
        class_label, guidance_scale, label_seed: a class-conditional model's labels (``K``,
            ``A-B``, ``all``, ``random`` keyed by ``label_seed`` and the sample index, ``null``;
            default its null label) and classifier-free guidance scale (:mod:`.conditioning`).
        prompt: a text-conditional model's prompt (default empty; the text encoder runs once).
        time_ids: an SDXL-style model's added time ids, ``(original h, w, crop top, left, target
            h, w)`` in pixels (a refiner's: ``(..., aesthetic score)``); default: the image size
            of the data shape, no crop.
        max_sequence_length: the T5 tokens an SD3 or Flux model's prompt encoding reads, as
            diffusers' ``max_sequence_length`` (default the pipeline's: SD3 256, Flux 512; at
            most 512, as the pipelines allow).

    Raises:
        CheckpointError: one line saying what is wrong (or which flag to pass).
    """
    p = Path(path)
    given = _overrides(
        schedule, kind, timesteps, prediction_type, learned_variance, data_shape, data_range
    )
    if shape_from_data is not None:
        given.shape_from_data = tuple(int(d) for d in shape_from_data)
    trust = trust_from_env() if trust_program is None else trust_program
    fmt = "user" if model is not None else detect_format(p)  # a factory reads any file
    if fmt == "user" and model is not None:
        loaded = load_user_model(p, model, given, inspect_only=inspect_only)
    elif fmt == "native":
        loaded = load_native(p, given)
    elif fmt == "torchscript":
        loaded = load_torchscript(p, given, trust=trust, inspect_only=inspect_only)
    elif fmt == "export":
        loaded = load_exported(p, given)
    else:
        loaded = load_diffusers(p, given)
    loaded.info.setdefault("path", str(p))
    loaded.info.setdefault("file_size", _size(p))
    loaded = conditioning.attach(
        loaded, class_label, guidance_scale, label_seed, str(p), inspect_only=inspect_only,
        prompt=prompt, time_ids=time_ids, max_sequence_length=max_sequence_length,
    )  # fmt: skip
    if inspect_only:
        return loaded
    if device != "cpu" or dtype not in (None, loaded.dtype):  # None: the weights' own dtype
        loaded = loaded.to(device, dtype)
    if check and not getattr(loaded.denoiser, "checks_itself", False):  # SDXL/SD3/Flux: 1st call
        check_output_shape(loaded, str(p))
    return loaded


def detect_format(path: Path) -> str:
    """``native``, ``torchscript``, ``export`` or ``diffusers``, from the file's contents.

    A FIFO, device or socket is refused by ``os.stat`` before anything opens it.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        return "diffusers"
    limits.check_regular_file(path, "checkpoint", error=CheckpointError)
    try:
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            head = os.read(fd, 4)
        finally:
            os.close(fd)
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
