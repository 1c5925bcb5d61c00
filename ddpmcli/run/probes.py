"""Probes of a checkpoint's behaviour (the run side of `ddpm check CKPT`).

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

__all__ = [
    "CONCLUSIVE_RATIO",
    "GOOD_SCORE",
    "PROBE_LOG_SNRS",
    "ProbeData",
    "ProbeFinding",
    "probe_indices",
    "probe_model",
]

PROBE_LOG_SNRS = (4.6, 2.3, 0.0, -2.3, -4.6)
"""log-SNR of the probe timesteps (SNR 100 to 0.01): where eps, x0 and v readings differ most."""
GOOD_SCORE = 1.0
"""The best reading must denoise at least as well as a linear guess to conclude anything."""
CONCLUSIVE_RATIO = 1.5
"""How much worse (score ratio) the declared reading must be than the best to contradict it."""
VAE_STD_WARN = 2.0
"""Latent std outside [1/2, 2] on the data: the VAE scaling factor is off (a warning)."""
VAE_STD_ERROR = 4.0
"""Latent std outside [1/4, 4]: the declared scaling factor is contradicted (an error)."""
MAX_CLASSES_PROBED = 32
"""Class-conditional models with more classes than this skip the null-label probe."""
NULL_SLACK = 1.2
"""The null label may score this much worse than the class average before a warning."""
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


def _output(model: Any, x: Tensor, t: Tensor) -> Tensor:
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


def _wiener(schedule: core.Schedule, i: int, variance: float) -> float:
    """The x0 error per value of the best linear denoiser at index ``i`` for data of
    ``variance``: var (1 - ab)/(ab var + 1 - ab)."""
    ab = float(schedule.alpha_bar[i])
    return variance * (1 - ab) / (ab * variance + 1 - ab)


@dataclass
class _Batch:
    """One probe timestep: index, x0, x_t (float64 on the CPU) and its Wiener error."""

    index: int
    x0: Tensor
    x_t: Tensor
    wiener: float
    out: Tensor | None = None  # the model's output at its 0-based timestep, once called


def _batches(
    model: Any, data: ProbeData, seed: int, indices: Sequence[int] | None = None
) -> list[_Batch]:
    sched = model.schedule
    x0 = data.x0
    n = x0.shape[0]
    variance = max(float(x0.var(dim=0, unbiased=False).mean()), 1e-12)
    out = []
    for i in probe_indices(sched) if indices is None else indices:
        eps = pair_noise(seed, list(range(n)), [i] * n, x0.shape[1:])
        t = torch.full((n,), i, dtype=torch.long)
        out.append(_Batch(i, x0, sched.q_sample(x0, t, eps), _wiener(sched, i, variance)))
    return out


def _score(errors: Sequence[float]) -> float:
    """Geometric mean of per-t scores (each floored at 1e-12 so log stays finite)."""
    logs = [math.log(max(e, 1e-12)) for e in errors]
    return math.exp(sum(logs) / len(logs)) if logs else math.inf


def _x0_error(sched: core.Schedule, b: _Batch, out: Tensor, reading: str) -> float:
    t = torch.full((b.x0.shape[0],), b.index, dtype=torch.long)
    x0_hat = sched.predict_x0(out, b.x_t, t, reading)
    err = float(((x0_hat - b.x0) ** 2).mean())
    return err / b.wiener if math.isfinite(err) else math.inf


def _call_at(model: Any, x_t: Tensor, inputs: Tensor) -> Tensor:
    x = x_t.to(device=model.device, dtype=model.dtype)
    return _output(model, x, inputs.to(model.device))


def fit_prediction_type(model: Any, batches: list[_Batch]) -> dict[str, float]:
    """Score of each prediction type the core knows (eps, x0, v, ...) for the model's outputs at
    its 0-based timesteps."""
    sched = model.schedule
    readings = {core.canonical_prediction_type(p) for p in core.PREDICTION_TYPES}
    if getattr(sched, "path", "vp") == "vp":  # a flow reading of a VP model is not a real option
        readings.discard("flow")
    errors: dict[str, list[float]] = {p: [] for p in sorted(readings)}
    for b in batches:
        out = _declared_output(model, b)
        for p in errors:
            errors[p].append(_x0_error(sched, b, out, p))
    return {p: _score(e) for p, e in errors.items()}


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


def fit_convention(model: Any, batches: list[_Batch], reading: str) -> dict[str, list[float]]:
    """Per-t scores of each timestep convention, the output read as ``reading``; a convention
    the model cannot be called with (an error, a wrong shape) is left out."""
    sched = model.schedule
    errors: dict[str, list[float]] = {}
    failed: set[str] = set()
    for b in batches:
        for name, inputs in convention_inputs(sched, b.index, b.x0.shape[0]).items():
            if name in failed:
                continue
            try:
                out = (
                    _declared_output(model, b)
                    if name == "0-based"
                    else _call_at(model, b.x_t, inputs)
                )
            except Exception:  # a program typed for int64 timesteps, say
                failed.add(name)
                continue
            if out.shape != b.x_t.shape:
                failed.add(name)
                continue
            errors.setdefault(name, []).append(_x0_error(sched, b, out, reading))
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


def _confidence(scores: dict[str, float], best: str, from_data: bool) -> float:
    """1 - best/runner-up (how clearly the best reading wins), halved on noise probes."""
    others = [v for k, v in scores.items() if k != best]
    runner = min(others) if others else math.inf
    margin = 1.0 - scores[best] / runner if runner > 0 and math.isfinite(runner) else 1.0
    return round(max(0.0, min(1.0, margin)) * (1.0 if from_data else 0.5), 3)


def _scores_text(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in sorted(scores.items(), key=lambda kv: kv[1]))


def _verdict(
    scores: dict[str, float], declared: str, data: ProbeData
) -> tuple[Severity, str, float]:
    """(severity, best reading, confidence) of a fit against the declared reading."""
    best = min(scores, key=lambda k: scores[k])
    conf = _confidence(scores, best, data.from_data)
    contradicted = (
        best != declared
        and scores[best] <= GOOD_SCORE
        and scores.get(declared, math.inf) >= CONCLUSIVE_RATIO * scores[best]
    )
    if not contradicted:
        return "info", best, conf
    return ("error" if data.from_data else "warning"), best, conf


def _ts(model: Any, batches: list[_Batch]) -> tuple[int, ...]:
    return tuple(int(model.schedule.timesteps[b.index]) for b in batches)


def prediction_type_finding(
    model: Any, batches: list[_Batch], data: ProbeData
) -> tuple[ProbeFinding, str]:
    """The prediction-type fit as a finding, and the reading the other probes use (the best one
    where it contradicts the declared one, else the declared one)."""
    scores = fit_prediction_type(model, batches)
    declared = core.canonical_prediction_type(model.prediction_type)
    severity, best, conf = _verdict(scores, declared, data)
    numbers = {f"score_{k}": v for k, v in scores.items()}
    text = (
        f"scores (x0 error / linear denoiser's, on {_literal(data.source)}): {_scores_text(scores)}"
    )
    if severity == "info":
        fits = scores.get(declared, math.inf) <= TIE * scores[best] <= TIE * GOOD_SCORE
        what = (
            f"the outputs fit {declared}, as declared ({text})"
            if fits
            else f"inconclusive: no reading denoises clearly better than a linear guess or the "
            f"declared {declared} ({text})"
        )
        return _found("info", "prediction_type_fit", _ts(model, batches), what, conf,
                      numbers), declared  # fmt: skip
    message = (
        f"the outputs fit {best}, not the declared {declared} ({text}): the checkpoint's "
        f"prediction type is wrong; declare {best} (or pass {{prediction_type}} {best})"
    )
    ts = _ts(model, batches)
    return _found(severity, "prediction_type_mismatch", ts, message, conf, numbers), best


def _found(
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


def _literal(text: str) -> str:
    """``text`` (a path, say) as a literal inside a template."""
    return text.replace("{", "{{").replace("}", "}}")


CONVENTION_FIX = {
    "1-based": "the network was trained with timesteps 1..T: its factory should call it with t + 1",
    "unit": "the network takes t in (0, 1]: its factory should call it with (t + 1)/T",
    "per-1000": "the network takes t 1000/T (improved-diffusion's rescale_timesteps)",
    "sigma": "the network takes the noise level sigma = sqrt((1 - ab)/ab), not t",
    "c_noise": "the network takes EDM's c_noise = log(sigma)/4, not t",
}


CONVENTION_INDICES = (0, 1, 2)
"""Probe indices added for the timestep convention: where t and t + 1 differ most."""


def convention_finding(model: Any, data: ProbeData, reading: str, seed: int) -> ProbeFinding | None:
    """Which timestep input explains the outputs best, against the 0-based timesteps ddpm
    feeds (scored by :func:`regrets`); None when only 0-based could be tried."""
    sched = model.schedule
    if getattr(sched, "path", "vp") != "vp":
        return None  # flow and sigma-space models take their path's own model timesteps
    first = [i for i in CONVENTION_INDICES if i < sched.num_steps]
    batches = _batches(model, data, seed, sorted({*first, *probe_indices(sched)}))
    per_t = fit_convention(model, batches, reading)
    if len(per_t) < 2 or "0-based" not in per_t:
        return None
    worst = regrets(per_t)
    scores = {k: _score(v) for k, v in per_t.items()}
    best = min(worst, key=lambda k: (worst[k], k != "0-based"))
    conf = _confidence(worst, best, data.from_data)
    numbers = {f"regret_{k}": v for k, v in worst.items()}
    numbers.update({f"score_{k}": v for k, v in scores.items()})
    text = f"worst score ratio to the best, read as {reading}: {_scores_text(worst)}"
    ts = _ts(model, batches)
    contradicted = (
        best != "0-based"
        and worst["0-based"] >= CONCLUSIVE_RATIO
        and worst[best] <= TIE
        and scores[best] <= GOOD_SCORE
    )
    if not contradicted:
        what = (
            f"the outputs fit 0-based timesteps, as ddpm calls the model ({text})"
            if worst["0-based"] <= TIE and scores["0-based"] <= GOOD_SCORE
            else f"inconclusive ({text})"
        )
        return _found("info", "timestep_convention_fit", ts, what, conf, numbers)
    severity: Severity = "error" if data.from_data else "warning"
    message = (
        f"the outputs fit {best} timesteps, not the 0-based t ddpm calls the model with "
        f"({text}): {CONVENTION_FIX.get(best, '')}"
    )
    return _found(severity, "timestep_convention_mismatch", ts, message, conf, numbers)


def _declared_output(model: Any, b: _Batch) -> Tensor:
    """The model's output on the batch at the 0-based timestep ddpm calls it with (once)."""
    if b.out is None:
        t = model.schedule.timesteps[torch.full((b.x0.shape[0],), b.index, dtype=torch.long)]
        b.out = _call_at(model, b.x_t, t.to(torch.long))
    return b.out


