"""The Bayes-optimal denoiser E[x0 | x_t] of a known data distribution (finite set or mixture)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from ddpmcli.core import Schedule, extract
from ddpmcli.errors import DataError, DdpmError

__all__ = ["OptimalDenoiser"]


class _Mixture(Protocol):
    """An isotropic Gaussian mixture (``data.GaussianMixture`` is one)."""

    @property
    def weights(self) -> Tensor: ...  # [K]

    @property
    def means(self) -> Tensor: ...  # [K, D]

    @property
    def stds(self) -> Tensor: ...  # [K]


@dataclass(frozen=True)
class OptimalDenoiser:
    """The exact minimum-MSE denoiser ``E[x0 | x_t]`` for a known data distribution.

    - a finite set of points ``x_i`` (weights ``w_i``, uniform by default): the posterior over the
      points is ``softmax_i(log w_i - |x_t - sqrt(ab) x_i|^2 / (2 (1 - ab)))`` and
      ``E[x0 | x_t] = sum_i p_i x_i`` (Karras et al. 2022, appendix B.3, in DDPM notation);
    - an isotropic Gaussian mixture ``sum_k w_k N(mu_k, s_k^2 I)``: given component ``k``,
      ``x_t ~ N(sqrt(ab) mu_k, v_k I)`` with ``v_k = ab s_k^2 + 1 - ab``, and
      ``E[x0 | x_t, k] = mu_k + sqrt(ab) s_k^2 / v_k (x_t - sqrt(ab) mu_k)`` (Gaussian
      conditioning); responsibilities ``softmax_k(log w_k - |x_t - sqrt(ab) mu_k|^2/(2 v_k)
      - D/2 log v_k)``.

    ``sqrt(ab)`` and ``1 - ab`` are the schedule's own float64 arrays. Everything is computed in
    float64 (float32 on MPS). The optimal noise prediction follows from the core's
    ``eps_from_x0``; no other formula is needed.
    """

    kind: str  # "points" | "mixture"
    points: Tensor | None = None  # [N, D]
    log_weights: Tensor | None = None  # [N] or [K]
    means: Tensor | None = None  # [K, D]
    variances: Tensor | None = None  # [K]
    max_pairs: int = field(default=1 << 22, repr=False)  # batch x points per block

    @classmethod
    def from_points(cls, points: Tensor, weights: Tensor | None = None) -> OptimalDenoiser:
        """The denoiser of the empirical distribution of ``points`` ``[N, *shape]``."""
        if points.ndim < 2 or points.shape[0] < 1:
            raise DataError("the optimal denoiser needs at least one data point [N, ...]")
        flat = points.detach().to("cpu", torch.float64).reshape(points.shape[0], -1)
        w = (
            torch.full((flat.shape[0],), 1.0 / flat.shape[0], dtype=torch.float64)
            if weights is None
            else weights.detach().to("cpu", torch.float64)
        )
        return cls(kind="points", points=flat, log_weights=torch.log(w))

    @classmethod
    def from_mixture(cls, mixture: _Mixture) -> OptimalDenoiser:
        """The denoiser of an isotropic Gaussian mixture (``weights``, ``means``, ``stds``)."""
        means = mixture.means.detach().to("cpu", torch.float64)
        weights = mixture.weights.detach().to("cpu", torch.float64)
        stds = mixture.stds.detach().to("cpu", torch.float64)
        return cls(
            kind="mixture",
            log_weights=torch.log(weights / weights.sum()),
            means=means.reshape(means.shape[0], -1),
            variances=stds**2,
        )

    @property
    def dim(self) -> int:
        source = self.points if self.kind == "points" else self.means
        return int(source.shape[1]) if source is not None else 0

    def to(self, device: torch.device, dtype: torch.dtype = torch.float64) -> OptimalDenoiser:
        """The same denoiser with its arrays on ``device`` in ``dtype``."""

        def move(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(dtype=dtype).to(device=device)

        return OptimalDenoiser(
            kind=self.kind,
            points=move(self.points),
            log_weights=move(self.log_weights),
            means=move(self.means),
            variances=move(self.variances),
            max_pairs=self.max_pairs,
        )

    def predict_x0(self, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        """``E[x0 | x_t]`` for ``x_t`` ``[B, *shape]`` at schedule indices ``t`` ``[B]`` (on a
        path other than VP, of its VP-equivalent x_t/c_t: the same posterior)."""
        flat = schedule.vp_equivalent(x_t, t).reshape(x_t.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise DataError(
                f"the optimal denoiser's data have {self.dim} values per sample, x_t has "
                f"{flat.shape[1]}"
            )
        s = extract(schedule.sqrt_alpha_bar, t, 2, like=flat)  # [B, 1]
        one_minus = extract(schedule.one_minus_alpha_bar, t, 2, like=flat)
        n_ref = self.points.shape[0] if self.points is not None else 1
        step = max(1, self.max_pairs // n_ref)
        parts = [
            self._points(flat[i : i + step], s[i : i + step], one_minus[i : i + step])
            if self.kind == "points"
            else self._mixture(flat[i : i + step], s[i : i + step], one_minus[i : i + step])
            for i in range(0, flat.shape[0], step)
        ]
        return torch.cat(parts).reshape(x_t.shape)

    def _points(self, x: Tensor, s: Tensor, one_minus: Tensor) -> Tensor:
        pts, logw = self.points, self.log_weights
        if pts is None or logw is None:  # pragma: no cover - guaranteed by the constructors
            raise DdpmError("internal: point denoiser without points")
        # -|x_t - s x_i|^2 / (2(1 - ab)) without the |x_t|^2 term, which softmax cancels
        logits = (s * (x @ pts.T) - 0.5 * s**2 * (pts**2).sum(1)) / one_minus + logw
        return torch.softmax(logits, dim=1) @ pts

    def _mixture(self, x: Tensor, s: Tensor, one_minus: Tensor) -> Tensor:
        mu, logw, var = self.means, self.log_weights, self.variances
        if mu is None or logw is None or var is None:  # pragma: no cover
            raise DdpmError("internal: mixture denoiser without components")
        v = s**2 * var + one_minus  # [B, K]
        dist2 = (x**2).sum(1, keepdim=True) - 2 * s * (x @ mu.T) + s**2 * (mu**2).sum(1)
        logits = logw - 0.5 * dist2.clamp(min=0) / v - 0.5 * x.shape[1] * torch.log(v)
        r = torch.softmax(logits, dim=1)  # [B, K]
        gain = r * (s * var / v)  # sum_k r_k sqrt(ab) s_k^2 / v_k (x_t - sqrt(ab) mu_k)
        return r @ mu + gain.sum(1, keepdim=True) * x - s * (gain @ mu)
