"""`ddpm reconstruct`: the reconstruction sweep, the Bayes-optimal denoiser and the command.

Noise convention (common random numbers across t): sample i is noised with one
eps_i = sample_noise(seed, ...)[i] at every t.

The oracle: a fake model that knows every sample's noise returns the true target of its
prediction type; the sweep must then rebuild x0 exactly up to rounding:

- float64: |x0_hat - x0| <= 1e-10 at every t, including t = T-1 where 1/sqrt(alpha_bar) ~ 1e4;
- float32 (the model's output rounded to float32, the sweep's own arithmetic float64):
  |x0_hat - x0| <= 4 u (|x_t|/sqrt(ab) + sqrt(1/ab - 1)|eps|) + 1e-12 elementwise, u = 2^-24 the
  unit roundoff. The right side bounds the rounding error of every prediction type: for epsilon
  it is sqrt(1/ab - 1)|eps| u (the rounded eps, amplified by 1/sqrt(ab)); for v it is
  sqrt(1 - ab)|v| u <= (sqrt(1/ab - 1)|eps| + |x0|) u, and |x0| <= |x_t|/sqrt(ab) +
  sqrt(1/ab - 1)|eps| by the triangle inequality; for sample it is |x0| u. The factor 4 leaves
  room for the float64 operations and for a fused implementation.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from rowcheck import assert_row_close
from torch import Tensor

from ddpmcli import core
from ddpmcli.errors import DataError, DdpmError, SamplingError, UsageError
from ddpmcli.run import (
    OptimalDenoiser,
    auto_chunk_size,
    iter_chunks,
    pair_noise,
    reconstruction_sweep,
    resolve_device,
    resolve_dtype,
    sample_noise,
    sample_noise_rows,
)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class OracleModel:
    """Returns the true target for x_t: it finds which sample made x_t by re-drawing every
    sample's noise (the sweep's noise of sample i is eps_i at every t, a function of (seed, i))."""

    def __init__(
        self, schedule: core.Schedule, x0: Tensor, prediction_type: str, seed: int
    ) -> None:
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.data_range = (-1.0, 1.0)
        self.data_shape = tuple(x0.shape[1:])
        self.x0 = x0.to(torch.float64)
        self.noise = sample_noise(seed, 0, x0.shape[0], self.data_shape)
        self.dtype = torch.float32
        self.calls = 0

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> OracleModel:
        self.dtype = dtype or self.dtype
        return self

    def predict(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, None]:
        self.calls += 1
        n = self.x0.shape[0]
        out = []
        for row, step in zip(x_t.to(torch.float64), t.tolist(), strict=True):
            idx = torch.full((n,), step, dtype=torch.long)
            noise = self.noise
            candidates = self.schedule.q_sample(self.x0, idx, noise)
            i = int(((candidates - row) ** 2).flatten(1).sum(1).argmin())
            x0, eps, one = self.x0[i : i + 1], noise[i : i + 1], idx[:1]
            if self.prediction_type == "epsilon":
                target = eps
            elif self.prediction_type == "sample":
                target = x0
            else:
                target = self.schedule.v_target(x0, eps, one)
            out.append(target)
        return torch.cat(out).to(self.dtype), None


class ShrinkModel:
    """A fake x0-predictor: x0_hat = c * x_t (deterministic per row, any batch size)."""

    def __init__(self, schedule: core.Schedule, data_shape: tuple[int, ...], c: float = 0.5):
        self.schedule = schedule
        self.prediction_type = "sample"
        self.data_range = (-1.0, 1.0)
        self.data_shape = data_shape
        self.c = c

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> ShrinkModel:
        return self

    def predict(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, None]:
        return self.c * x_t, None


def _data(n: int = 6, shape: tuple[int, ...] = (3,), seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand((n, *shape), generator=gen, dtype=torch.float64) * 1.8 - 0.9).clamp(-1, 1)


def _all_x0_hat(result: Any) -> Tensor:
    return result.examples.x0_hat  # [len(t), n, *shape] with example_samples=n


# ---------------------------------------------------------------------------------------------
# the oracle


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_oracle_float64_reconstructs_x0_to_1e_10(kind: str, prediction_type: str) -> None:
    sched = core.make_schedule(kind, 1000)
    x0 = _data()
    ts = [0, 1, 250, 500, 900, 998, 999]
    model = OracleModel(sched, x0, prediction_type, seed=3)
    res = reconstruction_sweep(
        model, x0, ts, seed=3, dtype=torch.float64, clip=False, batch_size=5,
        example_samples=x0.shape[0], example_timesteps=len(ts),
    )  # fmt: skip
    err = (_all_x0_hat(res) - x0[None]).abs()
    assert float(err.max()) <= 1e-10
    assert all(row["mse"] <= 1e-20 for row in res.rows)
    assert all(row["eps_mse"] <= 1e-12 for row in res.rows if row["t"] < 999 or kind == "linear")
    assert all(row["clip_fraction"] == 0.0 for row in res.rows)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_oracle_float32_within_stated_rounding_bound(prediction_type: str) -> None:
    sched = core.make_schedule("linear", 1000)
    x0 = _data(n=5, shape=(4,))
    ts = [0, 10, 300, 700, 999]
    seed = 11
    model = OracleModel(sched, x0, prediction_type, seed=seed)
    res = reconstruction_sweep(
        model, x0, ts, seed=seed, dtype="float32", clip=False,
        example_samples=x0.shape[0], example_timesteps=len(ts),
    )  # fmt: skip
    n = x0.shape[0]
    u = 2.0**-24
    worst = 0.0
    for j, t in enumerate(ts):
        idx = torch.full((n,), t, dtype=torch.long)
        eps = sample_noise(seed, 0, n, (4,))
        x_t = sched.q_sample(x0, idx, eps)
        ab = float(sched.alpha_bar[t])
        bound = 4 * u * (x_t.abs() / math.sqrt(ab) + math.sqrt(1 / ab - 1) * eps.abs()) + 1e-12
        err = (res.examples.x0_hat[j] - x0).abs()
        assert bool((err <= bound).all()), (t, float((err / bound).max()))
        worst = max(worst, float((err / bound).max()))
    # the bound is not vacuous: float32 rounding shows (except for x0-prediction at exact zeros)
    assert worst > 1e-3


def test_same_seed_same_numbers_and_seed_matters() -> None:
    sched = core.make_schedule("cosine", 100)
    x0 = _data(n=7, shape=(1, 4, 4))
    model = ShrinkModel(sched, (1, 4, 4))
    ts = [0, 30, 60, 99]
    a = reconstruction_sweep(model, x0, ts, seed=5, per_sample=True)
    b = reconstruction_sweep(model, x0, ts, seed=5, per_sample=True)
    c = reconstruction_sweep(model, x0, ts, seed=6)
    assert a.rows == b.rows and a.sample_rows == b.sample_rows
    assert a.rows != c.rows


@pytest.mark.parametrize("batch_size", [1, 3, 7, 28, None])
def test_batch_size_does_not_change_the_numbers(batch_size: int | None) -> None:
    sched = core.make_schedule("linear", 200)
    x0 = _data(n=7, shape=(2,))
    model = ShrinkModel(sched, (2,), c=0.8)
    ts = [0, 50, 120, 199]
    ref = reconstruction_sweep(model, x0, ts, seed=2, batch_size=4, per_sample=True)
    got = reconstruction_sweep(model, x0, ts, seed=2, batch_size=batch_size, per_sample=True)
    # per-sample numbers are bit-identical; aggregates differ only in float64 summation order
    assert got.sample_rows == ref.sample_rows
    for r, g in zip(ref.rows, got.rows, strict=True):
        for col in ref.columns:
            assert g[col] == pytest.approx(r[col], rel=1e-13, abs=1e-300)


def test_noise_of_a_sample_is_the_same_at_every_t_and_depends_on_seed_and_i_only() -> None:
    sched = core.make_schedule("cosine", 1000)
    x0 = _data(n=6, shape=(1, 3, 3))
    ts = [0, 1, 250, 600, 998]
    res = reconstruction_sweep(
        ShrinkModel(sched, (1, 3, 3)), x0, ts, seed=4, batch_size=7,
        example_samples=6, example_timesteps=len(ts),
    )  # fmt: skip
    # the noise each x_t was made with: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
    for e, t in enumerate(res.examples.t):
        x_t = res.examples.x_t[e]
        s, s1 = float(sched.sqrt_alpha_bar[t]), float(sched.sqrt_one_minus_alpha_bar[t])
        eps = (x_t - s * x0) / s1
        # float64 rounding of x_t and of this inversion (a few ulp of 1 + |x_t|), amplified by
        # 1/sqrt(1 - ab) (156 at t = 0): measured at most 1.6 ulp x 1/s1
        tol = 4 * 2.0**-52 * (1 + float(x_t.abs().max())) / s1
        assert torch.allclose(eps, sample_noise(4, 0, 6, (1, 3, 3)), rtol=0, atol=tol), t
    # eps_i depends on (seed, i) only: not on how many samples are drawn or where a draw starts
    shape = (1, 64, 64)  # 4096 values: 16 samples a generator block, so draws cross blocks
    assert sample_noise_rows(4096) == 16
    full = sample_noise(3, 0, 40, shape)
    assert torch.equal(sample_noise(3, 0, 5, shape), full[:5])
    assert torch.equal(sample_noise(3, 13, 37, shape), full[13:37])
    assert torch.equal(sample_noise(3, 39, 40, shape), full[39:])
    assert not torch.equal(full[0], full[1]) and not torch.equal(full[15], full[16])
    assert not torch.equal(sample_noise(4, 0, 5, shape), full[:5])
    assert abs(float(full.std()) - 1) < 0.01 and abs(float(full.mean())) < 0.01
    assert sample_noise(0, 0, 0, (2,)).shape == (0, 2)


def test_a_subset_of_t_gives_the_rows_of_the_full_sweep() -> None:
    sched = core.make_schedule("linear", 1000)
    x0 = _data(n=5, shape=(3,))
    model = ShrinkModel(sched, (3,))
    full = reconstruction_sweep(model, x0, [999, 0, 500, 250], seed=9, per_sample=True)
    for subset, positions in (([500], [2]), ([0, 999], [1, 0]), ([250, 999], [3, 0])):
        part = reconstruction_sweep(model, x0, subset, seed=9, batch_size=3, per_sample=True)
        assert part.rows == [full.rows[p] for p in positions]
        assert part.sample_rows == [
            row for p in positions for row in full.sample_rows[5 * p : 5 * p + 5]
        ]
    # more samples: the first five keep their noise, so their per-sample rows do not change
    more = reconstruction_sweep(model, _data(n=9, shape=(3,)), [500], seed=9, per_sample=True)
    assert _data(n=9, shape=(3,))[:5].equal(x0)
    assert more.sample_rows[:5] == full.sample_rows[10:15]


def test_samples_swept_in_groups_give_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddpmcli.run import sweep

    sched = core.make_schedule("linear", 100)
    x0 = _data(n=7, shape=(2, 2))
    model = ShrinkModel(sched, (2, 2), c=1.7)
    ts = [0, 40, 99]
    kwargs: dict[str, Any] = {"seed": 1, "per_sample": True, "example_samples": 5}
    ref = reconstruction_sweep(model, x0, ts, **kwargs)
    # x0 + eps of 3 samples in float64: 2 x 3 x 4 x 8 bytes; groups of 3, 3 and 1 samples
    monkeypatch.setattr(sweep, "SWEEP_DATA_BUDGET", 2 * 3 * 4 * 8)
    calls: list[int] = []
    got = reconstruction_sweep(
        model, x0, ts, batch_size=4, observers=[lambda e: calls.append(e.done)], **kwargs
    )
    assert calls == [4, 8, 9, 13, 17, 18, 21]  # 9 + 9 + 3 pairs in chunks of up to 4
    assert got.sample_rows == ref.sample_rows
    assert torch.equal(got.examples.x_t, ref.examples.x_t)
    assert torch.equal(got.examples.x0_hat, ref.examples.x0_hat)
    for r, g in zip(ref.rows, got.rows, strict=True):
        assert_row_close(g, r, rel=1e-13)


def test_pair_noise_depends_on_seed_sample_t_only() -> None:
    # the per-pair noise of the variational bound (ddpm nll)
    a = pair_noise(1, [0, 1, 2], [5, 5, 5], (3,))
    b = pair_noise(1, [2, 0], [5, 5], (3,))
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    c = pair_noise(1, [0, 0], [5, 6], (3,))
    assert torch.equal(c[0], a[0]) and not torch.equal(c[0], c[1])
    assert abs(float(pair_noise(0, list(range(200)), [7] * 200, (50,)).std()) - 1) < 0.02


def test_columns_psnr_clip_fraction_and_examples() -> None:
    sched = core.make_schedule("linear", 1000)
    x0 = _data(n=5, shape=(1, 4, 4))
    model = ShrinkModel(sched, (1, 4, 4), c=3.0)  # overshoots the data range
    res = reconstruction_sweep(model, x0, list(range(0, 1000, 50)), seed=0, clip=True)
    assert res.columns == ["t", "alpha_bar", "snr", "mse", "psnr", "eps_mse", "clip_fraction"]
    for row in res.rows:
        assert row["alpha_bar"] == float(sched.alpha_bar[row["t"]])
        assert row["psnr"] == pytest.approx(10 * math.log10(4.0 / row["mse"]))
        assert 0.0 <= row["clip_fraction"] <= 1.0
    assert res.rows[-1]["clip_fraction"] > 0.5
    ex = res.examples
    assert ex.x0_hat.shape == (10, 5, 1, 4, 4) and ex.x_t.shape == ex.x0_hat.shape
    assert ex.t[0] == 0 and ex.t[-1] == 950
    assert float(ex.x0_hat.abs().max()) <= 1.0  # clipped
    noclip = reconstruction_sweep(model, x0, [950], seed=0, clip=False)
    clipped = reconstruction_sweep(model, x0, [950], seed=0, clip=True)
    assert noclip.rows[0]["mse"] > clipped.rows[0]["mse"]
    assert noclip.rows[0]["clip_fraction"] == clipped.rows[0]["clip_fraction"]


def test_progress_callback_and_memory_is_per_chunk() -> None:
    sched = core.make_schedule("linear", 100)
    x0 = _data(n=6, shape=(2,))
    calls: list[tuple[int, int]] = []
    res = reconstruction_sweep(
        ShrinkModel(sched, (2,)), x0, list(range(100)), batch_size=64,
        observers=[lambda e: calls.append((e.done, e.total))],
    )  # fmt: skip
    assert calls[-1] == (600, 600) and len(calls) == math.ceil(600 / 64)
    assert res.batch_size == 64 and res.sample_rows is None


def test_nan_from_the_model_is_one_error() -> None:
    sched = core.make_schedule("linear", 50)
    model = ShrinkModel(sched, (2,), c=float("nan"))
    with pytest.raises(SamplingError, match="NaN/Inf"):
        reconstruction_sweep(model, _data(n=3, shape=(2,)), [0, 49])


def test_bad_inputs_raise_domain_errors() -> None:
    sched = core.make_schedule("linear", 50)
    model = ShrinkModel(sched, (2,))
    x0 = _data(n=3, shape=(2,))
    with pytest.raises(UsageError, match="out of range"):
        reconstruction_sweep(model, x0, [50])
    with pytest.raises(UsageError):
        reconstruction_sweep(model, x0, [])
    with pytest.raises(DataError, match="shape"):
        reconstruction_sweep(model, _data(n=3, shape=(3,)), [0])
    with pytest.raises(UsageError):
        reconstruction_sweep(model, x0, [0], batch_size=0)
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(UsageError, match="unknown dtype"):
        resolve_dtype("int8")
    if not torch.cuda.is_available():
        with pytest.raises(DdpmError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_chunk_helpers() -> None:
    assert list(iter_chunks(5, 2)) == [(0, 2), (2, 4), (4, 5)]
    assert auto_chunk_size(2, 10) == 10
    assert auto_chunk_size(2, 10**6) == 4096
    small = auto_chunk_size(3 * 64 * 64, 10**6)
    assert 1 <= small < 4096
    assert auto_chunk_size(10**9, 5) == 1


# ---------------------------------------------------------------------------------------------
# the Bayes-optimal denoiser


def test_optimal_denoiser_single_gaussian_is_the_wiener_filter() -> None:
    sched = core.make_schedule("linear", 1000)
    var = 0.3**2
    mix = type("M", (), {})()
    mix.weights = torch.tensor([1.0], dtype=torch.float64)
    mix.means = torch.zeros(1, 2, dtype=torch.float64)
    mix.stds = torch.tensor([0.3], dtype=torch.float64)
    opt = OptimalDenoiser.from_mixture(mix)
    x_t = torch.randn(5, 2, dtype=torch.float64)
    for t in (0, 400, 999):
        idx = torch.full((5,), t, dtype=torch.long)
        ab = float(sched.alpha_bar[t])
        want = math.sqrt(ab) * var / (ab * var + 1 - ab) * x_t
        assert torch.allclose(opt.predict_x0(x_t, idx, sched), want, rtol=1e-12, atol=1e-15)


def test_optimal_mixture_matches_monte_carlo_point_cloud() -> None:
    from ddpmcli.data import builtin_dataset, gaussian_mixture

    sched = core.make_schedule("linear", 1000)
    mix = gaussian_mixture("gmm")
    assert mix is not None
    exact = OptimalDenoiser.from_mixture(mix)
    cloud = OptimalDenoiser.from_points(builtin_dataset("gmm", 50_000, seed=4, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    for t in (300, 600, 999):
        x0 = builtin_dataset("gmm", 200, seed=8, dtype=torch.float64)
        idx = torch.full((200,), t, dtype=torch.long)
        x_t = sched.q_sample(x0, idx, torch.randn(200, 2, generator=gen, dtype=torch.float64))
        diff = exact.predict_x0(x_t, idx, sched) - cloud.predict_x0(x_t, idx, sched)
        assert float(diff.abs().max()) < 0.03, t


def test_optimal_mse_matches_closed_form_bayes_error() -> None:
    # N(0, s^2 I) data: the Bayes error per value is s^2 (1 - ab) / (ab s^2 + 1 - ab)
    sched = core.make_schedule("linear", 1000)
    s = 0.5
    x0 = s * torch.randn(3000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mix = type("M", (), {})()
    mix.weights, mix.means = torch.ones(1), torch.zeros(1, 2)
    mix.stds = torch.tensor([s])
    res = reconstruction_sweep(
        ShrinkModel(sched, (2,), c=0.0), x0, [50, 200, 500, 999], seed=0, clip=False,
        compare_optimal=OptimalDenoiser.from_mixture(mix),
    )  # fmt: skip
    for row in res.rows:
        ab = row["alpha_bar"]
        want = s**2 * (1 - ab) / (ab * s**2 + 1 - ab)
        assert row["optimal_mse"] == pytest.approx(want, rel=0.06)
        assert row["optimal_mse"] <= row["mse"]
    assert res.columns[-4:] == ["optimal_mse", "optimal_eps_mse", "excess_mse", "excess_stderr"]


def test_optimal_excess_has_the_paired_standard_error() -> None:
    # excess_mse = mse - optimal_mse on the same x_t; its standard error must equal the sample
    # standard deviation of the per-sample excesses over sqrt(n), computed here from the
    # per-sample rows (an independent path through the sums)
    sched = core.make_schedule("linear", 1000)
    x0 = 0.5 * torch.randn(500, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mix = type("M", (), {})()
    mix.weights, mix.means, mix.stds = torch.ones(1), torch.zeros(1, 2), torch.tensor([0.5])
    res = reconstruction_sweep(
        ShrinkModel(sched, (2,), c=0.9), x0, [100, 600], seed=0, clip=False, per_sample=True,
        compare_optimal=OptimalDenoiser.from_mixture(mix), batch_size=77,
    )  # fmt: skip
    assert res.sample_rows is not None
    for row in res.rows:
        got = [r["excess_mse"] for r in res.sample_rows if r["t"] == row["t"]]
        per = torch.tensor(got, dtype=torch.float64)
        assert row["excess_mse"] == pytest.approx(float(per.mean()), rel=1e-9)
        assert row["excess_stderr"] == pytest.approx(float(per.std() / math.sqrt(500)), rel=1e-6)
        assert row["excess_mse"] > 3 * row["excess_stderr"]  # a worse model shows as worse
    assert all(r["excess_stderr"] is None for r in res.sample_rows)


def test_optimal_denoiser_of_a_finite_set_memorises_at_low_noise() -> None:
    sched = core.make_schedule("linear", 1000)
    x0 = _data(n=20, shape=(1, 3, 3))
    res = reconstruction_sweep(
        ShrinkModel(sched, (1, 3, 3)), x0, [0, 999], clip=False,
        compare_optimal=OptimalDenoiser.from_points(x0),
    )  # fmt: skip
    assert res.rows[0]["optimal_mse"] < 1e-12
    centred = float(((x0 - x0.mean(0)) ** 2).mean())
    assert res.rows[1]["optimal_mse"] == pytest.approx(centred, rel=0.05)


# ---------------------------------------------------------------------------------------------
# the command, end to end, on checkpoints made here

AGG = "t,alpha_bar,snr,mse,psnr,eps_mse,clip_fraction"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trained 2-D model (gmm, 80 steps of a small MLP), an untrained image model with
    reference samples, and a TorchScript program without metadata."""
    from ddpmcli import models
    from ddpmcli.checkpoints import save_native_checkpoint, save_torchscript
    from ddpmcli.data import builtin_dataset
    from ddpmcli.training import train_denoiser

    root = tmp_path_factory.mktemp("ckpts")
    sched = core.make_schedule("linear", 1000)
    data = builtin_dataset("gmm", 2000, seed=0)
    trained = train_denoiser(
        data, sched, steps=80, batch_size=64, lr=3e-3, seed=0,
        hparams={"hidden": 48, "num_blocks": 1, "time_dim": 32},
    )  # fmt: skip
    gmm = save_native_checkpoint(
        root / "gmm.pt", trained.model, architecture=trained.architecture,
        hparams=trained.hparams, schedule=sched, prediction_type="epsilon", data_shape=(2,),
    )  # fmt: skip
    torch.manual_seed(0)
    params = {**models.default_hparams("unet", (1, 8, 8)), "base_channels": 8, "time_dim": 16}
    unet = models.build_model("unet", params)
    refs = builtin_dataset("shapes", 12, seed=1)[:, :, ::2, ::2]
    images = save_native_checkpoint(
        root / "img.pt", unet, architecture="unet", hparams=params,
        schedule=core.make_schedule("cosine", 100), prediction_type="v_prediction",
        data_shape=(1, 8, 8), reference_samples=refs,
    )  # fmt: skip
    script = save_torchscript(trained.model, root / "prog.pt")
    return {"gmm": str(gmm), "img": str(images), "script": str(script), "root": root}


