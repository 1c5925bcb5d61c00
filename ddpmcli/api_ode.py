"""The ODE side of :func:`ddpmcli.nll` (``method="ode"`` or ``"both"``): the log-likelihood of
data under a model's probability-flow ODE (:func:`ddpmcli.run.ode_likelihood.ode_likelihood`),
and the rows that put it beside the variational bound on the same samples.

Kept apart from :mod:`ddpmcli.api` (which calls it) so that module stays one screenful per
command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ddpmcli.checkpoints import LoadedModel
from ddpmcli.checkpoints.latent import space_rows
from ddpmcli.errors import ParameterError
from ddpmcli.run import BoundResult, Observer, RunError
from ddpmcli.run.distributed import Ranks
from ddpmcli.run.ode_likelihood import OdeResult, OdeSettings, ode_likelihood

__all__ = ["NllComparison", "OdeResult", "OdeSettings", "nll_ode"]


@dataclass
class NllComparison:
    """``method="both"``: the bound and the ODE on the same samples. ``rows``: one per sample
    and method, then each method's total, every row naming its ``convention`` (columns
    :data:`~ddpmcli.run.ode_likelihood.ODE_COLUMNS`)."""

    vb: BoundResult
    ode: OdeResult
    rows: list[dict[str, Any]]


def resolve_settings(model: LoadedModel, data: Tensor, settings: OdeSettings | None) -> OdeSettings:
    """``settings`` with dequantization ``auto`` made concrete: uniform for 8-bit images (4-D
    data of a pixel-space model), none for vectors and latents."""
    s = settings or OdeSettings()
    if s.dequantization == "auto":
        images = data.ndim == 4 and model.latent is None
        s = dataclasses.replace(s, dequantization="uniform" if images else "none")
    if model.latent is not None and s.dequantization != "none":
        raise ParameterError("{dequantization} uniform is for 8-bit data; latents are real-valued")
    return s


def _vb_rows(bound: BoundResult) -> list[dict[str, Any]]:
    """The bound's per-sample totals and total, in the ODE's columns; ``evals``: the model
    evaluations per sample (one per evaluated t)."""
    convention = f"vb_{bound.decoder}"
    evals = sum(1 for r in bound.rows if r.get("term") not in ("prior", "total", "total_estimate"))
    values = [] if bound.per_sample_total is None else bound.per_sample_total.tolist()
    rows = [
        {
            "sample": i, "method": "vb", "convention": convention, "bits_per_dim": v,
            "stderr": None, "probe_stderr": None, "evals": evals, "status": "ok",
        }
        for i, v in enumerate(values)
    ]  # fmt: skip
    rows.append(
        {
            "sample": None, "method": "vb", "convention": convention,
            "bits_per_dim": bound.total_bpd, "stderr": bound.total_stderr,
            "probe_stderr": None, "evals": evals,
            "status": "total_estimate" if bound.estimate else "total",
        }
    )  # fmt: skip
    return rows


def comparison_rows(bound: BoundResult, ode: OdeResult) -> list[dict[str, Any]]:
    """The two methods on the same samples: per sample (the bound's row, then the ODE's), then
    the two totals. ``ode.rows`` as :func:`ode_likelihood` names them (not renamed for a
    latent model yet)."""
    vb = _vb_rows(bound)
    out: list[dict[str, Any]] = []
    for a, b in zip(vb[:-1], ode.rows[:-1], strict=True):
        out += [a, b]
    return [*out, vb[-1], ode.rows[-1]]


def nll_ode(
    model: LoadedModel,
    data: Tensor,
    method: str,
    settings: OdeSettings | None,
    bound: Callable[[], BoundResult],
    *,
    observers: Sequence[Observer] = (),
    ranks: Ranks | None = None,
) -> OdeResult | NllComparison:
    """The ODE likelihood of ``data`` (``method="ode"``), or it and ``bound()`` side by side
    (``"both"``; the bound needs a total: every t or a random choice). ``rows`` hold every
    sample's row, then the total(s); a latent model's columns say so."""
    s = resolve_settings(model, data, settings)
    try:
        result = ode_likelihood(
            model.predict, model.schedule, model.prediction_type, data, settings=s,
            data_range=model.data_range, device=model.device, model_dtype=model.dtype,
            observers=observers, ranks=ranks,
        )  # fmt: skip
    except RunError as exc:  # every sample's row, the stopped ones without a number
        exc.rows = space_rows(model, exc.rows)
        raise
    if method == "ode":
        return dataclasses.replace(result, rows=space_rows(model, result.rows))
    vb = bound()
    rows = space_rows(model, comparison_rows(vb, result))
    return NllComparison(vb, dataclasses.replace(result, rows=space_rows(model, result.rows)), rows)
