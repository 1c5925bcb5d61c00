"""Input data: .npy/.npz arrays, folders of PNG/JPEG images, and built-in synthetic sets.

Every loader returns a float tensor ``[N, *data_shape]`` in the model's value range (default
``[-1, 1]``). uint8 data (arrays or images) is mapped from ``[0, 255]``; float arrays are taken to
be in the model's range already. Built-in sets are deterministic by seed.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpmcli import limits
from ddpmcli.errors import DataError, ParameterError, look_up

__all__ = [
    "BUILTIN_DATASETS",
    "IMAGE_SUFFIXES",
    "BuiltinDataset",
    "GaussianMixture",
    "builtin_dataset",
    "gaussian_mixture",
    "get_data",
    "load_data",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_RANGE = (-1.0, 1.0)


class SampleShapeError(DataError):
    """Data whose samples have another shape (``shape``) than the model wants: a caller that
    takes two shapes (a latent model: images or latents) tries the other one."""

    def __init__(self, message: str, shape: tuple[int, ...]) -> None:
        super().__init__(message)
        self.shape = tuple(int(d) for d in shape)


# ---------------------------------------------------------------------------------------------
# built-in sets


@dataclass(frozen=True)
class GaussianMixture:
    """An isotropic Gaussian mixture: ``p(x) = sum_k w_k N(x; mu_k, s_k^2 I)``.

    ``weights`` [K], ``means`` [K, D], ``stds`` [K], all float64, so an exact Bayes-optimal denoiser
    (``E[x0 | x_t]``, a softmax-weighted mix of the per-component posterior means) can be computed.
    """

    weights: Tensor
    means: Tensor
    stds: Tensor


@dataclass(frozen=True)
class BuiltinDataset:
    """A built-in synthetic data set: its per-sample shape, value range and generator."""

    name: str
    summary: str
    data_shape: tuple[int, ...]
    data_range: tuple[float, float]
    generate: Callable[[int, torch.Generator], Tensor]  # (n, generator) -> float64 [n, *data_shape]


def _moons(n: int, gen: torch.Generator) -> Tensor:
    """Two interleaved half circles (scikit-learn's make_moons, noise 0.05), scaled into [-1, 1]."""
    n_upper = (n + 1) // 2
    which = torch.arange(n) < n_upper
    theta = torch.rand(n, generator=gen, dtype=torch.float64) * math.pi
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    lower = torch.stack([1.0 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1)
    x = torch.where(which[:, None], upper, lower)
    x = x + 0.05 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    # the moons span x in [-1, 2], y in [-0.5, 1]: centre and scale by 2/3 into about [-1, 1]
    x = (x - torch.tensor([0.5, 0.25], dtype=torch.float64)) / 1.5
    return x[torch.randperm(n, generator=gen)]


def _swiss_roll(n: int, gen: torch.Generator) -> Tensor:
    """The 2-D swiss roll (t cos t, t sin t), t in [1.5 pi, 4.5 pi], scaled into [-1, 1]."""
    t = 1.5 * math.pi * (1.0 + 2.0 * torch.rand(n, generator=gen, dtype=torch.float64))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    x = x + 0.3 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x / 15.0


_GMM_COMPONENTS = 8
_GMM_RADIUS = 0.7
_GMM_STD = 0.08


def gaussian_mixture(name: str = "gmm") -> GaussianMixture | None:
    """The exact mixture behind a built-in set (only ``gmm`` has one), else None."""
    if name != "gmm":
        return None
    angle = torch.arange(_GMM_COMPONENTS, dtype=torch.float64) * (2 * math.pi / _GMM_COMPONENTS)
    means = _GMM_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    weights = torch.full((_GMM_COMPONENTS,), 1.0 / _GMM_COMPONENTS, dtype=torch.float64)
    stds = torch.full((_GMM_COMPONENTS,), _GMM_STD, dtype=torch.float64)
    return GaussianMixture(weights=weights, means=means, stds=stds)


def _gmm(n: int, gen: torch.Generator) -> Tensor:
    """Eight equal Gaussians (std 0.08) on a circle of radius 0.7."""
    mix = gaussian_mixture("gmm")
    if mix is None:  # pragma: no cover - gaussian_mixture("gmm") always has one
        raise DataError("internal: gmm has no mixture")
    k = torch.multinomial(mix.weights, n, replacement=True, generator=gen)
    noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return mix.means[k] + mix.stds[k, None] * noise


_SHAPES_SIZE = 16


def _shapes(n: int, gen: torch.Generator) -> Tensor:
    """16x16 grey images: a bright disc, square or ring on a dark linear gradient, in [-1, 1]."""
    size = _SHAPES_SIZE
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def u(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, 1, 1, generator=gen, dtype=torch.float64)

    kind = torch.randint(0, 3, (n, 1, 1), generator=gen)
    cx, cy, radius = u(0.3, 0.7), u(0.3, 0.7), u(0.15, 0.3)
    angle = u(0.0, 2 * math.pi)
    background = 0.15 * (torch.cos(angle) * (xx - 0.5) + torch.sin(angle) * (yy - 0.5)) + u(
        0.1, 0.3
    )
    dist = torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    cheb = torch.maximum((xx - cx).abs(), (yy - cy).abs())
    disc = dist <= radius
    square = cheb <= radius * 0.85
    ring = (dist <= radius) & (dist >= radius * 0.55)
    mask = torch.where(kind == 0, disc, torch.where(kind == 1, square, ring))
    brightness = u(0.7, 1.0)
    img = torch.where(mask, brightness, background)
    return (img * 2.0 - 1.0).clamp(-1.0, 1.0)[:, None]


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "moons": BuiltinDataset(
        "moons", "two interleaved half circles, 2-D", (2,), DEFAULT_RANGE, _moons
    ),
    "swiss_roll": BuiltinDataset(
        "swiss_roll", "2-D swiss roll spiral", (2,), DEFAULT_RANGE, _swiss_roll
    ),
    "gmm": BuiltinDataset(
        "gmm",
        "8-component Gaussian mixture on a circle, 2-D (exact density known)",
        (2,),
        DEFAULT_RANGE,
        _gmm,
    ),
    "shapes": BuiltinDataset(
        "shapes",
        "16x16 grey images of discs, squares and rings on gradients",
        (1, _SHAPES_SIZE, _SHAPES_SIZE),
        DEFAULT_RANGE,
        _shapes,
    ),
}


def builtin_dataset(
    name: str, n: int, seed: int = 0, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``n`` samples ``[n, *data_shape]`` of the built-in set ``name``; same seed, same samples."""
    spec = _builtin(name)
    if n < 1:
        raise DataError(f"need at least one sample, got n={n}")
    gen = torch.Generator().manual_seed(seed)
    return spec.generate(n, gen).to(dtype)


def _builtin(name: str) -> BuiltinDataset:
    return look_up(BUILTIN_DATASETS, name, "built-in data set", DataError, label="built-in")


# ---------------------------------------------------------------------------------------------
# files


def get_data(
    source: str,
    *,
    n: int | None = None,
    seed: int = 0,
    data_shape: tuple[int, ...] | None = None,
    data_range: tuple[float, float] = DEFAULT_RANGE,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Data from ``source``: a built-in set's name, or a path to an array file or image folder.

    A built-in set draws ``n`` samples (default 1000) with ``seed``; a file gives its first ``n``
    samples (all when ``n`` is None). ``data_shape`` checks (or, for files, resizes/permutes) to it.
    """
    if source in BUILTIN_DATASETS and not os.path.exists(source):
        spec = BUILTIN_DATASETS[source]
        if data_shape is not None and tuple(data_shape) != spec.data_shape:
            raise SampleShapeError(
                f"built-in set {source!r} has samples of shape {spec.data_shape}, "
                f"the model wants {tuple(data_shape)}",
                spec.data_shape,
            )
        x = builtin_dataset(source, 1000 if n is None else n, seed, dtype=dtype)
        lo, hi = data_range
        if (lo, hi) != spec.data_range:
            # linear map from the set's own range to the model's
            slo, shi = spec.data_range
            x = (x - slo) / (shi - slo) * (hi - lo) + lo
        return x
    x = load_data(source, data_shape, data_range, dtype=dtype)
    return x if n is None else x[:n]


def check_training_sizes(
    sample_shape: tuple[int, ...],
    *,
    n: int | None,
    batch_size: int | None,
    references: int | None,
    width: int | None,
) -> None:
    """Refuse ``ddpm train`` sizes the machine cannot hold, before anything is allocated: data and
    reference sets (float64 while loaded, then float32), one batch with its activations, and the
    network's weights with their gradients, Adam moments and EMA copy. A ParameterError naming
    the parameter (exit 2; the CLI shows its flag). Without ``batch_size``, the training's
    default batch for the shape is checked, and the message says to set ``batch_size``."""
    from ddpmcli.training import DEFAULT_BATCH, default_architecture

    per_sample = math.prod(sample_shape) * (8 + 4)
    for name, count in (("n", n), ("references", references)):
        if count is not None:
            limits.check_allocation(count * per_sample, f"{{{name}}} {count}", error=ParameterError)
    if width is not None:
        # the UNet's widest layers are 4 * width channels with 3 x 3 kernels; 5 copies each
        limits.check_allocation(
            width * width * 16 * 9 * 4 * 5 * 8, f"{{width}} {width}", error=ParameterError
        )
    if len(sample_shape) == 3:
        # the UNet keeps ~56 values per base channel and pixel for the backward pass (7 KiB a
        # pixel measured at 32 channels, 16 x 16 and 64 x 64); 32 values is a lower bound
        activations = math.prod(sample_shape[1:]) * (width or 32) * 32 * 4
    else:
        activations = 32 * (width or 128) * 4  # ~32 layers' worth of hidden activations
    batch = batch_size or DEFAULT_BATCH[default_architecture(tuple(sample_shape))]
    if batch_size is not None:
        what = f"{{batch_size}} {batch_size}"
    else:
        shape_text = ",".join(str(d) for d in sample_shape)
        widths = "" if width is None else f" at {{width}} {width}"
        what = f"{{batch_size}} (default {batch}) for samples of shape {shape_text}{widths}"
    limits.check_allocation(batch * (per_sample + activations), what, error=ParameterError)


def load_data(
    path: str | os.PathLike[str],
    data_shape: tuple[int, ...] | None = None,
    data_range: tuple[float, float] = DEFAULT_RANGE,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Load an array file (.npy, .npz) or a folder of PNG/JPEG images as ``[N, *data_shape]``.

    Arrays may be ``[N, D]`` vectors or ``[N, C, H, W]`` / ``[N, H, W, C]`` images (channels-last is
    detected by comparing with ``data_shape``; without one, a last axis of 1, 3 or 4 that the second
    axis is not marks channels-last). ``[N, H, W]`` is taken as one channel. Image folders are
    resized to ``data_shape``'s H x W (default: the first image's size). uint8 values map from
    [0, 255] to ``data_range``; float values are used as they are. Raises DataError with one line.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data not found: {p}")
    if not p.is_dir():
        limits.check_regular_file(p, "data file")
    if p.is_dir():
        arr = _read_image_folder(p, data_shape)
    elif p.suffix.lower() in (".npy", ".npz"):
        arr = _read_array(p)
        arr = _arrange(arr, data_shape, p)
    elif p.suffix.lower() in IMAGE_SUFFIXES:
        arr = _read_images([p], data_shape)
    else:
        raise DataError(
            f"{p}: unsupported data file (want .npy, .npz, an image, or a folder of images)"
        )
    return _to_range(arr, data_range, p, dtype)


# bytes per element from file to tensor: the file's own dtype, then float64, then the model dtype
_BYTES_PER_ELEMENT_EXTRA = 8 + 8 + 4
MAX_IMAGE_PIXELS: int = 1 << 24
"""Most pixels accepted per image (4096 x 4096), checked from the header before decoding."""


def _checked_header(stream: Any, size: int, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """Read an .npy header (:func:`limits.npy_header`: checked against the ``size`` bytes it
    came with) and check that the array it claims fits in memory."""
    shape, dtype = limits.npy_header(stream, size, where)
    count = math.prod(shape)
    limits.check_allocation(
        count * (dtype.itemsize + _BYTES_PER_ELEMENT_EXTRA), f"{where}: array", error=DataError
    )
    return tuple(shape), dtype


def _read_array(p: Path) -> np.ndarray:
    try:
        if p.suffix.lower() == ".npz" or zipfile.is_zipfile(p):
            return _read_npz(p)
        with open(p, "rb") as fh:
            _checked_header(fh, os.fstat(fh.fileno()).st_size, str(p))
            fh.seek(0)
            arr = np.lib.format.read_array(fh, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{p}: cannot read array file ({_first_line(exc)})") from None
    return np.asarray(arr)


def _read_npz(p: Path) -> np.ndarray:
    """One array of an .npz archive, its member's header checked against the member's declared
    uncompressed size (and that against memory) before anything is decompressed past it."""
    with zipfile.ZipFile(p) as archive:
        names = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
        if not names:
            raise DataError(f"{p}: the .npz archive holds no arrays")
        # the conventional key first (improved-diffusion writes arr_0; many use x / samples)
        key = next((k for k in ("x", "samples", "images", "data", "arr_0") if k in names), names[0])
        info = archive.getinfo(key + ".npy")
        where = f"{p}: array {key!r}"
        readable = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
        if info.flag_bits & 0x1 or info.compress_type not in readable:
            raise DataError(f"{where}: encrypted or compressed in a way numpy does not read")
        with archive.open(info) as member:
            _checked_header(member, info.file_size, where)
        with archive.open(info) as member:
            try:
                arr = np.lib.format.read_array(member, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise DataError(f"{where}: cannot read ({_first_line(exc)})") from None
    return np.asarray(arr)


def _arrange(arr: np.ndarray, data_shape: tuple[int, ...] | None, p: Path) -> np.ndarray:
    """Bring an array to [N, *data_shape]: add a channel axis, move channels-last to first."""
    if arr.ndim < 2:
        raise DataError(
            f"{p}: array of shape {arr.shape} is not a batch (want N x D or N x C x H x W)"
        )
    if arr.shape[0] == 0:
        raise DataError(f"{p}: the array holds no samples")
    if arr.ndim == 3:  # [N, H, W] grey images
        arr = arr[:, None]
    if arr.ndim == 4:
        if data_shape is not None and len(data_shape) == 3:
            c, h, w = data_shape
            if arr.shape[1:] != (c, h, w) and arr.shape[1:] == (h, w, c):
                arr = arr.transpose(0, 3, 1, 2)
        elif arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
            arr = arr.transpose(0, 3, 1, 2)
    elif arr.ndim != 2:
        raise DataError(f"{p}: array of shape {arr.shape} is neither N x D nor N x C x H x W")
    if data_shape is not None and tuple(arr.shape[1:]) != tuple(data_shape):
        raise SampleShapeError(
            f"{p}: samples have shape {tuple(arr.shape[1:])}, the model wants {tuple(data_shape)}",
            tuple(arr.shape[1:]),
        )
    return np.ascontiguousarray(arr)


def _read_image_folder(p: Path, data_shape: tuple[int, ...] | None) -> np.ndarray:
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{p}: no PNG or JPEG images in the folder")
    return _read_images(files, data_shape)


def _read_images(files: list[Path], data_shape: tuple[int, ...] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if data_shape is not None and len(data_shape) != 3:
        raise DataError(
            f"{files[0]}: images given but the model wants vectors of shape {data_shape}"
        )
    out = []
    for f in files:
        try:
            limits.check_regular_file(f, "image")
            with Image.open(f) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"{f}: image is {im.width} x {im.height} pixels, more than the "
                        f"{MAX_IMAGE_PIXELS} allowed per image"
                    )
                if data_shape is None:
                    channels = 1 if im.mode in ("L", "1", "I", "F") else 3
                    data_shape = (channels, im.height, im.width)
                c, h, w = data_shape
                limits.check_allocation(
                    len(files) * c * h * w * (1 + _BYTES_PER_ELEMENT_EXTRA),
                    f"{len(files)} images of {c} x {h} x {w}",
                    error=DataError,
                )
                if c not in (1, 3):
                    raise DataError(f"{f}: cannot make {c}-channel images (1 or 3)")
                rgb = im.convert("L" if c == 1 else "RGB")
                if rgb.size != (w, h):
                    rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
                a = np.asarray(rgb, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise DataError(f"{f}: cannot read image ({_first_line(exc)})") from None
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.stack(out)


def _to_range(
    arr: np.ndarray, data_range: tuple[float, float], p: Path, dtype: torch.dtype
) -> Tensor:
    lo, hi = data_range
    if arr.dtype == np.uint8:
        x = torch.from_numpy(arr.astype(np.float64)) / 255.0 * (hi - lo) + lo
    else:
        x = torch.from_numpy(arr.astype(np.float64))
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(f"{p}: {bad} value(s) are NaN or infinite")
    return x.to(dtype)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
