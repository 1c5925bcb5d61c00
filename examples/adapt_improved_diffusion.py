"""Open openai/improved-diffusion and openai/guided-diffusion checkpoints with ``ddpm --model``.

Their ``ema_0.9999_NNNNNN.pt`` (and ``modelNNNNNN.pt``) files are bare state dicts of a
``UNetModel``; what the network and the diffusion were built with lives only in the training
command's flags. Give this adapter the same flags, in the same environment variables the
projects' READMEs use::

    export MODEL_FLAGS="--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True"
    export DIFFUSION_FLAGS="--diffusion_steps 4000 --noise_schedule cosine"
    ddpm info --model examples/adapt_improved_diffusion.py:make ema_0.9999_500000.pt
    ddpm reconstruct --model examples/adapt_improved_diffusion.py:make ema_0.9999_500000.pt \\
        --data images/ --n 64

``make`` needs the project itself importable (``pip install -e improved-diffusion``, or
``guided-diffusion``: set ``DDPM_UNET_PACKAGE=guided_diffusion``). What it maps:

- ``--learn_sigma True``: the network outputs 2C channels, ``[eps, v]``; ``v`` is the variance
  interpolation value of ``learned_range`` (ddpm's ``learned_variance``), as in the paper;
- ``--noise_schedule linear|cosine`` and ``--diffusion_steps T``: improved-diffusion's linear
  schedule scales its ends by 1000/T (``scale_to_timesteps``), its cosine one is Nichol and
  Dhariwal's with the 0.999 cap, both exactly ddpm's;
- ``--predict_xstart True``: an x0 (``sample``) prediction, else epsilon;
- the variance its trainer's bound (``calc_bpd_loop``) and sampler use: ``learned_range`` with
  ``--learn_sigma True``, else ``fixed_large`` (beta), or ``fixed_small`` with
  ``--sigma_small True``; declared as the metadata ``variance``, the default of
  ``ddpm sample --variance`` and ``ddpm nll --variance``;
- ``--rescale_timesteps``: improved-diffusion (default True) feeds the network ``t * 1000 / T``
  as a float; guided-diffusion's default is False. ddpm hands the network integer model
  timesteps, so the adapter wraps it in :class:`RescaledTimesteps` when the flag is on;
- data in [-1, 1], shape ``[in_channels, image_size, image_size]`` (in_channels 3).

Class-conditional models (``--class_cond True``; guided-diffusion's ImageNet models) are told
apart by their state dict, whatever the flags say: a ``label_emb.weight`` of shape
``[num_classes, C]`` (the label embedding added to the time embedding). The adapter then declares
``num_classes``, the network is called ``net(x, t, y=labels)``, and ``ddpm --class-label`` picks
the labels. These models have NO null label (guided-diffusion guides with a separate classifier,
not classifier-free), so ``--class-label`` is required and ``--guidance-scale`` is refused. A
model trained with label dropout (an extra row for the unconditional label, as in classifier-free
guidance forks) declares it with ``DDPM_NULL_LABEL=N`` (the last row), and then guides.
"""

from __future__ import annotations

import importlib
import os
import shlex
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

# improved-diffusion's script_util.model_and_diffusion_defaults() (and image_train.py's own keys
# that travel in MODEL_FLAGS): argparse types each flag by its default, as these do. Used when the
# package is not importable; otherwise its own defaults are read (guided-diffusion's differ).
PACKAGE_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "attention_resolutions": "16,8",
    "dropout": 0.0,
    "learn_sigma": False,
    "sigma_small": False,
    "class_cond": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": True,
    "rescale_learned_sigmas": True,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "use_fp16": False,
}
DEFAULTS = {
    k: PACKAGE_DEFAULTS[k]
    for k in (
        "image_size", "learn_sigma", "class_cond", "diffusion_steps", "noise_schedule",
        "predict_xstart", "rescale_timesteps", "sigma_small",
    )
}  # fmt: skip
"""What ddpm needs to know, at improved-diffusion's defaults (the flags override them)."""
DIFFUSION_KEYS = (
    "diffusion_steps",
    "noise_schedule",
    "predict_xstart",
    "rescale_timesteps",
    "timestep_respacing",
    "use_kl",
    "sigma_small",
    "rescale_learned_sigmas",
)