def _one_error_line(result: Any, code: int, needle: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_cli_csv_tsv_exact_columns_and_rows(cli: Any, ckpts: dict[str, Any]) -> None:
    args = ("reconstruct", ckpts["gmm"], "--data", "gmm", "--n", "16", "--t", "0,500,999")
    res = cli(*args, "--format", "csv")
    assert res.exit_code == 0 and res.stderr == ""
    lines = res.stdout.splitlines()
    assert lines[0] == AGG and len(lines) == 4
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "500", "999"]
    assert float(lines[1].split(",")[1]) == float(core.make_schedule("linear", 1000).alpha_bar[0])
    tsv = cli(*args, "--format", "tsv", "--no-header").stdout.splitlines()
    assert [row.split("\t") for row in tsv] == [row.split(",") for row in lines[1:]]
    picked = cli(*args, "-f", "csv", "--columns", "t,psnr").stdout.splitlines()
    assert picked[0] == "t,psnr" and picked[1] == f"0,{lines[1].split(',')[4]}"


def test_cli_json_jsonl_table(cli: Any, ckpts: dict[str, Any]) -> None:
    import json

    args = ("reconstruct", ckpts["gmm"], "--data", "gmm", "--n", "8", "--t", "0,999")
    rows = json.loads(cli(*args, "-f", "json").stdout)
    assert [list(r) for r in rows] == [AGG.split(",")] * 2
    jl = [json.loads(line) for line in cli(*args, "-f", "jsonl").stdout.splitlines()]
    assert jl == rows
    table = cli(*args, "-f", "table").stdout
    assert "clip_fraction" in table and "999" in table


