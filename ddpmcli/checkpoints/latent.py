"""Latent models: a pipeline whose denoiser works on the latents of a VAE (``AutoencoderKL``).

The diagnostics run in latent space: ``LoadedModel.data_shape`` is the latent shape, and data
given as images is encoded once per image (the posterior mean, times the config's
``scaling_factor``, after subtracting ``shift_factor`` where the config has one, as diffusers'
pipelines do), never once per timestep. Decoding inverts the scaling and runs the VAE decoder:
for saved samples and the image-space error of x0_hat. Latents are not clipped: their data range
is ``(-LATENT_BOUND, LATENT_BOUND)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ddpmcli.errors import CheckpointError, DataError, ParameterError, verbatim
from ddpmcli.models import placed

LATENT_BOUND = 1e4
"""The data range of latents, wide enough that clipping x0_hat to it never acts."""
IMAGE_RANGE = (-1.0, 1.0)
"""The VAE's image range (diffusers' VaeImageProcessor maps [0, 1] images onto it)."""
VAE_BATCH = 16
"""Images encoded or decoded per VAE call."""


@dataclass
class LatentSpace:
    """A VAE and its scaling: ``encode`` images ``[N, *image_shape]`` in ``IMAGE_RANGE`` to
    latents ``[N, *latent_shape]``, ``decode`` back. The VAE runs in float32 (SD-style VAEs
    overflow in float16: their configs say ``force_upcast``)."""

    vae: Any
    scaling_factor: float
    shift_factor: float
    image_shape: tuple[int, ...]
    latent_shape: tuple[int, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    image_range: tuple[float, float] = IMAGE_RANGE

    def __post_init__(self) -> None:
        # a zero or non-finite scaling would give NaN images, quietly saved and measured
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor != 0):
            raise CheckpointError(
                f"the VAE's scaling_factor must be a finite non-zero number, got "
                f"{self.scaling_factor!r}"
            )
        if not math.isfinite(self.shift_factor):
            raise CheckpointError(
                f"the VAE's shift_factor must be a finite number, got {self.shift_factor!r}"
            )

    def to(self, device: str | torch.device) -> LatentSpace:
        dev = torch.device(device)
        return LatentSpace(
            placed(self.vae, dev, torch.float32),
            self.scaling_factor,
            self.shift_factor,
            self.image_shape,
            self.latent_shape,
            dev,
            self.image_range,
        )

    def encode(self, images: Tensor) -> Tensor:
        """Latents (float64 on the CPU, like every data tensor) of ``images``: the posterior
        mean, shifted and scaled; each image once."""
        out = [
            (self.vae.encode(part).latent_dist.mean - self.shift_factor) * self.scaling_factor
            for part in self._parts(images)
        ]
        return _finite(torch.cat(out), "encoder").to("cpu", torch.float64)

    def decode(self, latents: Tensor) -> Tensor:
        """Images (float32 on the CPU, in ``IMAGE_RANGE`` nominally) of ``latents``."""
        out = [
            self.vae.decode(part / self.scaling_factor + self.shift_factor).sample
            for part in self._parts(latents)
        ]
        return _finite(torch.cat(out), "decoder").to("cpu", torch.float32)

    def _parts(self, x: Tensor) -> Iterator[Tensor]:
        with torch.inference_mode():
            for start in range(0, x.shape[0], VAE_BATCH):
                yield x[start : start + VAE_BATCH].to(self.device, torch.float32)

    def describe(self) -> dict[str, Any]:
        """The ``info`` fields of a latent model."""
        return {
            "latent_shape": "x".join(str(d) for d in self.latent_shape),
            "vae": (
                f"{type(self.vae).__name__} {'x'.join(str(d) for d in self.image_shape)} "
                f"scaling_factor {self.scaling_factor:g}"
                + (f" shift_factor {self.shift_factor:g}" if self.shift_factor else "")
            ),
        }

    def latents_of(self, data: Tensor, name: str = "data") -> tuple[Tensor, Tensor | None]:
        """``(latents, images)`` of ``data`` (the parameter ``name``): images
        ``[N, *image_shape]`` are encoded (once each); data already ``[N, *latent_shape]`` are
        taken as latents (``images`` None).

        Raises:
            DataError: data of neither shape, no samples, or NaN/Inf values (checked before
                the VAE runs).
        """
        field = "{" + name + "}"
        shape = _sample_shape(data, field)
        if shape not in (tuple(self.image_shape), tuple(self.latent_shape)):
            raise self.shape_error(field, shape)
        _check_finite(data, field)
        if shape == tuple(self.image_shape):
            return self.encode(data), data.to("cpu", torch.float64)
        return data.to("cpu", torch.float64), None

    def shape_error(self, where: str, shape: Sequence[int]) -> DataError:
        """Data of neither shape: one line naming both (``where`` a template: ``{x0}``, or a
        path with its braces doubled)."""
        return DataError.naming(
            f"{where} samples have shape {list(shape)}; the model wants images "
            f"{list(self.image_shape)} (encoded by its VAE) or latents {list(self.latent_shape)}"
        )

    def read(self, source: str, *, n: int | None, seed: int = 0) -> tuple[Tensor, Tensor | None]:
        """``(latents, images)`` of a data source (an array file, an image folder or a built-in
        set: its first ``n``): images in ``image_range`` are encoded once each; an array of
        latent-shaped samples is taken as latents (``images`` None).

        Raises:
            DataError: data that cannot be read, or of neither shape (one line naming both); the
                read's own error (NaN, no samples) for data of one of them.
        """
        from ddpmcli.data import SampleShapeError, get_data

        try:
            images = get_data(
                source, n=n, seed=seed, data_shape=tuple(self.image_shape),
                data_range=self.image_range, dtype=torch.float64,
            )  # fmt: skip
        except SampleShapeError as exc:  # not images: latents, or neither
            try:
                latents = get_data(
                    source, n=n, seed=seed, data_shape=tuple(self.latent_shape),
                    data_range=(-LATENT_BOUND, LATENT_BOUND), dtype=torch.float64,
                )  # fmt: skip
            except SampleShapeError:
                raise self.shape_error(f"{verbatim(source)}:", exc.shape) from None
            return latents, None
        return self.encode(images), images


def _sample_shape(x: Tensor, field: str) -> tuple[int, ...]:
    """One sample's shape of ``x``, a non-empty batch (DataError naming ``field`` otherwise)."""
    if x.ndim < 2 or x.shape[0] < 1:
        raise DataError.naming(f"{field} of shape {list(x.shape)} is not a batch of samples")
    return tuple(int(d) for d in x.shape[1:])