class RescaledTimesteps(nn.Module):
    """``net(x, t * 1000 / T)``: what improved-diffusion's ``rescale_timesteps`` feeds the
    network, for ddpm's integer model timesteps."""

    def __init__(self, net: nn.Module, diffusion_steps: int) -> None:
        super().__init__()
        self.net = net
        self.scale = 1000.0 / diffusion_steps

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        scaled = t.to(torch.float32) * self.scale
        return self.net(x, scaled) if y is None else self.net(x, scaled, y)


TRUE_WORDS = ("yes", "true", "t", "y", "1")
FALSE_WORDS = ("no", "false", "f", "n", "0")
"""The words improved-diffusion's ``str2bool`` reads as True and False (any case)."""


def _typed(name: str, value: str, defaults: Mapping[str, Any]) -> Any:
    """``value`` as argparse reads ``--name value`` with ``type(default)`` (a bool default:
    ``str2bool``; no default: a string). ``attention_resolutions 16`` stays the string "16"."""
    if name not in defaults or defaults[name] is None or isinstance(defaults[name], str):
        return value
    default = defaults[name]
    if isinstance(default, bool):
        if value.lower() in TRUE_WORDS:
            return True
        if value.lower() in FALSE_WORDS:
            return False
        raise ValueError(f"--{name} {value!r}: improved-diffusion wants a boolean")
    try:
        return type(default)(value)
    except ValueError:
        kind = type(default).__name__
        raise ValueError(f"--{name} {value!r}: improved-diffusion reads it as {kind}") from None


