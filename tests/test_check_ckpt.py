"""`ddpm check CKPT` and `ddpmcli.check`: the schedule lint plus the behaviour probes.

The models whose behaviour must be read are exact: the Bayes-optimal denoiser of a finite set
(``run.optimal``) wrapped as a network that outputs eps, x0 or v, with 0- or 1-based timesteps,
so a probe sees a real eps/x0/v behaviour without training. Planted misconfigurations (an eps
model declared v, a 1-based model declared 0-based, a VAE scaling factor off by 10x) must be
errors; correct checkpoints (native, --model factory, class-conditional, diffusers UNet, DiT,
SD folders) must raise no warning or error from the probes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ddpmcli
from ddpmcli import core
from ddpmcli import data as datasets
from ddpmcli.run import OptimalDenoiser

sys.path.insert(0, str(Path(__file__).resolve().parent))
PROBE_CODES_BAD = {"warning", "error"}
pytestmark = pytest.mark.usefixtures("one_thread")  # 2 threads on a busy machine: 40x slower


class OptimalNet(nn.Module):
    """E[x0 | x_t] of ``points`` as a network with output ``output`` (epsilon, sample,
    v_prediction), trained (so to speak) with timesteps ``offset``-based; class-conditional
    when ``classes`` (labels per point) is given: label k uses class k's points, the label
    ``len(set(classes))`` all of them (or class 0's when ``bad_null``)."""

    def __init__(
        self,
        points: torch.Tensor,
        schedule: core.Schedule,
        output: str = "epsilon",
        offset: int = 0,
        classes: torch.Tensor | None = None,
        bad_null: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1))
        self.schedule, self.output, self.offset = schedule, output, offset
        self.all = OptimalDenoiser.from_points(points)
        self.per_class = []
        if classes is not None:
            for k in range(int(classes.max()) + 1):
                self.per_class.append(OptimalDenoiser.from_points(points[classes == k]))
        self.bad_null = bad_null

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Any:
        s = self.schedule
        i = (t.round().long() - self.offset).clamp(0, s.num_steps - 1)
        xd = x.double()
        if y is None:
            x0 = self.all.predict_x0(xd, i, s)
        else:
            null = len(self.per_class)
            x0 = torch.empty_like(xd)
            for k in y.unique().tolist():
                rows = y == k
                opt = self.all if k == null and not self.bad_null else self.per_class[k % null]
                x0[rows] = opt.predict_x0(xd[rows], i[rows], s)
        eps = s.eps_from_x0(xd, i, x0)
        outs = {"epsilon": eps, "sample": x0, "v_prediction": s.v_target(x0, eps, i)}
        return outs[self.output].to(x.dtype)


@pytest.fixture(scope="module")
def points() -> torch.Tensor:
    return datasets.get_data("moons", n=48, seed=0, dtype=torch.float64)


@pytest.fixture(scope="module")
def linear() -> core.Schedule:
    return core.make_schedule("linear", 1000)


def _wrapped(points: torch.Tensor, schedule: core.Schedule, output: str, declared: str,
             offset: int = 0) -> ddpmcli.LoadedModel:  # fmt: skip
    net = OptimalNet(points, schedule, output, offset)
    return ddpmcli.wrap(net, schedule=schedule, prediction_type=declared, data_shape=(2,),
                        reference_samples=points)  # fmt: skip


