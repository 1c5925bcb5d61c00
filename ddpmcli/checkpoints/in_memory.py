"""An in-memory model (an ``nn.Module`` or a plain callable) as a denoiser: what
:func:`ddpmcli.wrap` turns into a ``LoadedModel`` (its ``info`` says format ``in-memory``).

A module runs in eval mode, its own mode restored after each call; a run that needs another
device or dtype gets a moved copy, never the caller's module moved in place.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ddpmcli.checkpoints.conditioning import MAX_CLASSES, class_counts
from ddpmcli.errors import ParameterError, verbatim

Mover = Callable[[torch.device, torch.dtype | None], Callable[[Tensor, Tensor], Tensor]]
"""Gives the denoiser on a device in a dtype (None: the model's own)."""


def module_state(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a module's parameters (or buffers) live and their floating dtype (CPU/float32 for
    a module without any)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def output_tensor(out: Any) -> Any:
    """A model's output as a tensor: diffusers' ``UNet2DOutput`` (``.sample``) and tuples
    (first item) are unwrapped; anything else is left for the shape check to refuse."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    sample_field = getattr(out, "sample", None)
    return sample_field if isinstance(sample_field, Tensor) else out


def module_denoiser(module: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """``module(x_t, t)`` in eval mode, the module's own mode restored after the call; a
    class-conditional one is called ``module(x_t, t, labels)``."""

    def denoise(x_t: Tensor, t: Tensor, *condition: Tensor) -> Tensor:
        training = module.training
        module.eval()
        try:
            return output_tensor(module(x_t, t, *condition))
        finally:
            module.train(training)

    return denoise


def module_mover(module: nn.Module) -> Mover:
    """Moves a wrapped module: itself where it already is, else a moved copy (``nn.Module.to``
    acts in place, and a training loop's module must not change device or dtype under it)."""

    def move(device: torch.device, dtype: torch.dtype | None) -> Callable[[Tensor, Tensor], Tensor]:
        here, own = module_state(module)
        same_device = here == device or (here.type == device.type and device.index is None)
        if same_device and (dtype is None or dtype == own):
            return module_denoiser(module)
        moved = copy.deepcopy(module)
        if dtype is None:
            moved.to(device=device)
        else:
            moved.to(device=device, dtype=dtype)
        return module_denoiser(moved)

    return move


def callable_mover(fn: Callable[[Tensor, Tensor], Any]) -> Mover:
    """A plain callable cannot be moved: it is called with x_t on the device and in the dtype
    of the run, and must cope."""

    def denoise(x_t: Tensor, t: Tensor, *condition: Tensor) -> Tensor:
        return output_tensor(fn(x_t, t, *condition))

    return lambda device, dtype: denoise


def class_keys(num_classes: object, null_label: object) -> dict[str, int | None]:
    """The class keys of ``info`` (what ``conditioning.attach`` reads) for ``wrap``, checked as a
    factory's metadata is (:func:`~ddpmcli.checkpoints.conditioning.class_counts`)."""
    try:
        counts = class_counts(num_classes, null_label)
    except ValueError as exc:
        if exc.args[0] == "null_label without num_classes":
            raise ParameterError("{null_label} needs {num_classes}") from None
        if exc.args[0] == "num_classes":
            raise ParameterError(
                f"{{num_classes}} must be a positive integer (at most {MAX_CLASSES}), got "
                f"{verbatim(repr(num_classes))}"
            ) from None
        num = exc.args[1]
        raise ParameterError(
            f"{{null_label}} must be an integer outside the classes 0..{num - 1} (usually "
            f"{num}, the label table's extra row; at most {MAX_CLASSES}), got "
            f"{verbatim(repr(null_label))}"
        ) from None
    if counts is None:
        return {}
    return {"num_classes": counts[0], "null_label": counts[1]}