def test_cli_default_t_spread_per_sample_and_seed(cli: Any, ckpts: dict[str, Any]) -> None:
    base = ("reconstruct", ckpts["gmm"], "--data", "gmm", "--n", "4", "-f", "csv")
    ts = [line.split(",")[0] for line in cli(*base).stdout.splitlines()[1:]]
    assert ts == ["0", "111", "222", "333", "444", "555", "666", "777", "888", "999"]
    per = cli(*base, "--t", "3,7", "--per-sample").stdout.splitlines()
    assert per[0] == "t,sample,alpha_bar,snr,mse,psnr,eps_mse,clip_fraction"
    assert [line.split(",")[:2] for line in per[1:]] == [
        ["3", "0"], ["3", "1"], ["3", "2"], ["3", "3"],
        ["7", "0"], ["7", "1"], ["7", "2"], ["7", "3"],
    ]  # fmt: skip
    # a real network's float32 GEMMs round differently per batch size (kernel choice): the same
    # noise and x_t, numbers equal to float32 rounding (the fake models above: bit-identical)
    again = cli(*base, "--t", "3,7", "--per-sample", "--batch-size", "3").stdout.splitlines()
    for a, b in zip(again[1:], per[1:], strict=True):
        assert [float(v) for v in a.split(",")] == pytest.approx(
            [float(v) for v in b.split(",")], rel=1e-5
        )
    other = cli(*base, "--t", "3,7", "--per-sample", "--seed", "1").stdout.splitlines()
    assert other[1] != per[1]


