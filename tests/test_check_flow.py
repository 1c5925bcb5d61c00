"""`ddpm check CKPT` on flow-matching checkpoints: the timestep-convention probe on a flow path.

ddpm calls a flow model with the path's ``model_timestep`` (1000 s for ``--kind flow``, as
diffusers' FlowMatchEuler scheduler and the SD3 pipeline pass it). The probe tries the other
conventions (s in [0, 1] as Flux's transformer takes it, the reversed 1 - s, the index, sigma,
c_noise) and must flag a model that takes another one, with no false alarm on correct ones.
Two kinds of model: the exact Bayes denoiser of a finite set as a flow network taking 1000 s or
s (fast, deterministic), and a tiny MLP trained by ddpm's own trainer, saved as trained and
saved declaring s (a planted misconfiguration). A sigma-space path (EDM's c_noise against sigma),
random SDXL/SD3/Flux folders (no alarm), and the small defects found around them: -T without
--kind on a checkpoint, an epsilon model's NaN x0 at s = 1, a malformed path spec's error line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ddpmcli
from ddpmcli import core
from ddpmcli import data as datasets
from ddpmcli.run import OptimalDenoiser
from ddpmcli.run.probe_timesteps import declared_path_convention, path_convention_values

pytestmark = pytest.mark.usefixtures("one_thread")
BAD = {"warning", "error"}


class OptimalFlowNet(nn.Module):
    """E[x0 | x_t] of ``points`` on a flow path as a network with flow output v = eps - x0,
    called with ``scale`` s (1000 s like SD3, 1 like Flux's transformer)."""

    def __init__(self, points: torch.Tensor, schedule: core.Schedule, scale: float) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1))
        self.schedule, self.scale = schedule, scale
        self.opt = OptimalDenoiser.from_points(points)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s_in = t.double() / self.scale
        i = torch.argmin((self.schedule.sigma_t[None, :] - s_in[:, None]).abs(), dim=1)
        s = self.schedule.sigma_t[i][:, None]
        xd = x.double()
        x0 = self.opt.predict_x0(xd, i, self.schedule)
        return ((xd - x0) / s).to(x.dtype)  # x_t = (1 - s) x0 + s eps: eps - x0 = (x_t - x0)/s


@pytest.fixture(scope="module")
def points() -> torch.Tensor:
    return datasets.get_data("moons", n=48, seed=0, dtype=torch.float64)