def _check_finite(x: Tensor, field: str) -> None:
    """DataError naming ``field`` when ``x`` holds NaN/Inf."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise DataError.naming(f"{field}: {bad} value(s) are NaN or Inf")


def _finite(out: Tensor, part: str) -> Tensor:
    """``out`` of the VAE's ``part``, refused when it holds NaN/Inf (from finite inputs: the
    VAE's own failure, which would otherwise be saved or averaged into the image error)."""
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise CheckpointError(f"the VAE's {part} returned {bad} NaN or infinite value(s)")
    return out


def latent_column(name: str) -> str:
    """The column a latent model's run shows for ``name``: errors in latent space say so."""
    return f"{name}_latent" if name in LATENT_COLUMNS else name


LATENT_COLUMNS = frozenset(
    {
        "mse",
        "psnr",
        "eps_mse",
        "x0_mse",
        "clip_fraction",
        "bits_per_dim",
    }
)
"""Columns measured in latent space on a latent model (renamed ``<name>_latent``)."""


def space_columns(model: Any, columns: Iterable[str]) -> list[str]:
    """``columns`` as ``model``'s rows name them: renamed by :func:`latent_column` when it is a
    latent model (``model.latent``), else unchanged."""
    if getattr(model, "latent", None) is None:
        return list(columns)
    return [latent_column(c) for c in columns]


def space_rows(
    model: Any,
    rows: Sequence[dict[str, Any]],
    decoded: DecodedError | None = None,
    ranks: Any = None,
) -> list[dict[str, Any]]:
    """``rows`` with their columns named as :func:`space_columns` names them, and the columns
    of ``decoded`` (``reconstruct --decode``: summed over ``ranks``) added."""
    if getattr(model, "latent", None) is None:
        return list(rows)
    # psnr needs the data's peak, and latents have none: the column stays, empty
    out = [{latent_column(k): None if k == "psnr" else v for k, v in row.items()} for row in rows]
    if decoded is not None:
        decoded.finish(out, ranks)
    return out


def space_result(
    model: Any, result: Any, decoded: DecodedError | None = None, ranks: Any = None
) -> Any:
    """A reconstruction result (``ReconstructionResult``) with its rows and columns named as
    :func:`space_rows` names them, and ``decoded``'s columns added to the per-t rows: what
    ``ddpmcli.reconstruct`` returns and ``ddpm reconstruct`` prints."""
    if getattr(model, "latent", None) is None:
        return result
    sample_rows = result.sample_rows
    return dataclasses.replace(
        result,
        rows=space_rows(model, result.rows, decoded, ranks),
        columns=space_columns(model, result.columns) + (list(DECODED_COLUMNS) if decoded else []),
        sample_rows=None if sample_rows is None else space_rows(model, sample_rows),
        sample_columns=space_columns(model, result.sample_columns),
    )