def test_cli_optimal_denoiser_beats_the_trained_model(cli: Any, ckpts: dict[str, Any]) -> None:
    import json

    res = cli(
        "reconstruct", ckpts["gmm"], "--data", "gmm", "--n", "400", "--seed", "3",
        "--compare-optimal", "--no-clip", "--every", "100", "-f", "json",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)
    assert list(rows[0])[-4:] == ["optimal_mse", "optimal_eps_mse", "excess_mse", "excess_stderr"]
    for row in rows:
        # Bayes-optimal on the same x_t: better up to the Monte Carlo noise of 400 samples,
        # which the paired standard error states (3 of them)
        assert row["excess_mse"] >= -3 * row["excess_stderr"], row
    assert sum(r["optimal_mse"] for r in rows) < 0.9 * sum(r["mse"] for r in rows)


def test_cli_image_model_reference_samples_and_plot(cli: Any, ckpts: dict[str, Any]) -> None:
    plot = ckpts["root"] / "figs" / "img.png"
    plot.parent.mkdir(exist_ok=True)  # a missing plot folder is a usage error (issue 7)
    res = cli("reconstruct", ckpts["img"], "--n", "5", "--plot", str(plot), "-f", "csv")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.splitlines()[0] == AGG and len(res.stdout.splitlines()) == 11
    assert plot.stat().st_size > 10_000 and "wrote" in res.stderr
    quiet = cli("reconstruct", ckpts["img"], "--t", "0", "--plot", str(plot), "-q", "-f", "csv")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    svg = ckpts["root"] / "gmm.svg"
    two_d = cli("reconstruct", ckpts["gmm"], "--data", "gmm", "--n", "50", "--t", "0,500",
                "--compare-optimal", "--plot", str(svg), "-q", "-f", "csv")  # fmt: skip
    assert two_d.exit_code == 0 and svg.read_text().startswith("<?xml")