def _x0_hats(model: Any, batches: list[_Batch], reading: str) -> list[Tensor]:
    sched = model.schedule
    out = []
    for b in batches:
        t = torch.full((b.x0.shape[0],), b.index, dtype=torch.long)
        out.append(sched.predict_x0(_declared_output(model, b), b.x_t, t, reading))
    return out


def range_finding(model: Any, batches: list[_Batch], reading: str, good: bool) -> ProbeFinding:
    """Where the model's x0 predictions lie against its declared data range: a warning when a
    good denoiser (``good``) puts a fifth of them more than a tenth of the width outside."""
    lo, hi = (float(v) for v in model.data_range)
    hats = torch.cat([h.reshape(-1) for h in _x0_hats(model, batches, reading)])
    hats = hats[torch.isfinite(hats)]
    width = hi - lo
    outside = float(((hats < lo - 0.1 * width) | (hats > hi + 0.1 * width)).double().mean())
    span = (float(hats.min()), float(hats.max())) if hats.numel() else (math.nan, math.nan)
    numbers = {"x0_hat_min": span[0], "x0_hat_max": span[1], "fraction_outside": outside}
    text = (
        f"x0 predictions span [{span[0]:.4g}, {span[1]:.4g}] for the declared range "
        f"[{lo:g}, {hi:g}] ({100 * outside:.3g}% more than a tenth of its width outside)"
    )
    ts = _ts(model, batches)
    if good and outside > 0.2:
        message = (
            text + ": the model was trained on data of another range; declare it ({data_range})"
        )
        return _found("warning", "data_range_mismatch", ts, message, None, numbers)
    return _found("info", "data_range_fit", ts, text, None, numbers)


