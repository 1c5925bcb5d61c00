"""Probes of a checkpoint's behaviour (the run side of `ddpm check CKPT`): prediction type,
timestep convention (:mod:`ddpmcli.run.probe_timesteps`), data range, VAE scaling, sampling
start and null label, each a finding with a confidence and the numbers behind it.

How a reading is scored, and when it contradicts the checkpoint, is said once in
:mod:`ddpmcli.run.probe_base`, which holds what every probe shares. Nothing here prints.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ddpmcli import core
from ddpmcli.checks import Severity
from ddpmcli.run.probe_base import (
    CONCLUSIVE_RATIO,
    GOOD_SCORE,
    PROBE_LOG_SNRS,
    TIE,
    Batch,
    ProbeData,
    ProbeFinding,
    batch_timesteps,
    declared_output,
    fit_confidence,
    found,
    geometric_score,
    literal,
    make_batches,
    noise_probes,
    probe_indices,
    scores_text,
    x0_error,
)
from ddpmcli.run.probe_timesteps import convention_finding

__all__ = [
    "CONCLUSIVE_RATIO",
    "GOOD_SCORE",
    "PROBE_LOG_SNRS",
    "ProbeData",
    "ProbeFinding",
    "noise_probes",
    "probe_indices",
    "probe_model",
]

VAE_STD_WARN = 2.0
"""Latent std outside [1/2, 2] on the data: the VAE scaling factor is off (a warning)."""
VAE_STD_ERROR = 4.0
"""Latent std outside [1/4, 4]: the declared scaling factor is contradicted (an error)."""
MAX_CLASSES_PROBED = 32
"""Class-conditional models with more classes than this skip the null-label probe."""
NULL_SLACK = 1.2
"""The null label may score this much worse than the class average before a warning."""


def fit_prediction_type(model: Any, batches: list[Batch]) -> dict[str, float]:
    """Score of each prediction type the core knows (eps, x0, v, ...) for the model's outputs at
    its 0-based timesteps."""
    sched = model.schedule
    readings = {core.canonical_prediction_type(p) for p in core.PREDICTION_TYPES}
    if getattr(sched, "path", "vp") == "vp":  # a flow reading of a VP model is not a real option
        readings.discard("flow")
    errors: dict[str, list[float]] = {p: [] for p in sorted(readings)}
    for b in batches:
        out = declared_output(model, b)
        for p in errors:
            errors[p].append(x0_error(sched, b, out, p))
    return {p: geometric_score(e) for p, e in errors.items()}


def _verdict(
    scores: dict[str, float], declared: str, data: ProbeData
) -> tuple[Severity, str, float]:
    """(severity, best reading, confidence) of a fit against the declared reading."""
    best = min(scores, key=lambda k: scores[k])
    conf = fit_confidence(scores, best, data.from_data)
    contradicted = (
        best != declared
        and scores[best] <= GOOD_SCORE
        and scores.get(declared, math.inf) >= CONCLUSIVE_RATIO * scores[best]
    )
    if not contradicted:
        return "info", best, conf
    return ("error" if data.from_data else "warning"), best, conf


def prediction_type_finding(
    model: Any, batches: list[Batch], data: ProbeData
) -> tuple[ProbeFinding, str]:
    """The prediction-type fit as a finding, and the reading the other probes use (the best one
    where it contradicts the declared one, else the declared one)."""
    scores = fit_prediction_type(model, batches)
    declared = core.canonical_prediction_type(model.prediction_type)
    severity, best, conf = _verdict(scores, declared, data)
    numbers = {f"score_{k}": v for k, v in scores.items()}
    text = (
        f"scores (x0 error / linear denoiser's, on {literal(data.source)}): {scores_text(scores)}"
    )
    if severity == "info":
        fits = scores.get(declared, math.inf) <= TIE * scores[best] <= TIE * GOOD_SCORE
        what = (
            f"the outputs fit {declared}, as declared ({text})"
            if fits
            else f"inconclusive: no reading denoises clearly better than a linear guess or the "
            f"declared {declared} ({text})"
        )
        return found("info", "prediction_type_fit", batch_timesteps(model, batches), what, conf,
                      numbers), declared  # fmt: skip
    message = (
        f"the outputs fit {best}, not the declared {declared} ({text}): the checkpoint's "
        f"prediction type is wrong; declare {best} (or pass {{prediction_type}} {best})"
    )
    ts = batch_timesteps(model, batches)
    return found(severity, "prediction_type_mismatch", ts, message, conf, numbers), best


def _x0_hats(model: Any, batches: list[Batch], reading: str) -> list[Tensor]:
    sched = model.schedule
    out = []
    for b in batches:
        t = torch.full((b.x0.shape[0],), b.index, dtype=torch.long)
        out.append(sched.predict_x0(declared_output(model, b), b.x_t, t, reading))
    return out


def range_finding(model: Any, batches: list[Batch], reading: str, good: bool) -> ProbeFinding:
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
    ts = batch_timesteps(model, batches)
    if good and outside > 0.2:
        message = (
            text + ": the model was trained on data of another range; declare it ({data_range})"
        )
        return found("warning", "data_range_mismatch", ts, message, None, numbers)
    return found("info", "data_range_fit", ts, text, None, numbers)


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
        f"latents of {literal(data.source)} have std {std:.4g} and mean {mean:.4g} with "
        f"scaling_factor {factor:g} and shift_factor {shift:g}"
    )
    off = max(std, 1 / std) if std > 0 else math.inf
    if off <= VAE_STD_WARN and abs(mean) <= 1.0:
        return found("info", "vae_scaling_fit", (), text + ": about unit variance", None, numbers)
    parts = []
    if off > VAE_STD_WARN:
        parts.append(f"scaling_factor {better:.4g} gives them unit variance")
    if abs(mean) > 1.0 and std > 0:
        parts.append(f"shift_factor {shift + mean / factor:.4g} centres them")
    severity: Severity = "error" if off > VAE_STD_ERROR else "warning"
    message = f"{text}: the denoiser expects unit-variance latents; {'; '.join(parts)}"
    conf = round(min(1.0, math.log(off) / math.log(VAE_STD_ERROR)), 3) if off > 1 else 0.5
    return found(severity, "vae_scaling_mismatch", (), message, conf, numbers)


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
        return found("warning", "terminal_snr_unreachable", (start,), message, None, numbers)
    return found("info", "sampling_start", (start,), text, None, numbers)


def null_label_finding(
    model: Any, batches: list[Batch], reading: str, data: ProbeData
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
    scores = {k: geometric_score(v) for k, v in labelled.items()}
    numbers = {f"score_{k}": v for k, v in scores.items()}
    text = (
        f"null label {cond.null_label} scores {scores['null']:.3g}, the average of the "
        f"{classes} classes' predictions {scores['class_average']:.3g} (on {literal(data.source)})"
    )
    ts = tuple(int(sched.timesteps[b.index]) for b in middle)
    if scores["null"] <= NULL_SLACK * scores["class_average"]:
        return found("info", "null_label_fit", ts, text + ": it acts as unconditional", None,
                      numbers)  # fmt: skip
    # the classes' average is no posterior-weighted mixture, so it may score a little above a
    # linear guess; beyond CONCLUSIVE_RATIO times one, the classes explain nothing either
    if scores["class_average"] > CONCLUSIVE_RATIO * GOOD_SCORE:
        return found("info", "null_label_fit", ts, text + ": inconclusive", None, numbers)
    conf = round(1 - scores["class_average"] / scores["null"], 3)
    message = (
        text + ": the null label does not act as the unconditional model (trained without "
        "label dropout, or another null label); classifier-free guidance will be off"
    )
    return found("warning", "null_label_not_unconditional", ts, message, conf, numbers)


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
    batches = make_batches(model, data, seed)
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