def test_cli_torchscript_with_metadata_flags(cli: Any, ckpts: dict[str, Any]) -> None:
    args = ("reconstruct", ckpts["script"], "--data", "gmm", "--n", "8", "--t", "0,999",
            "--trust-program")  # fmt: skip
    missing = cli(*args, "-f", "csv")
    assert missing.exit_code != 0 and missing.stderr.startswith("Error: ")
    res = cli(
        *args, "--kind", "linear", "--prediction-type", "eps", "--data-shape", "2", "-f", "csv"
    )
    assert res.exit_code == 0, res.stderr
    native = cli("reconstruct", ckpts["gmm"], *args[2:], "-f", "csv")
    assert res.stdout == native.stdout


def test_cli_bad_inputs_one_error_line(cli: Any, ckpts: dict[str, Any], tmp_path: Any) -> None:
    import numpy as np

    gmm = ckpts["gmm"]
    _one_error_line(cli("reconstruct", str(tmp_path / "nope.pt"), "--data", "gmm"), 1, "not found")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((5, 3), dtype=np.float32))
    _one_error_line(cli("reconstruct", gmm, "--data", str(wrong)), 1, "shape")
    _one_error_line(cli("reconstruct", gmm, "--data", "gmm", "--device", "tpu"), 2, "tpu")
    _one_error_line(cli("reconstruct", gmm, "--data", "gmm", "--t", "1000"), 2, "out of range")
    _one_error_line(
        cli("reconstruct", gmm, "--data", "gmm", "--t", "1", "--every", "5"), 2, "together"
    )
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    bad_plot = str(blocker / "plot.png")
    _one_error_line(cli("reconstruct", gmm, "--data", "gmm", "--plot", bad_plot), 2, "plot")
    _one_error_line(cli("reconstruct", gmm), 2, "--data")  # no reference samples
    _one_error_line(
        cli("reconstruct", gmm, "--data", "moons", "--compare-optimal"), 2, "--compare-optimal"
    )
    _one_error_line(cli("reconstruct", gmm, "--data", "gmm", "--n", "0"), 2, "--n")
    _one_error_line(cli("reconstruct", gmm, "--data", "gmm", "--data-shape", "a,b"), 2, "shape")
    if not torch.cuda.is_available():
        _one_error_line(cli("reconstruct", gmm, "--data", "gmm", "--device", "cuda"), 1, "CUDA")


