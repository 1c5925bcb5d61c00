"""Train the built-in networks (``ddpm train``): the DDPM objective, any schedule and prediction.

Loss (Ho et al. 2020 eq. 14, "L_simple"): ``|| target - model(x_t, t) ||^2`` with ``t`` uniform over
the schedule's indices and the target the prediction type's: the noise ``eps``, the data ``x0``, or
``v = sqrt(ab) eps - sqrt(1 - ab) x0`` (Salimans & Ho 2022). With a learned variance, the
improved-diffusion hybrid (Nichol & Dhariwal 2021, section 3.1): ``L_simple + lambda L_vlb`` with
lambda = 0.001 (so ``L_t * T/1000`` per sampled t) and the mean's gradient stopped in ``L_vlb``, so
the v channel learns the variance and L_simple alone drives the mean.

Everything numeric (q_sample, targets, posterior, KL) comes from :mod:`ddpmcli.core`.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ddpmcli import core, limits, models
from ddpmcli.errors import DdpmError, UsageError
from ddpmcli.run.events import Event, Observer, ParameterError, notify

__all__ = [
    "TrainResult",
    "default_architecture",
    "refuse_overwrite",
    "train_denoiser",
    "training_target",
    "vlb_term",
]

VLB_WEIGHT = 0.001  # improved-diffusion's lambda for the hybrid objective
# Defaults that train a 2-D moons MLP to a good denoiser in 2000 steps (~15 s on one CPU core).
DEFAULT_BATCH: dict[str, int] = {"mlp": 1024, "unet": 64}
DEFAULT_LR: dict[str, float] = {"mlp": 3e-3, "unet": 1e-3}


@dataclass
class TrainResult:
    """A trained network (its EMA weights when EMA was on) and how training went."""

    model: nn.Module
    architecture: str
    hparams: dict[str, Any]
    steps: int
    batch_size: int
    lr: float
    final_loss: float  # mean loss over the last 10% of steps
    seconds: float
    losses: list[float] = field(repr=False, default_factory=list)


def refuse_overwrite(path: str | os.PathLike[str], force: bool, flag: str = "--out") -> None:
    """The one rule for a checkpoint that already exists: it is replaced only when asked
    (``force``, the CLI's ``--force``), else UsageError saying how. Called before any training,
    so a finished run can never be lost to a name that was already taken."""
    target = Path(path)
    if force or not target.exists():
        return
    raise UsageError(
        f"{flag} {str(target)!r} already exists; pass --force to replace it, or "
        f"choose another {flag}"
    )


def default_architecture(data_shape: tuple[int, ...]) -> str:
    """``mlp`` for vectors ``(D,)``, ``unet`` for images ``(C, H, W)``."""
    if len(data_shape) == 1:
        return "mlp"
    if len(data_shape) == 3:
        return "unet"
    raise UsageError(
        f"data of shape {list(data_shape)} is neither vectors (D) nor images (C, H, W)"
    )


def training_target(
    schedule: core.Schedule, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str
) -> Tensor:
    """What the network learns to output at index ``t``: eps, x0, v or the flow v = eps - x0."""
    kind = core.canonical_prediction_type(prediction_type)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    if kind == "flow":
        return noise - x0
    return schedule.v_target(x0, noise, t)


def vlb_term(
    schedule: core.Schedule,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    prediction: Tensor,
    var_values: Tensor,
    prediction_type: str,
) -> Tensor:
    """L_t per sample, in bits per dimension: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, the
    decoder's negative log-likelihood of x0 (a Gaussian density) at t = 0 (Ho et al. 2020 eq. 5).

    ``prediction`` should be detached by the caller to train only the variance (improved-diffusion).
    """
    x0_hat = schedule.predict_x0(prediction, x_t, t, prediction_type)
    model_mean = schedule.posterior_mean(x0_hat, x_t, t)
    model_log_var = schedule.model_log_variance("learned_range", t, x_t, var_values)
    return core.vb_terms(schedule, x0, x_t, t, model_mean, model_log_var)


def train_denoiser(
    data: Tensor,
    schedule: core.Schedule,
    *,
    prediction_type: str = "epsilon",
    learned_variance: bool = False,
    architecture: str | None = None,
    hparams: Mapping[str, Any] | None = None,
    steps: int = 2000,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    ema_decay: float | None = 0.999,
    grad_clip: float = 1.0,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    observers: Sequence[Observer] = (),
) -> TrainResult:
    """Train a built-in network on ``data`` ``[N, *shape]`` for ``steps`` Adam steps.

    Args:
        data: training samples in the model's range.
        schedule: the noise schedule (its ``timesteps`` are what the model is fed).
        prediction_type: epsilon | sample | v_prediction (aliases eps, x0, v).
        learned_variance: also learn the variance interpolation v (hybrid loss).
        architecture, hparams: the network (default by data shape) and hyper-parameter overrides.
        steps, batch_size, lr: Adam steps, batch (default: mlp 1024, unet 64) and learning rate
            (default: mlp 3e-3, unet 1e-3), decayed by a cosine to 10% at the end.
        seed: fixes initialisation, batches, timesteps and noise: same seed, same weights.
        ema_decay: exponential moving average of the weights (warmed up as (1+n)/(10+n)); None: off.
        threads: CPU threads while training; default 1 for the MLP on CPU (its matmuls are too
            small to split, and OpenMP's spin-waiting makes a busy machine 10x slower), torch's
            own setting otherwise.
        observers: called with an :class:`~ddpmcli.run.events.Event` after every step
            (``loop`` ``train``, ``done`` = the step, ``values``: ``loss`` and ``loss_smoothed``,
            an exponential moving average with weight 0.02).
    """
    pred = core.canonical_prediction_type(prediction_type)
    data_shape = tuple(int(d) for d in data.shape[1:])
    arch = architecture or default_architecture(data_shape)
    batch_size = DEFAULT_BATCH[arch] if batch_size is None else batch_size
    lr = DEFAULT_LR[arch] if lr is None else lr
    limits.check_count(steps, "steps")
    limits.check_count(batch_size, "batch_size")
    if not lr > 0:
        raise ParameterError(f"{{lr}} {lr}: must be positive")
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ParameterError(f"{{ema_decay}} {ema_decay}: decay must lie in [0, 1)")
    params = models.default_hparams(arch, data_shape, learned_variance=learned_variance)
    params.update(hparams or {})
    dev = torch.device(device)
    if threads is None and dev.type == "cpu" and arch == "mlp":
        threads = 1
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(
            data, schedule, pred, learned_variance, arch, params, steps, batch_size, lr, seed,
            ema_decay, grad_clip, dev, observers,
        )  # fmt: skip
    finally:
        torch.set_num_threads(saved_threads)


def _loss(
    model: nn.Module,
    schedule: core.Schedule,
    model_t: Tensor,
    x0: Tensor,
    t: Tensor,
    noise: Tensor,
    pred: str,
    learned_variance: bool,
) -> Tensor:
    """L_simple of one batch, plus lambda L_vlb (mean gradient stopped) with a learned variance."""
    x_t = schedule.q_sample(x0, t, noise)
    out = model(x_t, model_t[t])
    if learned_variance:
        prediction, var_values = out.chunk(2, dim=1)
    else:
        prediction, var_values = out, None
    target = training_target(schedule, x0, noise, t, pred)
    loss = ((prediction - target) ** 2).mean()
    if var_values is not None:
        vb = vlb_term(schedule, x0, x_t, t, prediction.detach(), var_values, pred)
        loss = loss + (VLB_WEIGHT * schedule.num_steps) * vb.mean()
    return loss


def _train(
    data: Tensor,
    schedule: core.Schedule,
    pred: str,
    learned_variance: bool,
    arch: str,
    params: dict[str, Any],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    ema_decay: float | None,
    grad_clip: float,
    dev: torch.device,
    observers: Sequence[Observer],
) -> TrainResult:
    data_shape = tuple(int(d) for d in data.shape[1:])
    torch.manual_seed(seed)
    model = models.build_model(arch, params).to(dev)
    ema = copy.deepcopy(model).eval() if ema_decay is not None else None
    if ema is not None:
        ema.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda n: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(n, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    data = data.to(torch.float32)
    n_data = data.shape[0]
    model_t = schedule.network_timesteps(torch.arange(schedule.num_steps))  # 1000 s on a flow
    losses: list[float] = []
    smoothed = math.nan
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n_data, (batch_size,), generator=gen)
        t = torch.randint(0, schedule.num_steps, (batch_size,), generator=gen)
        noise = torch.randn((batch_size, *data_shape), generator=gen)
        x0 = data[idx]
        x0, t, noise = x0.to(dev), t.to(dev), noise.to(dev)
        loss = _loss(model, schedule, model_t.to(dev), x0, t, noise, pred, learned_variance)
        if not torch.isfinite(loss):
            raise DdpmError(
                f"training diverged at step {step + 1} (loss is {loss.item()}); "
                "lower the learning rate"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        if ema is not None and ema_decay is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                    p_ema.lerp_(p, 1.0 - decay)
        value = float(loss.detach())
        losses.append(value)
        smoothed = value if step == 0 else 0.98 * smoothed + 0.02 * value
        values = {"loss": value, "loss_smoothed": smoothed}
        notify(observers, Event("train", step + 1, steps, step=step + 1, values=values))
    final = model if ema is None else ema
    final.eval()
    tail = losses[-max(1, steps // 10) :]
    return TrainResult(
        model=final.to("cpu"),
        architecture=arch,
        hparams=params,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        final_loss=sum(tail) / len(tail),
        seconds=time.perf_counter() - start,
        losses=losses,
    )