DECODED_COLUMNS = ("mse_image", "psnr_image")
"""The columns ``reconstruct --decode`` adds: the error of the decoded x0_hat against the image."""


class DecodedError:
    """An observer of a reconstruction sweep on a latent model: decodes every pair's x0_hat
    (the sweep event's ``x0_hat``, ``position``, ``sample``) and adds up its mean squared error
    against the original image, per timestep position."""

    def __init__(self, latent: LatentSpace, images: Tensor, timesteps: Sequence[int]) -> None:
        self.latent = latent
        self.images = images.to("cpu", torch.float64)
        self.timesteps = [int(t) for t in timesteps]
        self.sums = torch.zeros(len(self.timesteps), dtype=torch.float64)
        self.counts = torch.zeros(len(self.timesteps), dtype=torch.float64)

    def __call__(self, event: Any) -> None:
        x0_hat = event.tensors.get("x0_hat") if event.loop == "sweep" else None
        if x0_hat is None:
            return
        decoded = self.latent.decode(x0_hat).to(torch.float64)
        images = self.images[event.tensors["sample"].cpu()]
        err = (decoded - images).square().flatten(1).mean(1)
        position = event.tensors["position"].cpu()
        self.sums.index_add_(0, position, err)
        self.counts.index_add_(0, position, torch.ones_like(err))

    def add_columns(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add ``mse_image`` and ``psnr_image`` to each row (matched by its ``t``)."""
        lo, hi = self.latent.image_range
        where = {t: j for j, t in enumerate(self.timesteps)}
        for row in rows:
            j = where.get(int(row["t"]))
            if j is None or not self.counts[j] > 0:
                continue
            mse = float(self.sums[j] / self.counts[j])
            row["mse_image"] = mse
            row["psnr_image"] = 10.0 * math.log10((hi - lo) ** 2 / mse) if mse else math.inf

    def finish(self, rows: Sequence[dict[str, Any]], ranks: Any) -> None:
        """Add the sums over ranks (a torchrun run: each rank decoded its samples), then the
        columns to ``rows``."""
        if ranks is not None and getattr(ranks, "active", False):
            ranks.sum(self.sums)
            ranks.sum(self.counts)
        self.add_columns(rows)


def decoded_error(
    model: Any, picked: Any, timesteps: Sequence[int], per_sample: bool = False
) -> DecodedError:
    """The observer of ``reconstruct --decode`` for ``model`` on ``picked`` (its
    ``ReconstructionData``, whose ``images`` were encoded to its ``x0``)."""
    latent = getattr(model, "latent", None)
    if latent is None:
        raise ParameterError("{decode} needs a latent model (a pipeline with a vae/)")
    if per_sample:
        raise ParameterError("{decode} gives per-t rows; it does not go with {per_sample}")
    if picked.images is None:
        raise ParameterError("{decode} needs image data to compare with, not latents")
    return DecodedError(latent, picked.images, timesteps)


def samples_of(
    model: Any, data: Any, name: str, n: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(x0, images)`` of the samples a caller hands over as a tensor or array (the parameter
    ``name``): a latent model's through :meth:`LatentSpace.latents_of` (images encoded), any
    other model's checked against its ``data_shape``, finite (``images`` None). uint8 values
    are 8-bit images, mapped from [0, 255] to the range as data files are; other integers are
    taken as numbers. ``n``: the first ``n`` samples only.

    Raises:
        DataError: not real numbers, not a non-empty batch of the model's shape, or NaN/Inf.
    """
    try:
        x = torch.as_tensor(data).detach()  # a training loop's batch: measured, not trained
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError.naming(
            f"{{{name}}}: not an array of numbers ({verbatim(type(exc).__name__)}: "
            f"{verbatim(str(exc).splitlines()[0] if str(exc) else '')})"
        ) from None
    if n is not None and x.ndim:
        x = x[:n]
    latent = getattr(model, "latent", None)
    if x.is_complex() or x.dtype == torch.bool:
        raise DataError.naming(f"{{{name}}} holds {str(x.dtype)[6:]} values, not real numbers")
    if x.dtype == torch.uint8:  # 8-bit images, mapped as the file loader maps them
        lo, hi = latent.image_range if latent is not None else model.data_range
        x = x.to(torch.float64) / 255.0 * (hi - lo) + lo
    elif not x.is_floating_point():
        x = x.to(torch.float64)
    if latent is not None:
        return latent.latents_of(x, name)
    field = "{" + name + "}"
    want = [int(d) for d in model.data_shape]
    if list(_sample_shape(x, field)) != want:
        raise DataError.naming(
            f"{field} samples have shape {list(x.shape[1:])}, the model wants {want}"
        )
    _check_finite(x, field)
    return x, None