# ---------------------------------------------------------------------------------------------
# failures mid-run (issue 7): finite rows kept, the bad t named, data problems named as such


def test_data_not_finite_in_the_model_dtype_is_a_data_error() -> None:
    sched = core.make_schedule("linear", 100)
    model = ShrinkModel(sched, (2,))
    big = torch.tensor([[1e6, 0.0], [0.5, 0.1]], dtype=torch.float64)  # beyond float16's 65504
    with pytest.raises(DataError, match="not finite in the model's dtype float16"):
        reconstruction_sweep(model, big, [0], dtype="float16")
    nan = torch.tensor([[math.nan, 0.0]], dtype=torch.float64)
    with pytest.raises(DataError, match="1 value"):
        reconstruction_sweep(model, nan, [0])


def test_cli_nan_at_one_t_keeps_the_other_rows(cli: Any, hostile_programs: dict[str, str]) -> None:
    from conftest import HOSTILE_FLAGS

    args = ("reconstruct", hostile_programs["nan"], *HOSTILE_FLAGS, "--data", "moons")
    res = cli(*args, "--n", "8", "--t", "0,5,10,15", "-f", "csv")
    assert res.exit_code == 1
    lines = res.stdout.splitlines()
    assert lines[0] == AGG and [line.split(",")[0] for line in lines[1:]] == ["0", "5", "15"]
    assert res.stderr.startswith(
        "Error: the model returned NaN/Inf at 1 of 4 timestep(s), first at t = 10"
    )
    assert res.stderr.count("\n") == 1