def _bad(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {r["code"]: r["severity"] for r in rows if r["severity"] in PROBE_CODES_BAD}


@pytest.mark.parametrize(
    ("output", "declared"),
    [("epsilon", "v_prediction"), ("sample", "epsilon"), ("v_prediction", "sample")],
)
def test_api_finds_a_wrong_prediction_type(points, linear, output, declared) -> None:
    result = ddpmcli.check(_wrapped(points, linear, output, declared))
    bad = _bad(result.rows)
    assert bad == {"prediction_type_mismatch": "error"}, result.rows
    row = next(r for r in result.rows if r["code"] == "prediction_type_mismatch")
    assert f"fit {output}, not the declared {declared}" in row["message"]
    assert row["numbers"][f"score_{output}"] < row["numbers"][f"score_{declared}"] / 1.5
    assert 0 < row["confidence"] <= 1
    assert result.failed


@pytest.mark.parametrize("output", ["epsilon", "sample", "v_prediction"])
def test_api_correct_models_raise_nothing(points, linear, output) -> None:
    result = ddpmcli.check(_wrapped(points, linear, output, output))
    assert _bad(result.rows) == {}, result.rows
    codes = {r["code"] for r in result.rows}
    assert {"prediction_type_fit", "timestep_convention_fit", "sampling_start"} <= codes
    fit = next(r for r in result.rows if r["code"] == "prediction_type_fit")
    assert fit["message"].startswith(f"the outputs fit {output}, as declared")


def test_api_finds_one_based_timesteps(points, linear) -> None:
    result = ddpmcli.check(_wrapped(points, linear, "epsilon", "epsilon", offset=1))
    assert _bad(result.rows) == {"timestep_convention_mismatch": "error"}, result.rows
    row = next(r for r in result.rows if r["code"] == "timestep_convention_mismatch")
    assert "fit 1-based timesteps" in row["message"]
    assert row["numbers"]["regret_1-based"] <= 1.05  # the best, or all but tied, everywhere
    assert row["numbers"]["regret_0-based"] >= 1.5


def test_noise_probes_never_raise_errors(points, linear) -> None:
    """Without data (no reference samples) the probes run on noise: a contradiction found
    there is at most a warning, and a random network is inconclusive."""
    net = OptimalNet(points, linear, "epsilon")
    model = ddpmcli.wrap(net, schedule=linear, prediction_type="v", data_shape=(2,))
    result = ddpmcli.check(model)
    assert result.source == "noise probes"
    assert all(r["severity"] != "error" for r in result.rows), result.rows
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    random = ddpmcli.wrap(
        lambda x, t: layer(torch.cat([x, t[:, None].float() / 1000], 1)), schedule=linear,
        data_shape=(2,), reference_samples=points,
    )  # fmt: skip
    assert _bad(ddpmcli.check(random).rows) == {}


def test_null_label_probe(points, linear) -> None:
    labels = (points[:, 1] > points[:, 1].median()).long()
    for bad_null, expected in ((False, {}), (True, {"null_label_not_unconditional": "warning"})):
        net = OptimalNet(points, linear, "epsilon", classes=labels, bad_null=bad_null)
        model = ddpmcli.wrap(net, schedule=linear, data_shape=(2,), num_classes=2, null_label=2,
                             reference_samples=points)  # fmt: skip
        rows = ddpmcli.check(model).rows
        assert _bad(rows) == expected, rows
        assert any(r["code"].startswith("null_label") for r in rows)


# ---------------------------------------------------------------------------------------------
# the command: native, --model factory, --from


FACTORY = """
import sys
sys.path.insert(0, {tests!r})
import torch
from ddpmcli import core
from test_check_ckpt import OptimalNet


def make(path, load_weights, output="epsilon", declared="epsilon", offset=0):
    points = load_weights(path)["points"]
    schedule = core.make_schedule("linear", 1000)
    meta = {{"schedule": {{"kind": "linear", "timesteps": 1000}}, "prediction_type": declared,
            "data_shape": [2], "reference_samples": points}}
    return OptimalNet(points, schedule, output, offset), meta


def eps_declared_v(path, load_weights):
    return make(path, load_weights, declared="v_prediction")


def one_based(path, load_weights):
    return make(path, load_weights, offset=1)
"""


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory, points: torch.Tensor) -> Path:
    root = tmp_path_factory.mktemp("factory")
    (root / "optimal.py").write_text(FACTORY.format(tests=str(Path(__file__).parent)))
    torch.save({"points": points.float()}, root / "points.pt")
    return root


