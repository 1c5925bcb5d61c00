"""Open lucidrains/denoising-diffusion-pytorch ``Trainer`` checkpoints with ``ddpm --model``.

``Trainer.save`` writes ``results/model-N.pt``, a dict ``{"step", "model", "opt", "ema",
"scaler", "version"}``: ``model`` is the ``GaussianDiffusion``'s state dict (the ``Unet`` under
``model.``, and the schedule as buffers ``betas``, ``alphas_cumprod``, ... stored in float32), and
``ema`` the ``ema_pytorch.EMA``'s (the averaged copy under ``ema_model.``, the live one under
``online_model.``, plus ``initted`` and ``step``). The schedule is read from the stored ``betas``:
the package computes its schedules (``sigmoid``, ``cosine``, ``linear``) in float64 and stores
them as float32, so the adapter recovers the float64 betas of the schedule whose rounding the
stored ones are exactly (:func:`recover_betas`); other (custom) betas are taken as stored.
What the file does not hold is the ``Unet``'s constructor arguments, the ``objective`` and the
image size: set them to what you trained with::

    export DDPM_UNET='{"dim": 64, "dim_mults": [1, 2, 4, 8], "flash_attn": false}'
    export DDPM_OBJECTIVE=pred_v        # GaussianDiffusion's default; pred_noise, pred_x0
    ddpm info --model examples/adapt_denoising_diffusion_pytorch.py:make results/model-10.pt \\
        --data-shape 3,128,128
    ddpm reconstruct --model examples/adapt_denoising_diffusion_pytorch.py:make \\
        results/model-10.pt --data images/ --data-shape 3,128,128

(``DDPM_IMAGE_SIZE=128`` instead of ``--data-shape`` works too.) ``make`` needs
``pip install denoising-diffusion-pytorch``. What it maps:

- the EMA weights (``ema_model.``; ``DDPM_USE_EMA=0`` takes the trained ``model`` weights);
- ``objective``: ``pred_noise`` -> epsilon, ``pred_x0`` -> sample, ``pred_v`` -> v_prediction;
- data in [-1, 1]: the ``GaussianDiffusion`` normalises [0, 1] images to [-1, 1] before the
  ``Unet`` sees them (``auto_normalize``), which is the space ddpm works in;
- ``Unet(learned_variance=True)`` (``LearnedGaussianDiffusion``) outputs 2C channels and is read
  as a learned variance (its interpolation is improved-diffusion's ``learned_range``).
A ``Unet(self_condition=True)`` runs without its self-conditioning input (``x_self_cond=None``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

OBJECTIVES = {"pred_noise": "epsilon", "pred_x0": "sample", "pred_v": "v_prediction"}
EMA_PREFIX = "ema_model."  # ema_pytorch.EMA: the averaged copy of the GaussianDiffusion
UNET_PREFIX = "model."  # GaussianDiffusion.model: the Unet


def diffusion_state(checkpoint: Mapping[str, Any], *, use_ema: bool = True) -> dict[str, Tensor]:
    """The ``GaussianDiffusion`` state dict in a ``model-N.pt`` dict: the EMA copy (or the
    trained one), keys as ``GaussianDiffusion.state_dict()`` names them."""
    if "model" not in checkpoint and "ema" not in checkpoint:
        raise ValueError(
            "not a denoising-diffusion-pytorch Trainer checkpoint (no 'model' or 'ema' key)"
        )
    if not use_ema:
        return dict(checkpoint["model"])
    ema = checkpoint.get("ema")
    if not isinstance(ema, Mapping):
        raise ValueError("the checkpoint has no 'ema' state (set DDPM_USE_EMA=0)")
    return {k[len(EMA_PREFIX) :]: v for k, v in ema.items() if k.startswith(EMA_PREFIX)}


def linear_betas(timesteps: int) -> Tensor:
    """The package's ``linear_beta_schedule``: 1e-4 to 0.02 scaled by 1000/T, in float64."""
    scale = 1000 / timesteps
    return torch.linspace(scale * 0.0001, scale * 0.02, timesteps, dtype=torch.float64)