def parse_flags(text: str, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``--name value`` pairs, each typed as the project's argparse types it: by the type of
    its default in ``defaults`` (default: :func:`package_defaults`)."""
    known = package_defaults() if defaults is None else defaults
    words = shlex.split(text)
    if len(words) % 2:
        raise ValueError(f"flags come in --name value pairs: {text!r}")
    out: dict[str, Any] = {}
    for name, value in zip(words[::2], words[1::2], strict=True):
        key = name.lstrip("-")
        out[key] = _typed(key, value, known)
    return out


def package_defaults() -> dict[str, Any]:
    """The installed project's ``script_util.model_and_diffusion_defaults()`` (improved_diffusion,
    or ``$DDPM_UNET_PACKAGE``) over :data:`PACKAGE_DEFAULTS`; the latter alone when it is not
    importable."""
    out = dict(PACKAGE_DEFAULTS)
    package = os.environ.get("DDPM_UNET_PACKAGE", "improved_diffusion")
    try:
        script_util: Any = importlib.import_module(f"{package}.script_util")
    except ImportError:
        return out
    out.update(script_util.model_and_diffusion_defaults())
    return out


def settings_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """DEFAULTS (the installed project's own, where it differs) overridden by ``$MODEL_FLAGS``
    and ``$DIFFUSION_FLAGS``, each flag typed as the project types it."""
    env = os.environ if env is None else env
    defaults = package_defaults()
    settings = {k: defaults.get(k, v) for k, v in DEFAULTS.items()}
    settings.update(parse_flags(env.get("MODEL_FLAGS", ""), defaults))
    settings.update(parse_flags(env.get("DIFFUSION_FLAGS", ""), defaults))
    null = env.get("DDPM_NULL_LABEL", "").strip()
    if null:
        try:
            settings["null_label"] = int(null)
        except ValueError:
            raise ValueError(f"DDPM_NULL_LABEL must be an integer, got {null!r}") from None
    return settings


def label_classes(
    state: Mapping[str, Tensor], null_label: int | None = None
) -> tuple[int, int | None] | None:
    """``(num_classes, null_label)`` of a class-conditional state dict, None if unconditional.

    The ``UNetModel`` of both projects has ``label_emb = nn.Embedding(num_classes, C)`` only when
    built with ``num_classes``; a null label, where one was trained, is its last row.
    """
    table = state.get("label_emb.weight")
    if table is None:
        if null_label is not None:
            raise ValueError("DDPM_NULL_LABEL is set, but the checkpoint is not class-conditional")
        return None
    rows = int(table.shape[0])
    if null_label is None:
        return rows, None
    if null_label != rows - 1 or rows < 2:
        raise ValueError(
            f"DDPM_NULL_LABEL must be the label table's last row, {rows - 1}, got {null_label}"
        )
    return rows - 1, null_label


def with_classes(settings: Mapping[str, Any], state: Mapping[str, Tensor]) -> dict[str, Any]:
    """``settings`` with ``class_cond`` and the label table's size as the state dict has them."""
    out = dict(settings)
    table = state.get("label_emb.weight")
    out["class_cond"] = table is not None
    if table is not None:
        out["label_rows"] = int(table.shape[0])
    return out


def schedule_spec(noise_schedule: str, diffusion_steps: int) -> dict[str, Any]:
    """improved-diffusion's ``get_named_beta_schedule(name, T)`` as a ddpm schedule spec."""
    if noise_schedule == "linear":  # ends 1e-4 and 0.02 scaled by 1000/T
        params = {"scale_to_timesteps": 1.0}
        return {"kind": "linear", "timesteps": diffusion_steps, "params": params}
    if noise_schedule == "cosine":
        return {"kind": "cosine", "timesteps": diffusion_steps}
    raise ValueError(f"unknown noise_schedule {noise_schedule!r} (linear or cosine)")


def adapt(
    net: nn.Module, state: Mapping[str, Tensor], settings: Mapping[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    """``net`` with the checkpoint's weights, and the metadata ddpm needs, from ``settings``
    (the training flags, see :func:`settings_from_env`)."""
    classes = label_classes(state, settings.get("null_label"))
    if settings.get("class_cond") and classes is None:
        raise ValueError("class_cond is True, but the checkpoint has no label_emb.weight")
    if settings.get("timestep_respacing"):
        raise ValueError("timestep_respacing is a sampling flag: drop it (ddpm sample --steps)")
    net.load_state_dict(dict(state), strict=True)
    steps = int(settings["diffusion_steps"])
    module = RescaledTimesteps(net, steps) if settings["rescale_timesteps"] else net
    size = int(settings["image_size"])
    metadata: dict[str, Any] = {
        "schedule": schedule_spec(str(settings["noise_schedule"]), steps),
        "prediction_type": "sample" if settings["predict_xstart"] else "epsilon",
        "learned_variance": bool(settings["learn_sigma"]),
        "data_shape": [int(settings.get("in_channels", 3)), size, size],
        "data_range": [-1.0, 1.0],
    }
    # the variance its own bound and sampler use (create_gaussian_diffusion's model_var_type)
    if settings["learn_sigma"]:
        metadata["variance"] = "learned_range"
    else:
        metadata["variance"] = "fixed_small" if settings.get("sigma_small") else "fixed_large"
    if classes is not None:
        metadata["num_classes"], metadata["null_label"] = classes
    return module, metadata


def network(settings: Mapping[str, Any]) -> nn.Module:
    """The project's own ``UNetModel``, built by its ``create_model_and_diffusion`` from the
    flags (package ``improved_diffusion``, or ``$DDPM_UNET_PACKAGE``)."""
    package = os.environ.get("DDPM_UNET_PACKAGE", "improved_diffusion")
    script_util: Any = importlib.import_module(f"{package}.script_util")
    if settings.get("label_rows"):
        # create_model builds label_emb with the module's NUM_CLASSES (1000, ImageNet); a model
        # trained with another count (or an extra null row) has that many rows instead
        script_util.NUM_CLASSES = int(settings["label_rows"])
    defaults = script_util.model_and_diffusion_defaults()
    args = {k: settings.get(k, v) for k, v in defaults.items()}
    model: nn.Module = script_util.create_model_and_diffusion(**args)[0]
    return model


def make(
    path: os.PathLike[str], load_weights: Callable[[os.PathLike[str]], dict[str, Any]]
) -> tuple[nn.Module, dict[str, Any]]:
    """The ``--model`` factory: weights read safely first, then the project's network."""
    state = load_weights(path)
    settings = with_classes(settings_from_env(), state)
    return adapt(network(settings), state, settings)