def _bad(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {r["code"]: r["severity"] for r in rows if r["severity"] in BAD}


def _path(schedule: core.Schedule, model_timestep: torch.Tensor) -> core.Schedule:
    return core.schedule_from_path("flow", schedule.alpha_t, schedule.sigma_t, model_timestep)


def test_declared_convention_is_named() -> None:
    flow = core.make_schedule("flow", 1000, shift=3.0)
    idx = [0, 10, 500]
    assert declared_path_convention(flow, idx) == "1000 s"
    assert declared_path_convention(_path(flow, flow.sigma_t), idx) == "s"
    assert declared_path_convention(_path(flow, flow.sigma_t * 7), idx) == "declared"
    short = core.make_schedule("flow", 50)  # a 50-step training grid: 50 s is ddpm's input
    assert declared_path_convention(short, [0, 20]) == "50 s"
    values = path_convention_values(flow, 10)
    s = float(flow.sigma_t[10])
    assert values["s"] == s and values["1000 (1 - s)"] == pytest.approx(1000 * (1 - s))
    assert values["c_noise"] == pytest.approx(0.25 * (torch.log(torch.tensor(s / (1 - s)))))
    assert "sigma" not in path_convention_values(flow, 999)  # s = 1: sigma is infinite


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_exact_flow_models(points, shift) -> None:
    flow = core.make_schedule("flow", 1000, shift=shift)
    sd3_like = OptimalFlowNet(points, flow, 1000.0)
    ok = ddpmcli.wrap(sd3_like, schedule=flow, prediction_type="flow", data_shape=(2,),
                      reference_samples=points)  # fmt: skip
    rows = ddpmcli.check(ok).rows
    assert _bad(rows) == {}, rows
    fit = next(r for r in rows if r["code"] == "timestep_convention_fit")
    assert fit["message"].startswith("the outputs fit model timestep 1000 s, as the schedule")
    assert fit["numbers"]["regret_1000 s"] <= 1.05 and fit["numbers"]["regret_s"] >= 1.5
    # Flux-like: the network takes s, the schedule declares 1000 s: an error, the best named
    flux_like = OptimalFlowNet(points, flow, 1.0)
    bad = ddpmcli.wrap(flux_like, schedule=flow, prediction_type="flow", data_shape=(2,),
                       reference_samples=points)  # fmt: skip
    result = ddpmcli.check(bad)
    assert _bad(result.rows) == {"timestep_convention_mismatch": "error"}, result.rows
    row = next(r for r in result.rows if r["code"] == "timestep_convention_mismatch")
    assert "fit model timestep s, not the declared 1000 s" in row["message"]
    assert row["numbers"]["regret_1000 s"] >= 1.5 and row["numbers"]["regret_s"] <= 1.05
    assert 0 < row["confidence"] <= 1 and result.failed
    # the same network declared with model_timestep = s: fits, no finding
    fixed = ddpmcli.wrap(flux_like, schedule=_path(flow, flow.sigma_t), prediction_type="flow",
                         data_shape=(2,), reference_samples=points)  # fmt: skip
    assert _bad(ddpmcli.check(fixed).rows) == {}


def test_noise_probes_only_warn(points) -> None:
    flow = core.make_schedule("flow", 1000)
    model = ddpmcli.wrap(OptimalFlowNet(points, flow, 1.0), schedule=flow,
                         prediction_type="flow", data_shape=(2,))  # fmt: skip
    rows = ddpmcli.check(model).rows
    assert all(r["severity"] != "error" for r in rows), rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny MLP trained as `ddpm train --kind flow --prediction-type flow` trains it (1000 s),
    saved as trained, and saved with an explicit path schedule whose model_timestep is s."""
    from ddpmcli import models
    from ddpmcli.checkpoints import save_native_checkpoint
    from ddpmcli.training import train_denoiser

    root = tmp_path_factory.mktemp("flow")
    x = datasets.get_data("moons", n=1024, seed=0, dtype=torch.float32)
    flow = core.make_schedule("flow", 1000)
    hp = {**models.default_hparams("mlp", (2,)), "hidden": 64}
    r = train_denoiser(x, flow, prediction_type="flow", hparams=hp, steps=250, seed=0, threads=1)
    out = {}
    for name, sched in (("trained", flow), ("declared_s", _path(flow, flow.sigma_t))):
        out[name] = save_native_checkpoint(
            root / f"{name}.pt", r.model, architecture="mlp", hparams=r.hparams,
            schedule=sched, prediction_type="flow", data_shape=(2,), reference_samples=x[:64],
        )  # fmt: skip
    return out


def test_cli_trained_flow_model(cli, trained) -> None:
    ok = cli("check", str(trained["trained"]), "--format", "json")
    assert ok.exit_code == 0, ok.stderr
    rows = json.loads(ok.stdout)
    assert _bad(rows) == {}, rows
    codes = {r["code"]: r for r in rows}
    assert codes["prediction_type_fit"]["message"].startswith("the outputs fit flow, as declared")
    assert "fit model timestep 1000 s" in codes["timestep_convention_fit"]["message"]
    bad = cli("check", str(trained["declared_s"]), "--format", "json")
    assert bad.exit_code == 1, bad.stderr
    rows = json.loads(bad.stdout)
    assert _bad(rows) == {"timestep_convention_mismatch": "error"}, rows
    row = next(r for r in rows if r["code"] == "timestep_convention_mismatch")
    assert "fit model timestep 1000 s, not the declared s" in row["message"]


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_cli_text_pipelines_raise_no_probe_alarm(cli, tmp_path, family) -> None:
    """Random-weight SDXL, SD3 and Flux folders (saved by diffusers' own pipelines): every probe
    is info, the timestep-convention probe included (on SD3's and Flux's flow path)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import pipeline_folders as pf

    build = {"sdxl": pf.sdxl_folder, "sd3": pf.sd3_folder, "flux": pf.flux_folder}[family]
    folder = build(tmp_path)
    result = cli("check", str(folder), "--n", "4", "--format", "json", "--threads", "1")
    rows = json.loads(result.stdout)
    probes = [r for r in rows if r["numbers"]]
    assert {"prediction_type_fit", "timestep_convention_fit"} <= {r["code"] for r in probes}
    assert _bad(probes) == {}, probes
    assert result.exit_code == (1 if any(r["severity"] == "error" for r in rows) else 0)


def test_schedule_flags_with_a_checkpoint(cli, trained) -> None:
    """-T without --kind was ignored without a word (check, reconstruct): a usage error now;
    --kind (with -T) builds the schedule the checkpoint is read with, as reconstruct does."""
    ckpt = str(trained["trained"])
    for command in ("check", "reconstruct"):
        r = cli(command, ckpt, "-T", "5", "--format", "tsv")
        assert r.exit_code == 2 and r.stdout == "", (command, r.stdout)
        assert r.stderr == (
            "Error: -T 5 sets the length of a --kind schedule; without --kind the checkpoint's "
            "own schedule is used\n"
        )
    own = json.loads(cli("check", ckpt, "--format", "json").stdout)
    linear = json.loads(cli("check", ckpt, "--kind", "linear", "-T", "50", "--format",
                            "json").stdout)  # fmt: skip
    assert "zero_terminal_snr" in {r["code"] for r in own}
    start = next(r for r in linear if r["code"] == "sampling_start")
    assert start["t"] == [49] and start["numbers"]["terminal_snr"] > 0


def test_reconstruct_says_why_eps_x0_is_nan_at_s_one(cli, trained) -> None:
    ckpt = str(trained["trained"])
    eps = cli("reconstruct", ckpt, "--prediction-type", "eps", "--t", "500,999", "--n", "8",
              "--format", "json")  # fmt: skip
    assert eps.exit_code == 0, eps.stderr
    rows = json.loads(eps.stdout)
    assert rows[0]["mse"] is not None and rows[1]["mse"] is None  # NaN: null in JSON
    assert eps.stderr == (
        "Warning: t = 999: alpha_t = 0 (x_t is pure noise), so x0 from an epsilon prediction, "
        "(x_t - sigma_t eps)/alpha_t, is undefined: mse and psnr are NaN there (a v, x0 or flow "
        "model rebuilds x0 at every t)\n"
    )
    flow = cli("reconstruct", ckpt, "--t", "500,999", "--n", "8", "--format", "json")
    assert flow.exit_code == 0 and flow.stderr == ""
    assert all(r["mse"] is not None for r in json.loads(flow.stdout))


class OptimalSigmaNet(nn.Module):
    """E[x0 | x_t] of ``points`` on a sigma-space path (x_t = x0 + sigma eps) as an x0-predicting
    network called with sigma itself."""

    def __init__(self, points: torch.Tensor, schedule: core.Schedule) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1))
        self.schedule, self.opt = schedule, OptimalDenoiser.from_points(points)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.schedule.sigma_t
        i = torch.argmin((sigma[None, :].log() - t.double().log()[:, None]).abs(), dim=1)
        return self.opt.predict_x0(x.double(), i, self.schedule).to(x.dtype)