def vae_finding(model: Any, data: ProbeData) -> ProbeFinding | None:
    """A latent model's latents of the data (encoded, shifted and scaled as its pipeline does)
    should have unit variance: their std against [1/2, 2] (warning) and [1/4, 4] (error)."""
    latent = model.latent
    if latent is None or data.images is None:
        return None
    z = data.x0
    std = float(z.std(unbiased=False))
    mean = float(z.mean())
    factor, shift = float(latent.scaling_factor), float(latent.shift_factor)
    numbers = {"latent_std": std, "latent_mean": mean, "scaling_factor": factor}
    numbers["shift_factor"] = shift
    better = factor / std if std > 0 else math.inf
    text = (
        f"latents of {_literal(data.source)} have std {std:.4g} and mean {mean:.4g} with "
        f"scaling_factor {factor:g} and shift_factor {shift:g}"
    )
    off = max(std, 1 / std) if std > 0 else math.inf
    if off <= VAE_STD_WARN and abs(mean) <= 1.0:
        return _found("info", "vae_scaling_fit", (), text + ": about unit variance", None, numbers)
    parts = []
    if off > VAE_STD_WARN:
        parts.append(f"scaling_factor {better:.4g} gives them unit variance")
    if abs(mean) > 1.0 and std > 0:
        parts.append(f"shift_factor {shift + mean / factor:.4g} centres them")
    severity: Severity = "error" if off > VAE_STD_ERROR else "warning"
    message = f"{text}: the denoiser expects unit-variance latents; {'; '.join(parts)}"
    conf = round(min(1.0, math.log(off) / math.log(VAE_STD_ERROR)), 3) if off > 1 else 0.5
    return _found(severity, "vae_scaling_mismatch", (), message, conf, numbers)


