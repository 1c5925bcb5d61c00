"""Flow-prediction models end to end (issue 16): a rectified-flow model declared through
``ddpmcli.wrap`` or a native checkpoint runs through reconstruct, sample (DDIM with eta 0 on the
path = flow Euler) and nll in the path's own coordinates, and `ddpm info` shows its path.

The reference model is the exact optimal velocity of a point set, computed from the network's
timestep alone (s = timestep/1000): it knows nothing of ddpm's arrays, so it checks that the model
is called with 1000 s and that its output is read as v = eps - x0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import ddpmcli
from ddpmcli import core
from ddpmcli.run import OptimalDenoiser

T = 200
POINTS = torch.tensor([[-0.6, 0.2], [0.5, -0.4], [0.1, 0.7], [0.3, 0.3]], dtype=torch.float64)


class OptimalFlow(nn.Module):
    """v*(x, s) = (x - E[x0 | x_t = x])/s for x_t = (1 - s) x0 + s eps, x0 uniform on POINTS."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("points", POINTS.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (t.to(torch.float64) / T)[:, None]
        x64 = x.to(torch.float64)
        diff = x64[:, None, :] - (1 - s)[:, None] * self.points[None]
        w = torch.softmax(-(diff**2).sum(-1) / (2 * s**2), dim=1)
        return ((x64 - w @ self.points) / s).to(x.dtype)


def _flow_model(shift: float = 3.0) -> ddpmcli.LoadedModel:
    sched = ddpmcli.schedule("flow", T, shift=shift)
    return ddpmcli.wrap(
        OptimalFlow(), schedule=sched, prediction_type="flow", data_shape=(2,),
        reference_samples=POINTS.to(torch.float32),
    )  # fmt: skip


def test_reconstruct_of_the_optimal_flow_is_the_optimal_denoiser() -> None:
    model = _flow_model()
    r = ddpmcli.reconstruct(
        model, POINTS.repeat(4, 1), t=[0, 20, 100, 199], clip=False, dtype="float64",
        compare_optimal=OptimalDenoiser.from_points(POINTS),
    )  # fmt: skip
    for row in r.rows:
        # the model sees its timestep in float32 (as diffusers passes it): 1e-7 relative in s
        assert row["mse"] == pytest.approx(row["optimal_mse"], rel=1e-6, abs=1e-12), row
        assert row["eps_mse"] == pytest.approx(row["optimal_eps_mse"], rel=1e-6, abs=1e-12)
    # the path's own coordinates come with each row: alpha_t = 1 - s, sigma_t = s (shifted s)
    sched = model.schedule
    for row in r.rows:
        assert list(row)[:3] == ["t", "alpha_t", "sigma_t"]
        assert row["alpha_t"] == float(sched.alpha_t[row["t"]])
        assert row["sigma_t"] == float(sched.sigma_t[row["t"]])
        assert row["alpha_t"] + row["sigma_t"] == pytest.approx(1.0, abs=1e-15)


def test_ddim_on_a_flow_is_the_flow_euler_loop() -> None:
    """Deterministic DDIM (eta 0) on the flow path: x <- x + (s_next - s) v, from x_T = eps."""
    model = _flow_model()
    init = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    r = ddpmcli.sample(
        model, n=6, steps=20, spacing="linspace", sampler="ddim", init=init, clip=False,
        dtype="float64",
    )  # fmt: skip
    sched = r.schedule
    x = init.to(torch.float64)
    net = OptimalFlow()
    s = sched.sigma_t.tolist()
    for i in range(sched.num_steps - 1, -1, -1):
        t = torch.full((6,), float(sched.model_timestep[i]), dtype=torch.float64)
        x = x + ((s[i - 1] if i else 0.0) - s[i]) * net(x, t)
    assert sched.num_steps == 20 and float(sched.sigma_t[0]) < 0.02
    assert torch.allclose(r.samples.to(torch.float64), x, rtol=1e-6, atol=1e-6)  # float32 out
    # the optimal flow brings every sample onto one of the points
    nearest = torch.cdist(x, POINTS).min(dim=1).values
    assert float(nearest.max()) < 1e-3


def test_nll_of_a_flow_model_is_finite_and_the_prior_term_is_the_vp_one() -> None:
    model = _flow_model()
    r = ddpmcli.nll(model, POINTS.repeat(2, 1), dtype="float64")
    total = [row for row in r.rows if row.get("term") == "total"][0]
    assert math.isfinite(total["bits_per_dim"])
    # the flow ends at s = 1: x_T = eps exactly, so the prior term is 0
    prior = [row for row in r.rows if row.get("term") == "prior"][0]
    assert prior["bits_per_dim"] == pytest.approx(0.0, abs=1e-12)


def test_native_flow_checkpoint_through_the_cli(tmp_path: Path, cli) -> None:
    from ddpmcli import models
    from ddpmcli.checkpoints import save_native_checkpoint

    torch.manual_seed(0)
    hp = models.default_hparams("mlp", (2,))
    path = save_native_checkpoint(
        tmp_path / "flow.pt", models.build_model("mlp", hp), architecture="mlp", hparams=hp,
        schedule=core.make_schedule("flow", 50, shift=3.0), prediction_type="flow",
        data_shape=(2,), reference_samples=POINTS.to(torch.float32),
    )  # fmt: skip
    info = cli("info", str(path), "--format", "json")
    assert info.exit_code == 0, info.stderr
    row = json.loads(info.stdout)[0]
    assert (row["noise_path"], row["shift"], row["prediction_type"]) == ("flow", 3.0, "flow")
    assert row["grid"].startswith("50 entries, sigma_t 0.0")
    for args in (
        ("reconstruct", str(path), "--format", "csv"),
        ("sample", str(path), "--sampler", "ddim", "--steps", "5", "-n", "8", "--format", "csv"),
        ("nll", str(path), "-n", "4", "--format", "csv"),
    ):
        result = cli(*args)
        assert result.exit_code == 0, (args, result.stderr)
        assert "nan" not in result.stdout.lower(), args
    head = cli("reconstruct", str(path), "--format", "csv", "--t", "25").stdout.splitlines()[0]
    assert head.startswith("t,alpha_t,sigma_t,alpha_bar,"), head