def test_cli_model_exception_names_t(cli: Any, hostile_programs: dict[str, str]) -> None:
    from conftest import HOSTILE_FLAGS

    args = ("reconstruct", hostile_programs["raise"], *HOSTILE_FLAGS, "--data", "moons")
    res = cli(*args, "--n", "8", "--batch-size", "8", "--t", "0,5,10,15", "-f", "csv")
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr == "Error: the model failed at t = 10: RuntimeError: boom at ten\n"


def test_cli_train_records_the_range_of_file_data_outside_minus_one_one(
    cli: Any, tmp_path: Any
) -> None:
    import json

    import numpy as np

    angle = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    ring = np.stack([3 * np.cos(angle), 3 * np.sin(angle)], axis=1).astype("float32")
    np.save(tmp_path / "ring.npy", ring)
    out = tmp_path / "ring.pt"
    trained = cli("train", "--data", str(tmp_path / "ring.npy"), "--steps", "2", "--out", str(out))
    assert trained.exit_code == 0, trained.stderr
    info = json.loads(cli("info", str(out), "-f", "json").stdout)[0]
    assert info["data_min"] == pytest.approx(-3.0, abs=1e-6)
    assert info["data_max"] == pytest.approx(3.0, abs=1e-6)


def test_chunk_cap_is_below_one_timesteps_batch_for_a_large_image_model() -> None:
    from ddpmcli.run import chunk_cap
    from ddpmcli.run.chunking import EXTRA_MEMORY

    # the cifar-10 case of issue 8: not all 80 pairs, and fewer than the plain loop's 16 (its
    # activations, estimated at 3 MiB an image, exceed the 32 MiB allowance): the allowance's
    # worth, 10, which is more than half of 16
    assert EXTRA_MEMORY // (3 * 32 * 32 * 4 * 256) == 10
    assert chunk_cap(3 * 32 * 32, 16, 80) == 10
    assert chunk_cap(3 * 32 * 32, 64, 64 * 1000) == 32  # half: more than the allowance's 10
    assert chunk_cap(4 * 64 * 64, 4, 40) == 2  # SD latents: half of 4
    assert chunk_cap(16 * 16, 6, 60) == 60  # small images: the allowance holds them all
    assert chunk_cap(2, 64, 64 * 1000) == 4096  # 2-D data: activations are tiny
    assert chunk_cap(2, 64, 100) == 100