def test_sigma_space_conventions(points) -> None:
    """EDM in sigma space declares c_noise = ln(sigma)/4: a network that takes sigma is an error
    there, and fits a path declaring sigma. sigma_max 2: past it the exact denoiser of 48 points
    scores no better than a linear guess on them, which says nothing of the convention."""
    edm = core.make_schedule("edm_sigma", 100, sigma_max=2.0)
    lint = {"nonzero_terminal_snr": "warning"}  # the schedule's, not a probe's: sigma_max 2
    net = OptimalSigmaNet(points, edm)
    bad = ddpmcli.wrap(net, schedule=edm, prediction_type="sample", data_shape=(2,),
                       reference_samples=points)  # fmt: skip
    rows = ddpmcli.check(bad).rows
    assert _bad(rows) == {"timestep_convention_mismatch": "error", **lint}, rows
    row = next(r for r in rows if r["code"] == "timestep_convention_mismatch")
    assert "fit model timestep sigma, not the declared c_noise" in row["message"]
    ve = core.schedule_from_path("ve", edm.alpha_t, edm.sigma_t, edm.sigma_t)
    ok = ddpmcli.wrap(net, schedule=ve, prediction_type="sample", data_shape=(2,),
                      reference_samples=points)  # fmt: skip
    rows = ddpmcli.check(ok).rows
    assert _bad(rows) == lint, rows
    assert "fit model timestep sigma, as the schedule" in next(
        r["message"] for r in rows if r["code"] == "timestep_convention_fit"
    )


def test_a_malformed_path_spec_is_one_short_line(cli, trained, tmp_path) -> None:
    """A stored path schedule without its kind: the error showed the whole spec (every per-t
    array, tens of kB on one line)."""
    stored = torch.load(trained["declared_s"], weights_only=True)
    del stored["schedule"]["kind"]
    torch.save(stored, tmp_path / "nokind.pt")
    r = cli("check", str(tmp_path / "nokind.pt"))
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and len(r.stderr) < 600, len(r.stderr)
    assert "malformed schedule spec" in r.stderr and "'path', 'sigma_t'" in r.stderr