def spacing_finding(schedule: core.Schedule, spacing: str, offset: int, steps: int) -> ProbeFinding:
    """Where the sampler's grid (``steps`` with the checkpoint's ``spacing``) starts against the
    training schedule's end: a warning when the training schedule ends at zero SNR and the
    sampler never gets there (its first step then sees less noise than x_T)."""
    big_t = schedule.num_train_timesteps
    respaced = core.respaced(schedule, min(steps, big_t), spacing, offset)
    start = int(respaced.timesteps[-1])
    start_snr, end_snr = float(respaced.snr[-1]), float(schedule.snr[-1])
    numbers = {"start_t": float(start), "start_snr": start_snr, "terminal_snr": end_snr}
    text = (
        f"{spacing} spacing with {respaced.num_steps} steps starts at t = {start} "
        f"(SNR {start_snr:.4g}); training ends at t = {big_t - 1} (SNR {end_snr:.4g})"
    )
    if end_snr == 0.0 and start_snr > 0.0:
        message = (
            text + ": the zero terminal SNR the model was trained for is never reached, so "
            "sampling starts from pure noise at a t that expects signal; use {spacing} trailing"
        )
        return _found("warning", "terminal_snr_unreachable", (start,), message, None, numbers)
    return _found("info", "sampling_start", (start,), text, None, numbers)


