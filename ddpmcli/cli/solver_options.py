"""The ODE/SDE solver options of `ddpm sample` (and `ddpm steps`): one Annotated alias each, and
the one function that turns the given ones into the library's solver options
(:func:`ddpmcli.api_sampling.solver_options`). Standard library and typer only: `ddpm --help`
imports this.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from ddpmcli.cli.common import in_panel
from ddpmcli.errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor

PANEL_SOLVER = "Solver"
_solver_option = in_panel(PANEL_SOLVER)

OrderOpt = Annotated[
    int | None,
    _solver_option(
        "--order", help="Multistep order: dpmpp-* 1-3 (default 2, 3 for dpmpp-3m), unipc 1-3 (2)."
    ),
]
SolverTypeOpt = Annotated[
    str | None,
    _solver_option(
        "--solver-type",
        help="dpmpp-*: midpoint (default) or heun (2nd-order variant); unipc: bh2 (default) or "
        "bh1 (B(h) = h).",
    ),
]
LowerOrderFinalOpt = Annotated[
    bool | None,
    _solver_option(
        "--lower-order-final/--no-lower-order-final",
        help="dpmpp-*, unipc: lower orders at the last steps (diffusers' rule; default on).",
    ),
]
EulerAtFinalOpt = Annotated[
    bool | None,
    _solver_option("--euler-at-final", help="dpmpp-*: a first-order last step."),
]
FinalSigmasOpt = Annotated[
    str | None,
    _solver_option(
        "--final-sigmas",
        help="Where the last step lands: zero (clean data, default) or sigma_min (the first "
        "training sigma: diffusers' final_sigmas_type, residual noise).",
    ),
]
CorrectorOpt = Annotated[
    bool | None,
    _solver_option("--corrector/--no-corrector", help="unipc: the UniC corrector (default on)."),
]
DpmFormOpt = Annotated[
    str | None,
    _solver_option(
        "--dpm-form",
        help="dpmpp-2m/-3m at order 3: diffusers (default: its update digit for digit, second "
        "order in fact) or exact (the Taylor third-order term and a DPM-Solver++(2S) first step, "
        "one more model call: third order).",
    ),
]
ChurnOpt = Annotated[
    float | None,
    _solver_option("--s-churn", help="euler, heun: Karras et al. 2022's churn (default 0)."),
]
TminOpt = Annotated[
    float | None, _solver_option("--s-tmin", help="euler, heun: churn from this sigma.")
]
TmaxOpt = Annotated[
    float | None, _solver_option("--s-tmax", help="euler, heun: churn up to this sigma.")
]
SnoiseOpt = Annotated[
    float | None, _solver_option("--s-noise", help="euler, heun: churn noise scale (1).")
]
StochasticOpt = Annotated[
    bool | None,
    _solver_option("--stochastic", help="flow-euler: re-noise each step (stochastic_sampling)."),
]
InitOpt = Annotated[
    Path | None,
    _solver_option(
        "--init",
        metavar="FILE.npy",
        help="Start from this standard-normal x_T, [n, *data_shape] (a pipeline's latents before "
        "init_noise_sigma scaling); the noise the steps add still follows --seed.",
    ),
]
SigmasOpt = Annotated[
    str | None,
    _solver_option(
        "--sigmas",
        metavar="S1,S2,...",
        help="An explicit grid of EDM sigmas sigma_t/alpha_t (in any order: run from the "
        "largest down; distinct, no final 0) instead of --steps/--spacing.",
    ),
]


SOLVER_PARAMS = (
    "order", "solver_type", "lower_order_final", "euler_at_final", "final_sigmas", "corrector",
    "s_churn", "s_tmin", "s_tmax", "s_noise", "stochastic", "dpm_form",
)  # fmt: skip
"""The parameter names of the solver options above, as a command takes them."""


def solver_flags(**given: Any) -> dict[str, Any]:
    """The library's solver options of the flags that were given (None: not given)."""
    names = {"final_sigmas": "final_sigmas_type"}
    return {names.get(k, k): v for k, v in given.items() if v is not None}


def solver_flags_of(params: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`solver_flags` of a command's parsed parameters (typer's ``ctx.params``), those of
    :data:`SOLVER_PARAMS` it has."""
    return solver_flags(**{k: params[k] for k in SOLVER_PARAMS if k in params})


def parse_sigmas(text: str | None) -> list[float] | None:
    """``--sigmas 14.6,3,0.5`` as floats (a usage error naming the flag otherwise)."""
    return parse_list(text, "--sigmas", float, "numbers", "sigma")


def parse_list(
    text: str | None, flag: str, cast: Callable[[str], Any], kind: str, one: str
) -> list[Any] | None:
    """A comma-separated ``flag`` value, each item through ``cast`` (``kind``: what they must be;
    ``one``: what one of them is called), or one usage error naming the flag."""
    if text is None:
        return None
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give comma-separated {kind}") from None
    if not values:
        raise UsageError(f"{flag}: give at least one {one}")
    return values


def read_init(path: Path | None) -> Tensor | None:
    """``--init FILE.npy`` as a float tensor (shape and finiteness are checked by the run)."""
    if path is None:
        return None
    import numpy as np
    import torch

    from ddpmcli import limits

    try:
        # the header's shape is checked against the file's bytes before anything is allocated
        # (a 100-byte file claiming shape (10**11, 2) reached the bug handler as MemoryError)
        with open(path, "rb") as stream:
            shape, _ = limits.npy_header(
                stream, os.fstat(stream.fileno()).st_size, f"--init {str(path)!r}",
                error=UsageError,
            )  # fmt: skip
        limits.check_allocation(8 * math.prod(shape), f"--init {str(path)!r}")
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--init {str(path)!r}: not a readable .npy array ({exc})") from None
    if array.dtype.kind not in "fiu":
        raise UsageError(f"--init {str(path)!r}: holds {array.dtype}, not numbers")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