def _betas_of(alpha_bar: Tensor) -> Tensor:
    """``clip(1 - ab[1:]/ab[:-1], 0, 0.999)`` of an ``alpha_bar`` normalised by its first entry,
    as both of the package's alpha_bar-defined schedules end."""
    alpha_bar = alpha_bar / alpha_bar[0]
    return torch.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0, 0.999)


def cosine_betas(timesteps: int, s: float = 0.008) -> Tensor:
    """The package's ``cosine_beta_schedule`` (Nichol & Dhariwal), in float64."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    return _betas_of(torch.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2)


def sigmoid_betas(timesteps: int, start: float = -3, end: float = 3, tau: float = 1) -> Tensor:
    """The package's ``sigmoid_beta_schedule`` (Jabri et al. 2022), in float64 but for its two
    end values and their difference, which it computes as float32 0-d tensors
    (``torch.tensor(start / tau).sigmoid()``)."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    v_start = torch.tensor(start / tau, dtype=torch.float32).sigmoid()
    v_end = torch.tensor(end / tau, dtype=torch.float32).sigmoid()
    sig = ((t * (end - start) + start) / tau).sigmoid()
    return _betas_of((-sig + float(v_end)) / float(v_end - v_start))


SCHEDULES = {"sigmoid": sigmoid_betas, "cosine": cosine_betas, "linear": linear_betas}
"""``GaussianDiffusion(beta_schedule=...)``'s schedules at their default parameters."""


def recover_betas(stored: Tensor) -> tuple[Tensor, str]:
    """The float64 betas the trainer computed its buffers from, and the schedule's name: the
    package's schedule whose float64 betas round to exactly the stored float32 ones (its
    buffers are computed in float64 and only then stored as float32, so multiplying the
    stored betas, whose last value is the clip 0.999 rounded to 0.99900001287, is 1.3e-5 off
    in alpha_bar at T-1); the stored betas themselves (``custom``) when none does."""
    betas32 = stored.detach().to("cpu", torch.float32).reshape(-1)
    for name, make in SCHEDULES.items():
        candidate = make(int(betas32.shape[0]))
        if torch.equal(candidate.to(torch.float32), betas32):
            return candidate, name
    return betas32.double(), "custom"


def adapt(
    net: nn.Module,
    checkpoint: Mapping[str, Any],
    *,
    objective: str = "pred_v",
    use_ema: bool = True,
    image_size: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``net`` (a ``Unet`` built as for training) with the checkpoint's weights, and the
    metadata: the stored betas, the objective's prediction type, the data range."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; one of {', '.join(OBJECTIVES)}")
    state = diffusion_state(checkpoint, use_ema=use_ema)
    if "betas" not in state:
        raise ValueError("the GaussianDiffusion state holds no 'betas' buffer")
    unet = {k[len(UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    net.load_state_dict(unet, strict=True)
    betas, _ = recover_betas(state["betas"])
    metadata: dict[str, Any] = {
        "schedule": betas,  # float64, as the trainer computed its buffers
        "prediction_type": OBJECTIVES[objective],
        "data_range": [-1.0, 1.0],
    }
    channels = getattr(net, "channels", None)
    if image_size is not None and isinstance(channels, int):
        metadata["data_shape"] = [channels, image_size, image_size]
    return net, metadata


def network(kwargs: Mapping[str, Any]) -> nn.Module:
    """The package's own ``Unet(**kwargs)``."""
    from denoising_diffusion_pytorch import Unet

    return Unet(**kwargs)  # type: ignore[no-any-return]


def make(
    path: os.PathLike[str], load_weights: Callable[[os.PathLike[str]], dict[str, Any]]
) -> tuple[nn.Module, dict[str, Any]]:
    """The ``--model`` factory: the file read safely first, then the Unet from ``$DDPM_UNET``."""
    checkpoint = load_weights(path)
    kwargs = json.loads(os.environ.get("DDPM_UNET", '{"dim": 64}'))
    size = os.environ.get("DDPM_IMAGE_SIZE")
    return adapt(
        network(kwargs),
        checkpoint,
        objective=os.environ.get("DDPM_OBJECTIVE", "pred_v"),
        use_ema=os.environ.get("DDPM_USE_EMA", "1") not in ("0", "false", "no"),
        image_size=None if size is None else int(size),
    )
