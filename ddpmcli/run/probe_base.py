"""What every behaviour probe of `ddpm check CKPT` shares: the probe data and batches, the model
call, the score of a reading, and findings with a confidence.

Each probe calls the model on ``x_t = q_sample(x0, t, eps)`` with known ``x0`` and ``eps`` and
asks which reading of its output (or which timestep input) explains it best. The score of a
reading is its x0 error relative to the best *linear* denoiser of data with the same variance
(the Wiener filter, ``var (1 - ab)/(ab var + 1 - ab)`` per value), averaged geometrically over
a few timesteps spread in log-SNR: 1 means "as good as a linear guess", a good model of its data
scores below 1, a wrong reading scores well above. The x0 error of a reading is ``ab/(1 - ab)``
times its eps error and ``1/(1 - ab)`` times its v error (``s x0_hat + r eps_hat = x_t`` for
every reading), so the score is the same whichever space one measures in.

A reading contradicts the checkpoint only when the best one is a good denoiser (score at most
:data:`GOOD_SCORE`) and the declared one scores :data:`CONCLUSIVE_RATIO` times worse; a model
that explains nothing (random weights, off-distribution noise probes) is inconclusive. Findings
carry a ``confidence`` in [0, 1] and the scores behind it; nothing here prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ddpmcli import core
from ddpmcli.checks import Finding, Severity
from ddpmcli.run.noise import pair_noise

PROBE_LOG_SNRS = (4.6, 2.3, 0.0, -2.3, -4.6)
"""log-SNR of the probe timesteps (SNR 100 to 0.01): where eps, x0 and v readings differ most."""
GOOD_SCORE = 1.0
"""The best reading must denoise at least as well as a linear guess to conclude anything."""
CONCLUSIVE_RATIO = 1.5
"""How much worse (score ratio) the declared reading must be than the best to contradict it."""
TIE = 1.05
"""Scores within this ratio of the best count as fitting as well."""


@dataclass(frozen=True)
class ProbeFinding(Finding):
    """A finding of a behaviour probe: ``confidence`` in [0, 1] (None: not a fit) and the
    ``numbers`` it rests on (scores by reading, latent std, ...)."""

    confidence: float | None = None
    numbers: dict[str, float] = field(default_factory=dict, compare=False)


@dataclass
class ProbeData:
    """What the probes run on: ``x0`` ``[n, *data_shape]`` float64 (a latent model's latents),
    where it came from, and a latent model's ``images`` (None otherwise)."""

    x0: Tensor
    source: str
    from_data: bool
    images: Tensor | None = None


Call = Callable[[Tensor, Tensor], Tensor]


def probe_indices(schedule: core.Schedule) -> list[int]:
    """The schedule indices nearest to each of :data:`PROBE_LOG_SNRS` (distinct, ascending);
    log-SNRs beyond the schedule's own end take its nearest end."""
    log_snr = schedule.log_snr
    picked = {int(torch.argmin((log_snr - target).abs())) for target in PROBE_LOG_SNRS}
    return sorted(picked)


def noise_probes(model: Any, n: int, seed: int) -> Tensor:
    """Stand-in data when none is given: Gaussian values centred in the model's range, with a
    quarter of its width as std, clipped to it (float64, ``[n, *data_shape]``)."""
    lo, hi = (float(v) for v in model.data_range)
    if model.latent is not None:
        lo, hi = -2.0, 2.0  # latents are meant to have unit variance
    z = pair_noise(seed ^ 0x5EED, list(range(n)), [0] * n, model.data_shape)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    return (mid + half * (z / 2)).clamp(lo, hi)


def model_output(model: Any, x: Tensor, t: Tensor) -> Tensor:
    """The model's prediction (variance channels dropped) for model input ``t``, float64."""
    from ddpmcli.checkpoints.guard import model_call

    with torch.inference_mode(), model_call():
        if model.conditioning is None:
            out = model.denoiser(x, t)
        else:
            out = model.conditioning.call(
                model.denoiser, x, t, None, learned_variance=model.learned_variance
            )
    if model.learned_variance:
        out = out[:, : out.shape[1] // 2]
    result: Tensor = out.detach().to("cpu", torch.float64)
    return result


def wiener_error(schedule: core.Schedule, i: int, variance: float) -> float:
    """The x0 error per value of the best linear denoiser at index ``i`` for data of
    ``variance``: var (1 - ab)/(ab var + 1 - ab)."""
    ab = float(schedule.alpha_bar[i])
    return variance * (1 - ab) / (ab * variance + 1 - ab)


@dataclass
class Batch:
    """One probe timestep: index, x0, x_t (float64 on the CPU) and its Wiener error."""

    index: int
    x0: Tensor
    x_t: Tensor
    wiener: float
    out: Tensor | None = None  # the model's output at its 0-based timestep, once called


def make_batches(
    model: Any, data: ProbeData, seed: int, indices: Sequence[int] | None = None
) -> list[Batch]:
    sched = model.schedule
    x0 = data.x0
    n = x0.shape[0]
    variance = max(float(x0.var(dim=0, unbiased=False).mean()), 1e-12)
    out = []
    for i in probe_indices(sched) if indices is None else indices:
        eps = pair_noise(seed, list(range(n)), [i] * n, x0.shape[1:])
        t = torch.full((n,), i, dtype=torch.long)
        out.append(Batch(i, x0, sched.q_sample(x0, t, eps), wiener_error(sched, i, variance)))
    return out


def geometric_score(errors: Sequence[float]) -> float:
    """Geometric mean of per-t scores (each floored at 1e-12 so log stays finite)."""
    logs = [math.log(max(e, 1e-12)) for e in errors]
    return math.exp(sum(logs) / len(logs)) if logs else math.inf


def x0_error(sched: core.Schedule, b: Batch, out: Tensor, reading: str) -> float:
    t = torch.full((b.x0.shape[0],), b.index, dtype=torch.long)
    x0_hat = sched.predict_x0(out, b.x_t, t, reading)
    err = float(((x0_hat - b.x0) ** 2).mean())
    return err / b.wiener if math.isfinite(err) else math.inf


def call_at(model: Any, x_t: Tensor, inputs: Tensor) -> Tensor:
    x = x_t.to(device=model.device, dtype=model.dtype)
    return model_output(model, x, inputs.to(model.device))


def declared_output(model: Any, b: Batch) -> Tensor:
    """The model's output on the batch at the timestep ddpm calls it with (once): 0-based t on
    VP, the path's model timestep (float32, 1000 s on a flow) elsewhere, as the sweep does."""
    if b.out is None:
        t = torch.full((b.x0.shape[0],), b.index, dtype=torch.long)
        b.out = call_at(model, b.x_t, model.schedule.network_timesteps(t))
    return b.out


def fit_confidence(scores: dict[str, float], best: str, from_data: bool) -> float:
    """1 - best/runner-up (how clearly the best reading wins), halved on noise probes."""
    others = [v for k, v in scores.items() if k != best]
    runner = min(others) if others else math.inf
    margin = 1.0 - scores[best] / runner if runner > 0 and math.isfinite(runner) else 1.0
    return round(max(0.0, min(1.0, margin)) * (1.0 if from_data else 0.5), 3)


def scores_text(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in sorted(scores.items(), key=lambda kv: kv[1]))


def batch_timesteps(model: Any, batches: list[Batch]) -> tuple[int, ...]:
    return tuple(int(model.schedule.timesteps[b.index]) for b in batches)


def found(
    severity: Severity,
    code: str,
    t: tuple[int, ...],
    template: str,
    confidence: float | None = None,
    numbers: dict[str, float] | None = None,
) -> ProbeFinding:
    """A probe finding whose message is a template (parameters as ``{data_range}``, literal
    braces doubled): ``message`` names the parameters, ``render`` as the caller spells them."""
    plain = Finding.naming(severity, code, t, template)
    return ProbeFinding(
        severity, code, t, plain.message, template, confidence=confidence, numbers=numbers or {}
    )


def literal(text: str) -> str:
    """``text`` (a path, say) as a literal inside a template."""
    return text.replace("{", "{{").replace("}", "}}")