def null_label_finding(
    model: Any, batches: list[_Batch], reading: str, data: ProbeData
) -> ProbeFinding | None:
    """A class-conditional model's null label should denoise data of all classes at least as
    well as the average of its class-conditional predictions (the unconditional denoiser is
    the best function of x_t alone): a warning when it scores :data:`NULL_SLACK` times worse."""
    cond = model.conditioning
    if cond is None or getattr(cond, "null_label", None) is None:
        return None
    classes = int(cond.num_classes)
    if classes > MAX_CLASSES_PROBED:
        return None
    middle = batches[1:-1] if len(batches) > 2 else batches
    sched = model.schedule
    labelled: dict[str, list[float]] = {"null": [], "class_average": []}
    for b in middle:
        n = b.x0.shape[0]
        t = torch.full((n,), b.index, dtype=torch.long)
        x = b.x_t.to(device=model.device, dtype=model.dtype)
        mt = sched.timesteps[t].to(device=model.device, dtype=torch.long)
        hats = []
        for label in [*range(classes), int(cond.null_label)]:
            labels = torch.full((n,), label, dtype=torch.long, device=model.device)
            raw = _labelled(model, x, mt, labels)
            hats.append(sched.predict_x0(raw, b.x_t, t, reading))
        avg = torch.stack(hats[:-1]).mean(0)
        for name, hat in (("null", hats[-1]), ("class_average", avg)):
            labelled[name].append(float(((hat - b.x0) ** 2).mean()) / b.wiener)
    scores = {k: _score(v) for k, v in labelled.items()}
    numbers = {f"score_{k}": v for k, v in scores.items()}
    text = (
        f"null label {cond.null_label} scores {scores['null']:.3g}, the average of the "
        f"{classes} classes' predictions {scores['class_average']:.3g} (on {_literal(data.source)})"
    )
    ts = tuple(int(sched.timesteps[b.index]) for b in middle)
    if scores["null"] <= NULL_SLACK * scores["class_average"]:
        return _found("info", "null_label_fit", ts, text + ": it acts as unconditional", None,
                      numbers)  # fmt: skip
    # the classes' average is no posterior-weighted mixture, so it may score a little above a
    # linear guess; beyond CONCLUSIVE_RATIO times one, the classes explain nothing either
    if scores["class_average"] > CONCLUSIVE_RATIO * GOOD_SCORE:
        return _found("info", "null_label_fit", ts, text + ": inconclusive", None, numbers)
    conf = round(1 - scores["class_average"] / scores["null"], 3)
    message = (
        text + ": the null label does not act as the unconditional model (trained without "
        "label dropout, or another null label); classifier-free guidance will be off"
    )
    return _found("warning", "null_label_not_unconditional", ts, message, conf, numbers)


def _labelled(model: Any, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
    from ddpmcli.checkpoints.guard import model_call

    with torch.inference_mode(), model_call():
        out = model.denoiser(x, t, labels)
    if model.learned_variance:
        out = out[:, : out.shape[1] // 2]
    result: Tensor = out.detach().to("cpu", torch.float64)
    return result


def probe_model(
    model: Any,
    data: ProbeData,
    *,
    seed: int = 0,
    spacing: tuple[str, int] = ("trailing", 0),
    steps: int = 50,
) -> list[ProbeFinding]:
    """Every behaviour probe of ``model`` (a :class:`~ddpmcli.checkpoints.LoadedModel`) on
    ``data``, in a fixed order: prediction type, timestep convention, data range, VAE scaling,
    sampling start, null label. ``spacing`` is the sampler's (spacing, steps_offset)."""
    batches = _batches(model, data, seed)
    pred, reading = prediction_type_finding(model, batches, data)
    good = float(pred.numbers.get(f"score_{reading}", math.inf)) <= GOOD_SCORE
    found: list[ProbeFinding | None] = [
        pred,
        convention_finding(model, data, reading, seed),
        range_finding(model, batches, reading, good) if model.latent is None else None,
        vae_finding(model, data),
        spacing_finding(model.schedule, spacing[0], spacing[1], steps),
        null_label_finding(model, batches, reading, data),
    ]
    return [f for f in found if f is not None]
