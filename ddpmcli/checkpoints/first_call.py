"""A denoiser that checks its own output on its first call, instead of a load-time probe.

Loading runs one forward pass on a batch of two rows to check the output shape
(:func:`~ddpmcli.checkpoints.loaded.check_output_shape`). On an SDXL-, SD3- or Flux-size network
that is a whole extra forward pass (twice that with guidance) before any work; and every command
that runs such a model calls it anyway. So these wrappers check the first real call instead: the
same checks (the model runs on the data shape, returns one row per row, of the data's shape), the
same one-line errors, no extra pass. ``checks_itself`` tells the loader to skip its probe.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ddpmcli.checkpoints.unpickler import one_line
from ddpmcli.errors import CheckpointError


class CheckedOnFirstCall:
    """Base of a family's denoiser wrapper: ``forward(x, t, cond)`` is the network call; the
    first ``__call__`` checks it (each moved copy checks again, at no extra cost)."""

    checks_itself = True

    def __init__(self, net: Any, where: str = "") -> None:
        self.net = net
        self.where = f"{where}: " if where else ""
        self._checked = False

    def forward(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        if self._checked:
            return self.forward(x, t, cond)
        shape = list(x.shape[1:])
        try:
            out = self.forward(x, t, cond)
        except Exception as exc:  # the network's own error: a shape mismatch inside it, most likely
            raise CheckpointError(
                f"{self.where}the model fails on inputs of data shape {shape} "
                f"({one_line(exc)}); pass the right data shape"
            ) from None
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise CheckpointError(
                f"{self.where}model output shape {got} does not match data shape {shape} "
                f"(expected {list(x.shape)})"
            )
        self._checked = True
        return out