def test_the_automatic_chunk_gives_the_same_digits_every_run(
    ckpts: dict[str, Any], cli: Any
) -> None:
    # the chunk is a function of the sizes, never of timings: a float32 model's output may change
    # in its last bits with its batch, so two runs with one seed must use the same chunks
    args = ("reconstruct", ckpts["gmm"], "--data", "gmm", "--n", "48", "--every", "50", "-f", "csv")
    first, second = cli(*args), cli(*args)
    assert first.exit_code == 0 and first.stdout == second.stdout
    from ddpmcli.run import chunk_cap

    third = cli(*args, "--batch-size", str(chunk_cap(2, 48, 48 * 20)))
    assert third.stdout == first.stdout


def test_clip_count_inside_outside_and_nan() -> None:
    """The sweep's clip count: a chunk wholly inside the range (the CPU's one-pass shortcut)
    counts nothing and is returned as is; values outside are counted per pair and clipped only
    when asked; NaN counts as outside."""
    from ddpmcli.run.sweep import _clip_count

    inside = torch.tensor([[[-1.0, 0.5]], [[1.0, 0.0]]], dtype=torch.float64)
    x, outside = _clip_count(inside, (-1.0, 1.0), True)
    assert x is inside and outside.tolist() == [0.0, 0.0]
    mixed = torch.tensor([[[-1.5, 0.5]], [[2.0, math.nan]]], dtype=torch.float64)
    x, outside = _clip_count(mixed, (-1.0, 1.0), True)
    assert outside.tolist() == [1.0, 2.0] and outside.dtype == torch.float64
    assert x[0].tolist() == [[-1.0, 0.5]] and x[1, 0, 0] == 1.0 and math.isnan(x[1, 0, 1])
    x, outside = _clip_count(mixed, (-1.0, 1.0), False)
    assert x is mixed and outside.tolist() == [1.0, 2.0]
