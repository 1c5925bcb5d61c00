"""ddpm: see a DDPM noise schedule, its posterior, and what a checkpoint does at every noise
level.

The Python API (:mod:`ddpmcli.api`, the functions the command line itself calls)::

    import ddpmcli
    s = ddpmcli.schedule("cosine", timesteps=1000)
    m = ddpmcli.load("ckpt.pt")                   # or ddpmcli.wrap(module, schedule=s, ...)
    r = ddpmcli.reconstruct(m, x0, t=[0, 500, 999], seed=0)

Its names are imported on first use, so ``import ddpmcli`` (and ``ddpm --help``) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = (
    "schedule", "load", "wrap", "reconstruct", "sample", "nll", "check", "LoadedModel",
    "SampleResult",
)  # fmt: skip
_API_ELSEWHERE = {"check": "ddpmcli.api_check"}
"""API names defined outside :mod:`ddpmcli.api` (which stays under the module size limit)."""

__all__ = [
    "LoadedModel",
    "SampleResult",
    "__version__",
    "check",
    "load",
    "nll",
    "reconstruct",
    "sample",
    "schedule",
    "wrap",
]

if TYPE_CHECKING:
    from ddpmcli.api import (
        LoadedModel,
        SampleResult,
        load,
        nll,
        reconstruct,
        sample,
        schedule,
        wrap,
    )
    from ddpmcli.api_check import check


def __getattr__(name: str) -> Any:
    """The API's names, imported from :mod:`ddpmcli.api` (and torch) on first use."""
    if name in _API:
        module = _API_ELSEWHERE.get(name, "ddpmcli.api")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddpmcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
