"""``ddpmcli.check(model, ...)``: lint a checkpoint's schedule and probe what its model does,
as ``ddpm check CKPT`` does (the API the command calls).

::

    import ddpmcli
    m = ddpmcli.load("ckpt.pt")
    r = ddpmcli.check(m)                      # on its reference samples (or noise probes)
    [row["code"] for row in r.rows if row["severity"] == "error"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ddpmcli import core, limits
from ddpmcli.checkpoints import LoadedModel
from ddpmcli.checks import Finding, lint_schedule, probe_steps
from ddpmcli.errors import ParameterError
from ddpmcli.run.probes import ProbeData, ProbeFinding, noise_probes, probe_model

__all__ = ["CheckResult", "check", "probe_data"]

CHECK_SAMPLES = 32
"""Samples the probes run on by default (each probe timestep is one batch of them)."""


@dataclass
class CheckResult:
    """What :func:`check` found: the schedule's findings, then the behaviour probes'; ``rows``
    as the command prints them in JSON (``t`` a list of model timesteps, ``confidence`` None
    where a finding is not a fit, ``numbers`` the values a probe rests on)."""

    findings: list[Finding]
    source: str

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [finding_row(f) for f in self.findings]

    @property
    def failed(self) -> bool:
        """Whether any finding is an error (the command then exits 1)."""
        return any(f.severity == "error" for f in self.findings)


def finding_row(finding: Finding, name: Any = None) -> dict[str, Any]:
    """One row: severity, code, t (a list), confidence, message (parameters shown by ``name``,
    default their own names) and numbers."""
    probe = finding if isinstance(finding, ProbeFinding) else None
    return {
        "severity": finding.severity,
        "code": finding.code,
        "t": list(finding.t),
        "confidence": None if probe is None else probe.confidence,
        "message": finding.message if name is None else finding.render(name),
        "numbers": {} if probe is None else dict(probe.numbers),
    }


def probe_data(
    model: LoadedModel, x0: Any = None, *, n: int = CHECK_SAMPLES, seed: int = 0
) -> ProbeData:
    """The probes' data: ``x0`` as :func:`ddpmcli.reconstruct` takes it (a tensor, a built-in
    set's name, a file or folder; a latent model's images are encoded), else the checkpoint's
    reference samples, else noise probes drawn in the model's range."""
    from ddpmcli.api import _data

    limits.check_count(n, "n")
    if x0 is None and model.reference_samples is None:
        return ProbeData(noise_probes(model, n, seed), "noise probes", from_data=False)
    picked = _data(model, x0, n, seed)
    return ProbeData(picked.x0.double(), picked.source, from_data=True, images=picked.images)


def check(
    model: LoadedModel,
    x0: Any = None,
    *,
    n: int = CHECK_SAMPLES,
    seed: int = 0,
    steps: int | None = None,
    spacing: str | None = None,
    probes: bool = True,
) -> CheckResult:
    """Everything `ddpm check` finds on ``model``'s training schedule (terminal SNR, the beta
    cap, precision, its sampler spacing at ``steps``: default 50), then the behaviour probes
    (:mod:`ddpmcli.run.probes`: prediction type, timestep convention, data range, VAE scaling,
    sampling start, null label) on ``x0`` (see :func:`probe_data`).

    Args:
        model: a loaded checkpoint (:func:`ddpmcli.load`, :func:`ddpmcli.wrap`).
        x0, n, seed: the probes' data, how many samples, and the seed of their noise.
        steps, spacing: the sampler grid to check (default: 50 steps with the checkpoint's own
            spacing, else trailing, as :func:`ddpmcli.sample` respaces).
        probes: False lints the schedule only (no model call).

    Raises:
        ParameterError: bad ``n``, ``steps`` or ``spacing``; DataError: data that do not fit.
    """
    import torch

    from ddpmcli.api import sampling_spacing

    if not isinstance(model, LoadedModel):
        raise ParameterError("{model} must be a loaded model (ddpmcli.load or ddpmcli.wrap)")
    sched = model.schedule
    used, offset = sampling_spacing(model, spacing)
    count = probe_steps(sched.num_steps) if steps is None else steps
    if steps is None and 0 < offset and sched.num_steps - offset < count:
        # as many steps as T with a steps_offset would call t = T (a T = 20 SDXL folder,
        # leading spacing, offset 1, was a usage error); the default grid stays inside
        count = max(1, sched.num_steps - offset)
    limits.check_count(count, "steps")
    respaced = core.respaced(sched, min(count, sched.num_steps), used, offset)
    # precision: float32, and the dtype the model runs in when it is narrower
    dtypes = ["float32"] + [d for d in ("float16", "bfloat16") if getattr(torch, d) == model.dtype]
    findings: list[Finding] = lint_schedule(
        sched, respaced=respaced, prediction_type=model.prediction_type, spacing=used,
        probe_spacing=steps is None, dtypes=dtypes,
    )  # fmt: skip
    source = "schedule only"
    if probes:
        data = probe_data(model, x0, n=n, seed=seed)
        source = data.source
        findings += probe_model(model, data, seed=seed, spacing=(used, offset), steps=count)
    return CheckResult(findings, source)