@pytest.mark.parametrize(
    ("name", "code"),
    [("make", None), ("eps_declared_v", "prediction_type_mismatch"),
     ("one_based", "timestep_convention_mismatch")],
)  # fmt: skip
def test_cli_model_factory(cli, factory, name, code) -> None:
    spec = f"{factory / 'optimal.py'}:{name}"
    result = cli("check", str(factory / "points.pt"), "--model", spec, "--format", "json",
                 "--threads", "1")  # fmt: skip
    rows = json.loads(result.stdout)
    assert _bad(rows) == ({} if code is None else {code: "error"}), rows
    assert result.exit_code == (0 if code is None else 1)
    assert all(set(r) == {"severity", "code", "t", "confidence", "message", "numbers"}
               for r in rows)  # fmt: skip


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny MLP trained a few hundred steps on moons (an eps model), saved as it is and saved
    declared v."""
    from ddpmcli import models
    from ddpmcli.checkpoints import save_native_checkpoint
    from ddpmcli.training import train_denoiser

    root = tmp_path_factory.mktemp("native")
    x = datasets.get_data("moons", n=1024, seed=0, dtype=torch.float32)
    sched = core.make_schedule("linear", 1000)
    hp = {**models.default_hparams("mlp", (2,)), "hidden": 64}
    r = train_denoiser(x, sched, hparams=hp, steps=250, seed=0, threads=1)
    out = {}
    for declared in ("epsilon", "v_prediction"):
        out[declared] = save_native_checkpoint(
            root / f"{declared}.pt", r.model, architecture="mlp", hparams=r.hparams,
            schedule=sched, prediction_type=declared, data_shape=(2,),
            reference_samples=x[:64],
        )  # fmt: skip
    return out


def test_cli_native(cli, native) -> None:
    ok = cli("check", str(native["epsilon"]), "--format", "json")
    assert ok.exit_code == 0, ok.stderr
    assert _bad(json.loads(ok.stdout)) == {}
    bad = cli("check", str(native["v_prediction"]), "--format", "json")
    assert bad.exit_code == 1
    assert _bad(json.loads(bad.stdout)) == {"prediction_type_mismatch": "error"}
    # --prediction-type overrides the declared one: then it fits
    fixed = cli(
        "check", str(native["v_prediction"]), "--prediction-type", "eps", "--format", "json"
    )
    assert fixed.exit_code == 0, fixed.stdout
    # --from a checkpoint is refused with a hint (schedule_options); a schedule flag is refused
    via = cli("check", "--from", str(native["epsilon"]), "--format", "json")
    assert via.exit_code == 2 and "is a model checkpoint" in via.stderr
    refused = cli("check", str(native["epsilon"]), "--beta-start", "0.001")
    assert refused.exit_code == 2 and "--beta-start" in refused.stderr


def test_cli_table_and_tsv(cli, native) -> None:
    tsv = cli("check", str(native["epsilon"]), "--format", "tsv")
    assert tsv.exit_code == 0
    assert tsv.stdout.splitlines()[0].split("\t") == [
        "severity", "code", "t", "confidence", "message",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# diffusers folders: no false alarm on random weights; the VAE scaling factor


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import test_conditional as tc

    return {
        "unet": tc._unet_folder(tmp_path_factory.mktemp("cc")),
        "dit": tc.dit_folder(tmp_path_factory.mktemp("dit")),
        "sd": tc.sd_folder(tmp_path_factory.mktemp("sd")),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    path = tmp_path_factory.mktemp("img") / "x.npy"
    gen = torch.Generator().manual_seed(1)
    np.save(path, (torch.rand((6, 3, 8, 8), generator=gen) * 2 - 1).numpy())
    return path


@pytest.mark.parametrize("name", ["unet", "dit", "sd"])
def test_cli_folders_raise_no_probe_alarm(cli, folders, name) -> None:
    """Random weights explain nothing: every probe is info (inconclusive where it fits
    nothing). The folders' own T = 20 schedules are linted as `ddpm check` lints them (their
    terminal SNR above 1 is an error of the schedule, not of a probe)."""
    result = cli("check", str(folders[name]), "--n", "4", "--format", "json", "--threads", "1")
    rows = json.loads(result.stdout)
    probes = [r for r in rows if r["numbers"]]  # every probe row carries its numbers
    codes = {"prediction_type_fit", "timestep_convention_fit", "sampling_start"}
    assert codes <= {r["code"] for r in probes}
    assert _bad(probes) == {}, probes
    assert result.exit_code == (1 if _bad(rows) == {"terminal_snr_above_1": "error"} else 0)


def _set_scaling(folder: Path, factor: float) -> None:
    config = folder / "vae" / "config.json"
    values = json.loads(config.read_text())
    values["scaling_factor"] = factor
    config.write_text(json.dumps(values))


def test_vae_scaling_factor_off_by_ten(cli, folders, images) -> None:
    sd = folders["sd"]
    model = ddpmcli.load(sd)
    z = model.latent.encode(torch.from_numpy(__import__("numpy").load(images)).float())
    unit = float(model.latent.scaling_factor) / float(z.std(unbiased=False))  # unit latents
    _set_scaling(sd, unit)
    good = cli("check", str(sd), "--data", str(images), "--format", "json", "--threads", "1")
    rows = json.loads(good.stdout)
    assert {r["code"]: r["severity"] for r in rows}["vae_scaling_fit"] == "info"
    _set_scaling(sd, unit * 10)
    bad = cli("check", str(sd), "--data", str(images), "--format", "json", "--threads", "1")
    assert bad.exit_code == 1
    row = next(r for r in json.loads(bad.stdout) if r["code"] == "vae_scaling_mismatch")
    assert row["severity"] == "error"
    assert row["numbers"]["latent_std"] == pytest.approx(10, rel=1e-6)
    assert f"scaling_factor {unit:.4g} gives them unit variance" in row["message"]
