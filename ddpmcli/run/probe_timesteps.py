"""The timestep-convention probe of `ddpm check CKPT`: which timestep input explains the model's
outputs best, against the one ddpm calls it with.

On a VP schedule ddpm calls the network with 0-based t; the alternatives are 1-based t, (t + 1)/T,
t 1000/T, sigma and EDM's c_noise. On another path ddpm calls it with the path's declared model
timestep (``Schedule.model_timestep``: 1000 s on a flow, as diffusers' FlowMatchEuler scheduler
and the SD3 pipeline pass it; Flux's pipeline passes s, its transformer multiplying by 1000
inside); the alternatives on a flow are 1000 s, N s (a scheduler of N training steps), s in
[0, 1], the reversed 1 - s and 1000 (1 - s) (rectified-flow code with t = 1 at the data), the
0-based index, and the VP-equivalent sigma = s/(1 - s) and its c_noise; on a sigma-space path
sigma, c_noise = ln(sigma)/4, ln sigma and the index. The declared one is named by the candidate
whose values it equals, else ``declared``. Scores as every probe's (:mod:`.probe_base`), each
convention judged by its worst ratio to the best over the probe timesteps (:func:`regrets`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ddpmcli import core
from ddpmcli.checks import Severity
from ddpmcli.run.probe_base import (
    CONCLUSIVE_RATIO,
    GOOD_SCORE,
    TIE,
    Batch,
    ProbeData,
    ProbeFinding,
    batch_timesteps,
    call_at,
    declared_output,
    fit_confidence,
    found,
    geometric_score,
    make_batches,
    probe_indices,
    scores_text,
    x0_error,
)

__all__ = [
    "convention_finding",
    "convention_inputs",
    "declared_path_convention",
    "path_convention_values",
    "regrets",
]

Inputs = Callable[[core.Schedule, int, int], dict[str, Tensor]]


def convention_inputs(schedule: core.Schedule, index: int, n: int) -> dict[str, Tensor]:
    """The model input of index ``index`` under each timestep convention: ``0-based`` (what
    ddpm feeds), ``1-based`` (t + 1), ``unit`` ((t + 1)/T in (0, 1]), ``per-1000``
    (t 1000/T, improved-diffusion's rescale_timesteps; only when T != 1000), ``sigma``
    (sqrt((1 - ab)/ab)) and ``c_noise`` (EDM's log(sigma)/4; where sigma > 0 and finite)."""
    big_t = schedule.num_train_timesteps
    t = int(schedule.timesteps[index])
    sigma = float(schedule.sigma[index])
    values: dict[str, Tensor] = {
        "0-based": torch.full((n,), t, dtype=torch.long),
        "1-based": torch.full((n,), t + 1, dtype=torch.long),
        "unit": torch.full((n,), (t + 1) / big_t, dtype=torch.float32),
    }
    if big_t != 1000:
        values["per-1000"] = torch.full((n,), t * 1000.0 / big_t, dtype=torch.float32)
    if math.isfinite(sigma) and sigma > 0:
        values["sigma"] = torch.full((n,), sigma, dtype=torch.float32)
        values["c_noise"] = torch.full((n,), 0.25 * math.log(sigma), dtype=torch.float32)
    return values


def path_convention_values(schedule: core.Schedule, index: int) -> dict[str, float]:
    """The model input at ``index`` of a flow or sigma-space path under each convention (see the
    module's docstring), float64 values; sigma and c_noise only where sigma is finite and > 0."""
    i = int(schedule.timesteps[index])
    sigma = float(schedule.sigma[index])  # sigma_t/alpha_t: s/(1 - s) on a flow
    values: dict[str, float] = {}
    if schedule.path == "flow":
        s, n_train = float(schedule.sigma_t[index]), schedule.num_train_timesteps
        values = {"1000 s": 1000 * s, f"{n_train} s": n_train * s, "s": s, "1 - s": 1 - s}
        values["1000 (1 - s)"] = 1000 * (1 - s)
    if math.isfinite(sigma) and sigma > 0:
        values.update({"sigma": sigma, "c_noise": 0.25 * math.log(sigma)})
        if schedule.path != "flow":
            values["ln sigma"] = math.log(sigma)
    values["index"] = float(i)
    return values


def declared_path_convention(schedule: core.Schedule, indices: Sequence[int]) -> str:
    """The name of the convention whose values the path's ``model_timestep`` equals at every
    index of ``indices`` (1e-6 relative), else ``declared``."""
    declared = [float(schedule.model_timestep[i]) for i in indices]
    per_index = [path_convention_values(schedule, i) for i in indices]
    for name in per_index[0]:
        if all(
            name in values and abs(values[name] - d) <= 1e-6 * max(1.0, abs(d))
            for values, d in zip(per_index, declared, strict=True)
        ):
            return name
    return "declared"


def _path_inputs(declared: str) -> Inputs:
    """Model inputs by convention on a path, the declared one under its name ``declared``."""

    def inputs(schedule: core.Schedule, index: int, n: int) -> dict[str, Tensor]:
        values = path_convention_values(schedule, index)
        values.setdefault(declared, float(schedule.model_timestep[index]))
        return {k: torch.full((n,), v, dtype=torch.float32) for k, v in values.items()}

    return inputs


def fit_convention(
    model: Any,
    batches: list[Batch],
    reading: str,
    inputs_of: Inputs = convention_inputs,
    declared: str = "0-based",
) -> dict[str, list[float]]:
    """Per-t scores of each timestep convention (``inputs_of``), the output read as
    ``reading``; ``declared`` is the input ddpm calls the model with (its output is reused); a
    convention the model cannot be called with (an error, a wrong shape) is left out."""
    sched = model.schedule
    errors: dict[str, list[float]] = {}
    failed: set[str] = set()
    for b in batches:
        for name, inputs in inputs_of(sched, b.index, b.x0.shape[0]).items():
            if name in failed:
                continue
            try:
                out = (
                    declared_output(model, b) if name == declared else call_at(model, b.x_t, inputs)
                )
            except Exception:  # a program typed for int64 timesteps, say
                failed.add(name)
                continue
            if out.shape != b.x_t.shape:
                failed.add(name)
                continue
            errors.setdefault(name, []).append(x0_error(sched, b, out, reading))
    count = len(batches)
    return {k: v for k, v in errors.items() if k not in failed and len(v) == count}


def regrets(per_t: dict[str, list[float]]) -> dict[str, float]:
    """Each convention's worst ratio, over the probe timesteps, of its score to the best score
    any convention reaches there: 1 where it is the best everywhere. One step's shift of t
    shows at the first timesteps only, where the noise level changes fastest; this keeps it
    from being averaged away."""
    names = list(per_t)
    count = len(next(iter(per_t.values()))) if per_t else 0
    best = [min(per_t[k][j] for k in names) for j in range(count)]
    return {
        k: max(
            (e / b if b > 0 else (1.0 if e == 0 else math.inf))
            for e, b in zip(per_t[k], best, strict=True)
        )
        for k in names
    }


CONVENTION_FIX = {
    "1-based": "the network was trained with timesteps 1..T: its factory should call it with t + 1",
    "unit": "the network takes t in (0, 1]: its factory should call it with (t + 1)/T",
    "per-1000": "the network takes t 1000/T (improved-diffusion's rescale_timesteps)",
    "sigma": "the network takes the noise level sigma = sqrt((1 - ab)/ab), not t",
    "c_noise": "the network takes EDM's c_noise = log(sigma)/4, not t",
}
PATH_FIX = {
    "s": "the network takes s in [0, 1] (as Flux's transformer and most rectified-flow code do)",
    "1000 s": "the network takes 1000 s (as SD3's transformer and diffusers' FlowMatchEuler do)",
    "1 - s": "the network takes 1 - s (time reversed: t = 1 at the data)",
    "1000 (1 - s)": "the network takes 1000 (1 - s) (time reversed: t = 1000 at the data)",
    "index": "the network takes the 0-based index of a discrete schedule",
    "sigma": "the network takes the noise level sigma_t/alpha_t",
    "c_noise": "the network takes EDM's c_noise = ln(sigma)/4",
    "ln sigma": "the network takes ln sigma",
}
"""Why a path model's best convention differs from the declared one (the fix follows)."""


CONVENTION_INDICES = (0, 1, 2)
"""Probe indices added for the timestep convention: where t and t + 1 differ most."""


def convention_finding(model: Any, data: ProbeData, reading: str, seed: int) -> ProbeFinding | None:
    """Which timestep input explains the outputs best, against the one ddpm feeds (0-based t on
    VP, the path's model timestep elsewhere; scored by :func:`regrets`); None when only the
    declared one could be tried."""
    sched = model.schedule
    first = [i for i in CONVENTION_INDICES if i < sched.num_steps]
    batches = make_batches(model, data, seed, sorted({*first, *probe_indices(sched)}))
    inputs_of: Inputs = convention_inputs
    declared = "0-based"
    if getattr(sched, "path", "vp") != "vp":
        declared = declared_path_convention(sched, [b.index for b in batches])
        inputs_of = _path_inputs(declared)
    per_t = fit_convention(model, batches, reading, inputs_of, declared)
    if len(per_t) < 2 or declared not in per_t:
        return None
    worst = regrets(per_t)
    scores = {k: geometric_score(v) for k, v in per_t.items()}
    best = min(worst, key=lambda k: (worst[k], k != declared))
    conf = fit_confidence(worst, best, data.from_data)
    numbers = {f"regret_{k}": v for k, v in worst.items()}
    numbers.update({f"score_{k}": v for k, v in scores.items()})
    text = f"worst score ratio to the best, read as {reading}: {scores_text(worst)}"
    ts = batch_timesteps(model, batches)
    contradicted = (
        best != declared
        and worst[declared] >= CONCLUSIVE_RATIO
        and worst[best] <= TIE
        and scores[best] <= GOOD_SCORE
    )
    if not contradicted:
        fits = worst[declared] <= TIE and scores[declared] <= GOOD_SCORE
        return found("info", "timestep_convention_fit", ts, _fit_text(declared, fits, text),
                     conf, numbers)  # fmt: skip
    severity: Severity = "error" if data.from_data else "warning"
    return found(severity, "timestep_convention_mismatch", ts,
                 _mismatch_text(declared, best, text), conf, numbers)  # fmt: skip


def _fit_text(declared: str, fits: bool, text: str) -> str:
    if not fits:
        return f"inconclusive ({text})"
    if declared == "0-based":
        return f"the outputs fit 0-based timesteps, as ddpm calls the model ({text})"
    return f"the outputs fit model timestep {declared}, as the schedule declares ({text})"


def _mismatch_text(declared: str, best: str, text: str) -> str:
    if declared == "0-based":
        return (
            f"the outputs fit {best} timesteps, not the 0-based t ddpm calls the model with "
            f"({text}): {CONVENTION_FIX.get(best, '')}"
        )
    return (
        f"the outputs fit model timestep {best}, not the declared {declared} ddpm calls the "
        f"model with ({text}): {PATH_FIX.get(best, 'the network takes another timestep')}; "
        f"store the schedule's model_timestep as {best} (or call it through a --model factory)"
    )
