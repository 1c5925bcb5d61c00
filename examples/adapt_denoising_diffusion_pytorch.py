"""Open lucidrains/denoising-diffusion-pytorch ``Trainer`` checkpoints with ``ddpm --model``.

``Trainer.save`` writes ``results/model-N.pt``, a dict ``{"step", "model", "opt", "ema",
"scaler", "version"}``: ``model`` is the ``GaussianDiffusion``'s state dict (the ``Unet`` under
``model.``, and the schedule as buffers ``betas``, ``alphas_cumprod``, ... stored in float32), and
``ema`` the ``ema_pytorch.EMA``'s (the averaged copy under ``ema_model.``, the live one under
``online_model.``, plus ``initted`` and ``step``). The schedule is read from the stored ``betas``,
so any ``beta_schedule`` (``sigmoid``, ``cosine``, ``linear``) or custom betas come out exactly
as the trainer used them. What the file does not hold is the ``Unet``'s constructor arguments,
the ``objective`` and the image size: set them to what you trained with::

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
import os
from collections.abc import Callable, Mapping
from typing import Any

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
    metadata: dict[str, Any] = {
        "schedule": state["betas"].double(),  # float32 as the trainer stored and used them
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
