"""The small built-in networks that native checkpoints name and `ddpm train` trains.

Both take ``(x_t, t)`` with ``t`` the int64 model timesteps ``[B]`` (0-based, as diffusers and
improved-diffusion feed them) and return a tensor shaped like ``x_t``, or with twice its channels
when ``learned_variance`` is set: ``[prediction, v]`` along dim 1, ``v`` the improved-diffusion
variance interpolation value (nominally in ``[-1, 1]``; see ``core.Schedule.model_log_variance``).

Plain torch, no Python control flow on data, so every network is TorchScript-able and
``torch.export``-able as it stands.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpmcli.errors import CheckpointError, look_up

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "MLPDenoiser",
    "TinyUNet",
    "build_model",
    "count_parameters",
    "default_hparams",
    "timestep_embedding",
]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps ``t`` [B] -> float32 ``[B, dim]`` (Vaswani et al. 3.5).

    Computed in float32 whatever the network's dtype: in bfloat16 the phase ``t * freq`` for
    t near 1000 would lose all but two digits.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (
        -math.log(max_period) / half
    )
    args = t.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class _TimeMLP(nn.Module):
    """Sinusoidal embedding -> Linear -> SiLU -> Linear, as in DDPM's UNet."""

    def __init__(self, freq_dim: int, out_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        emb = timestep_embedding(t, self.freq_dim).to(dtype)
        return self.fc2(F.silu(self.fc1(emb)))


class _MLPBlock(nn.Module):
    """Pre-norm residual block: h + W2 silu(W1 norm(h) + U temb)."""

    def __init__(self, hidden: int, time_dim: int, expansion: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden * expansion)
        self.temb = nn.Linear(time_dim, hidden * expansion)
        self.fc2 = nn.Linear(hidden * expansion, hidden)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        y = self.fc1(self.norm(h)) + self.temb(temb)
        return h + self.fc2(F.silu(y))


class MLPDenoiser(nn.Module):
    """Denoiser for vectors ``[B, data_dim]``: time embedding plus a stack of residual MLP blocks.

    Args:
        data_dim: length D of each sample vector.
        hidden: width of the residual stream (default 64).
        num_blocks: residual blocks (default 3).
        time_dim: sinusoidal embedding size (default 64).
        learned_variance: output ``[B, 2D]`` (prediction, v) instead of ``[B, D]``.
    """

    def __init__(
        self,
        data_dim: int = 2,
        hidden: int = 64,
        num_blocks: int = 3,
        time_dim: int = 64,
        learned_variance: bool = False,
    ) -> None:
        super().__init__()
        self.data_dim = data_dim
        self.learned_variance = learned_variance
        out_dim = data_dim * (2 if learned_variance else 1)
        self.time_mlp = _TimeMLP(time_dim, hidden)
        self.inp = nn.Linear(data_dim, hidden)
        self.blocks = nn.ModuleList([_MLPBlock(hidden, hidden) for _ in range(num_blocks)])
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self.time_mlp(t, x.dtype)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(F.silu(self.out_norm(h)))


class _ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, the time embedding added as a per-channel shift (as in DDPM)."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(time_dim, out_ch)
        self.norm2 = nn.GroupNorm(_groups(groups, out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _groups(groups: int, channels: int) -> int:
    """The largest group count <= ``groups`` dividing ``channels`` (GroupNorm needs a divisor)."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


class TinyUNet(nn.Module):
    """A two-resolution UNet for images ``[B, C, H, W]``: ~300k parameters at the defaults.

    conv_in -> ResBlock -> (down 2x) -> ResBlock -> mid ResBlock -> ResBlock(+skip) -> (up 2x)
    -> ResBlock(+skip) -> GroupNorm/SiLU/conv_out. Odd H or W is zero-padded to even and cropped
    back, so any image size works.

    Args:
        in_channels: image channels C.
        image_size: H (= W unless ``image_width`` is given), so a checkpoint knows its size.
        base_channels: channels at full resolution (default 32); twice that at half resolution.
        time_dim: time embedding width (default 128).
        groups: GroupNorm groups (default 8, lowered to a divisor of the channel count).
        learned_variance: output ``2C`` channels (prediction, v) instead of ``C``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 16,
        image_width: int | None = None,
        base_channels: int = 32,
        time_dim: int = 128,
        groups: int = 8,
        learned_variance: bool = False,
    ) -> None:
        super().__init__()
        ch, ch2 = base_channels, base_channels * 2
        self.in_channels = in_channels
        self.image_size = image_size
        self.image_width = image_width if image_width is not None else image_size
        self.learned_variance = learned_variance
        out_channels = in_channels * (2 if learned_variance else 1)
        self.time_mlp = _TimeMLP(ch, time_dim)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down0 = _ResBlock(ch, ch, time_dim, groups)
        self.downsample = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.down1 = _ResBlock(ch, ch2, time_dim, groups)
        self.mid = _ResBlock(ch2, ch2, time_dim, groups)
        self.up1 = _ResBlock(ch2 + ch2, ch2, time_dim, groups)
        self.upsample = nn.Conv2d(ch2, ch2, 3, padding=1)
        self.up0 = _ResBlock(ch2 + ch, ch, time_dim, groups)
        self.out_norm = nn.GroupNorm(_groups(groups, ch), ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        height, width = x.shape[-2], x.shape[-1]
        # pad to even so the 2x down/up round trip restores the size
        x = F.pad(x, (0, width % 2, 0, height % 2))
        temb = self.time_mlp(t, x.dtype)
        h0 = self.down0(self.conv_in(x), temb)
        h1 = self.down1(self.downsample(h0), temb)
        h = self.mid(h1, temb)
        h = self.up1(torch.cat([h, h1], dim=1), temb)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up0(torch.cat([h, h0], dim=1), temb)
        out = self.conv_out(F.silu(self.out_norm(h)))
        return out[:, :, :height, :width]


@dataclass(frozen=True)
class Architecture:
    """A registered network: its class, what it denoises, and how to size it for a data shape."""

    name: str
    summary: str
    factory: Callable[..., nn.Module]
    data_ndim: int  # 1 for vectors [D], 3 for images [C, H, W]
    shape_hparams: Callable[[tuple[int, ...]], dict[str, Any]]


def _mlp_shape(shape: tuple[int, ...]) -> dict[str, Any]:
    return {"data_dim": shape[0]}


def _unet_shape(shape: tuple[int, ...]) -> dict[str, Any]:
    return {"in_channels": shape[0], "image_size": shape[1], "image_width": shape[2]}


ARCHITECTURES: dict[str, Architecture] = {
    "mlp": Architecture(
        "mlp",
        "residual MLP with a sinusoidal time embedding, for vectors",
        MLPDenoiser,
        1,
        _mlp_shape,
    ),
    "unet": Architecture(
        "unet", "two-resolution UNet with GroupNorm, for C x H x W images", TinyUNet, 3, _unet_shape
    ),
}


def default_hparams(
    architecture: str, data_shape: tuple[int, ...], *, learned_variance: bool = False
) -> dict[str, Any]:
    """Hyper-parameters that size ``architecture`` for samples of ``data_shape``."""
    arch = _architecture(architecture)
    if len(data_shape) != arch.data_ndim:
        want = "a vector shape (D,)" if arch.data_ndim == 1 else "an image shape (C, H, W)"
        raise CheckpointError(
            f"architecture {architecture!r} needs {want}, got data shape {tuple(data_shape)}"
        )
    return {**arch.shape_hparams(tuple(data_shape)), "learned_variance": learned_variance}


def build_model(architecture: str, hparams: Mapping[str, Any]) -> nn.Module:
    """A registered network from its name and hyper-parameter dict (as a checkpoint stores them)."""
    arch = _architecture(architecture)
    try:
        return arch.factory(**dict(hparams))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"bad hyper-parameters for architecture {architecture!r}: {exc}"
        ) from None


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in module.parameters())


def placed(module: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """``module.to(device, dtype)`` (in place, as torch moves modules), skipping torch's walk over
    every submodule when each tensor is already there: a run moves its model once per call, and
    that walk alone costs milliseconds on a small transformer (about 1% of a DiT sweep)."""
    for tensor in (*module.parameters(), *module.buffers()):
        floating = tensor.is_floating_point() or tensor.is_complex()
        if tensor.device != device or (dtype is not None and floating and tensor.dtype != dtype):
            return module.to(device=device) if dtype is None else module.to(device, dtype)
    return module


def _architecture(name: str) -> Architecture:
    return look_up(ARCHITECTURES, name, "architecture", CheckpointError)