def test_training_feeds_a_flow_model_its_model_timesteps() -> None:
    from ddpmcli import training

    sched = core.make_schedule("flow", 10, shift=2.0)
    seen: list[torch.Tensor] = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen.append(t.detach().clone())
            return x * self.w

    x0 = torch.zeros(4, 2)
    t = torch.tensor([0, 3, 9, 9])
    loss = training._loss(  # the one loss step of train_denoiser
        Spy(), sched, sched.network_timesteps(torch.arange(10)), x0, t, torch.ones(4, 2),
        "flow", False,
    )  # fmt: skip
    assert torch.allclose(seen[0].double(), sched.model_timestep[t], rtol=1e-7)
    # flow target v = eps - x0 = 1, the output 0: loss 1
    assert float(loss.detach()) == pytest.approx(1.0)


FACTORY = """
import torch
from torch import nn


class Flow(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, t):
        return self.lin(torch.cat([x, t.to(x.dtype)[:, None] / 1000], dim=1))


def make(path, load_weights):
    return Flow(), {
        "schedule": {"kind": "flow", "timesteps": 100, "params": {"shift": 3.0}},
        "prediction_type": "velocity",
        "data_shape": [2],
    }
"""


def test_a_model_factory_declares_a_flow_path(tmp_path: Path, cli) -> None:
    (tmp_path / "flowfactory.py").write_text(FACTORY)
    weights = tmp_path / "weights.pt"
    torch.save({}, weights)
    spec = f"{tmp_path / 'flowfactory.py'}:make"
    info = cli("info", "--model", spec, str(weights), "--format", "json")
    assert info.exit_code == 0, info.stderr
    row = json.loads(info.stdout)[0]
    assert (row["noise_path"], row["shift"], row["prediction_type"]) == ("flow", 3.0, "flow")
    result = cli(
        "sample", "--model", spec, str(weights), "--sampler", "ddim", "--steps", "4", "-n", "4",
        "--format", "csv",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr


class OptimalSigmaSpace(nn.Module):
    """E[x0 | x0 + sigma eps = x] for x0 uniform on POINTS, sigma = exp(4 c_noise) (EDM)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("points", POINTS.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = torch.exp(4 * t.to(torch.float64))[:, None]
        x64 = x.to(torch.float64)
        diff = x64[:, None, :] - self.points[None]
        w = torch.softmax(-(diff**2).sum(-1) / (2 * sigma**2), dim=1)
        return (w @ self.points).to(x.dtype)


def test_a_sigma_space_model_is_called_with_c_noise() -> None:
    sched = ddpmcli.schedule("edm_sigma", 100)
    model = ddpmcli.wrap(
        OptimalSigmaSpace(), schedule=sched, prediction_type="sample", data_shape=(2,)
    )
    r = ddpmcli.reconstruct(
        model, POINTS.repeat(4, 1), t=[0, 50, 99], clip=False, dtype="float64",
        compare_optimal=OptimalDenoiser.from_points(POINTS),
    )  # fmt: skip
    for row in r.rows:
        assert row["mse"] == pytest.approx(row["optimal_mse"], rel=1e-5, abs=1e-12), row
    # sample's t is what the model is called with: c_noise itself, not rounded to 1, 0, -1
    run = ddpmcli.sample(model, 4, 5, "heun", spacing="trailing", clip=False)
    called = [float(v) for v in run.schedule.model_timestep.flip(0)]
    assert [row["t"] for row in run.rows] == called
    assert len({round(v) for v in called}) < len(called)  # rounding would merge some


def test_train_on_a_flow_path_defaults_to_flow_prediction(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    """An epsilon model cannot rebuild x0 where alpha_t = 0 (a flow's s = 1, a zero-terminal-SNR
    VP schedule; check calls it an error): train's default follows the path (flow; v at zero
    terminal SNR), another explicit type still wins, and an explicit epsilon there is refused."""
    cases = (
        (["--kind", "flow"], "flow"),
        (["--kind", "flow", "--prediction-type", "x0"], "sample"),
        (["--zero-terminal-snr"], "v_prediction"),
    )
    for i, (extra, want) in enumerate(cases):
        out = tmp_path / f"m{i}.pt"
        done = cli("train", "--data", "moons", "--steps", "3", "--n", "64",
                   "--out", str(out), "-q", *extra)  # fmt: skip
        assert done.exit_code == 0, done.stderr
        assert ddpmcli.load(str(out)).prediction_type == want
    for extra in (["--kind", "flow"], ["--zero-terminal-snr"]):
        out = tmp_path / "eps.pt"
        done = cli("train", "--data", "moons", "--steps", "3", "--n", "64", "--out", str(out),
                   "-q", "--prediction-type", "epsilon", *extra)  # fmt: skip
        assert done.exit_code == 2 and not out.exists(), done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: --prediction-type epsilon with")
    plain = tmp_path / "vp.pt"
    done = cli("train", "--data", "moons", "--steps", "3", "--n", "64", "--out", str(plain), "-q")
    assert done.exit_code == 0 and ddpmcli.load(str(plain)).prediction_type == "epsilon"
