"""The Python API (ddpmcli.schedule/load/wrap/reconstruct/sample/nll): the CLI's numbers, the
closed-form error of a Bayes-optimal denoiser, and the README's training-loop example."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from rowcheck import as_json_rows
from torch import Tensor, nn

import ddpmcli
from ddpmcli import core
from ddpmcli.data import GaussianMixture
from ddpmcli.errors import CheckpointError, ParameterError
from ddpmcli.run import OptimalDenoiser

T = 100


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny MLP trained for 30 steps on gmm (linear schedule, T = 100)."""
    from ddpmcli.checkpoints import save_native_checkpoint
    from ddpmcli.data import builtin_dataset
    from ddpmcli.training import train_denoiser

    sched = core.make_schedule("linear", T)
    trained = train_denoiser(
        builtin_dataset("gmm", 512, seed=0), sched, steps=30, batch_size=64, lr=3e-3, seed=0,
        hparams={"hidden": 32, "num_blocks": 1, "time_dim": 16},
    )  # fmt: skip
    path = save_native_checkpoint(
        tmp_path_factory.mktemp("api") / "gmm.pt", trained.model,
        architecture=trained.architecture, hparams=trained.hparams, schedule=sched,
        prediction_type="epsilon", data_shape=(2,),
    )  # fmt: skip
    return str(path)


def _json_rows(cli: Any, *args: str) -> list[dict[str, Any]]:
    """The command's rows (JSON). The tests fix --batch-size on both sides, so that both run the
    same chunks whatever the automatic chunk is."""
    result = cli(*args, "--format", "json", "--quiet")
    assert result.exit_code == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


# ---------------------------------------------------------------------------------------------
# the CLI's rows are the API's rows


def test_reconstruct_cli_rows_equal_api_rows(cli: Any, ckpt: str) -> None:
    rows = _json_rows(
        cli, "reconstruct", ckpt, "--data", "gmm", "--n", "16", "--t", "0,50,99", "--no-clip",
        "--batch-size", "16",
    )  # fmt: skip
    model = ddpmcli.load(ckpt)
    api = ddpmcli.reconstruct(model, "gmm", n=16, t=[0, 50, 99], seed=0, clip=False, batch_size=16)
    assert [row["t"] for row in rows] == [0, 50, 99]
    assert rows == api.rows
    # the same data as a tensor, and the per-sample rows
    from ddpmcli.data import get_data

    x0 = get_data("gmm", n=16, seed=0, data_range=model.data_range, dtype=torch.float64)
    again = ddpmcli.reconstruct(model, x0, t=[0, 50, 99], clip=False, per_sample=True)
    assert again.rows == api.rows
    per = _json_rows(
        cli, "reconstruct", ckpt, "--data", "gmm", "--n", "16", "--t", "0,50,99", "--no-clip",
        "--per-sample", "--batch-size", "16",
    )  # fmt: skip
    assert per == again.sample_rows and len(per) == 48


def test_sample_cli_rows_equal_api_rows(cli: Any, ckpt: str) -> None:
    args = ("sample", ckpt, "--n", "8", "--steps", "10", "--sampler", "ddim", "--seed", "3")
    rows = _json_rows(cli, *args)
    result = ddpmcli.sample(ddpmcli.load(ckpt), n=8, steps=10, sampler="ddim", seed=3)
    assert len(rows) == 10 and rows == as_json_rows(result.rows)
    assert result.samples.shape == (8, 2) and result.schedule.num_steps == 10
    assert [row["t"] for row in rows][:2] == [99, 89]  # trailing spacing visits T-1


def test_sample_npz_equals_api_samples(cli: Any, ckpt: str, tmp_path: Path) -> None:
    import numpy as np

    out = tmp_path / "s.npz"
    res = cli("sample", ckpt, "--n", "6", "--steps", "5", "--save", str(out), "-f", "json", "-q")
    assert res.exit_code == 0, res.stderr
    api = ddpmcli.sample(ddpmcli.load(ckpt), n=6, steps=5)
    assert torch.equal(torch.from_numpy(np.load(out)["samples"]), api.samples)


def test_nll_cli_rows_equal_api_rows(cli: Any, ckpt: str) -> None:
    rows = _json_rows(
        cli, "nll", ckpt, "--data", "gmm", "-n", "16", "--seed", "1", "--batch-size", "64"
    )
    result = ddpmcli.nll(ddpmcli.load(ckpt), "gmm", n=16, seed=1, batch_size=64)
    assert rows == result.rows
    assert rows[-1]["term"] == "total" and rows[-1]["bits_per_dim"] == result.total_bpd
    assert len(rows) == T + 2  # every t, the prior, the total
    subset = _json_rows(
        cli, "nll", ckpt, "--data", "gmm", "--n", "8", "--t-random", "9", "--batch-size", "16"
    )
    estimate = ddpmcli.nll(ddpmcli.load(ckpt), "gmm", n=8, t_random=9, batch_size=16)
    assert subset == estimate.rows and subset[-1]["term"] == "total_estimate"


# ---------------------------------------------------------------------------------------------
# the closed form: a Bayes-optimal denoiser of Gaussian data, wrapped


def test_optimal_denoiser_matches_closed_form_error() -> None:
    """x0 ~ N(0, s^2 I): E[x0 | x_t] = sqrt(ab) s^2 / (ab s^2 + 1 - ab) x_t, whose error per
    value is s^2 (1 - ab) / (ab s^2 + 1 - ab) (Gaussian conditioning). The sweep's mse is a mean
    of n D squared errors, each s_err^2 chi^2_1: relative standard error sqrt(2 / (n D))."""
    s, dim, n = 0.7, 4, 4000
    sched = ddpmcli.schedule("cosine", timesteps=T)
    gaussian = GaussianMixture(
        weights=torch.ones(1, dtype=torch.float64),
        means=torch.zeros(1, dim, dtype=torch.float64),
        stds=torch.full((1,), s, dtype=torch.float64),
    )
    optimal = OptimalDenoiser.from_mixture(gaussian)
    model = ddpmcli.wrap(
        lambda x_t, t: optimal.predict_x0(x_t.double(), t, sched).to(x_t.dtype),
        schedule=sched, prediction_type="x0", data_shape=(dim,), data_range=(-10.0, 10.0),
    )  # fmt: skip
    x0 = torch.randn(n, dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * s
    ts = [0, 10, 40, 70, 99]
    result = ddpmcli.reconstruct(model, x0, t=ts, seed=0, clip=False, dtype="float64")
    for row in result.rows:
        ab = float(sched.alpha_bar[row["t"]])
        exact = s**2 * (1 - ab) / (ab * s**2 + 1 - ab)
        tolerance = 4 * math.sqrt(2 / (n * dim))
        assert abs(row["mse"] / exact - 1) < tolerance, (row["t"], row["mse"], exact)
        assert row["alpha_bar"] == ab
    # the optimal columns of the same sweep: the same denoiser, so the same error
    both = ddpmcli.reconstruct(
        model, x0, t=ts, clip=False, dtype="float64", compare_optimal=optimal
    )
    for row in both.rows:
        assert row["optimal_mse"] == pytest.approx(row["mse"], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# wrap: modules, callables, errors


class _Linear(nn.Module):
    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.layer = nn.Linear(dim + 1, dim)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.drop(self.layer(torch.cat([x, t[:, None].to(x.dtype) / T], dim=1)))


def test_wrap_runs_in_eval_mode_restores_mode_and_never_moves_the_module() -> None:
    torch.manual_seed(0)
    net = _Linear().train()
    model = ddpmcli.wrap(net, schedule=ddpmcli.schedule(timesteps=T), data_shape=(2,))
    x0 = torch.randn(32, 2) * 0.5
    first = ddpmcli.reconstruct(model, x0, t=[5, 50], clip=False)
    again = ddpmcli.reconstruct(model, x0, t=[5, 50], clip=False)
    assert first.rows == again.rows  # dropout off: eval mode during the calls
    assert net.training  # and the module's own mode back afterwards
    wider = ddpmcli.reconstruct(model, x0, t=[5, 50], clip=False, dtype="float64")
    assert net.layer.weight.dtype == torch.float32  # a float64 run used a copy
    assert wider.rows[0]["mse"] == pytest.approx(first.rows[0]["mse"], rel=1e-5)
    with torch.no_grad():
        net.layer.weight.mul_(0.0)
        net.layer.bias.zero_()
    zeroed = ddpmcli.reconstruct(model, x0, t=[5, 50], clip=False)
    assert zeroed.rows[1]["eps_mse"] != first.rows[1]["eps_mse"]  # the live weights
    assert zeroed.rows[1]["eps_mse"] == pytest.approx(1.0, abs=0.5)  # eps_hat = 0


def test_wrap_unwraps_outputs_and_rejects_bad_parameters() -> None:
    sched = ddpmcli.schedule("cosine", timesteps=20)

    class Out:
        def __init__(self, sample: Tensor) -> None:
            self.sample = sample

    as_output = ddpmcli.wrap(lambda x, t: Out(0.1 * x), schedule=sched, data_shape=(3,))
    as_tuple = ddpmcli.wrap(lambda x, t: (0.1 * x,), schedule=sched, data_shape=(3,))
    x0 = torch.rand(5, 3) - 0.5
    assert ddpmcli.reconstruct(as_output, x0).rows == ddpmcli.reconstruct(as_tuple, x0).rows
    with pytest.raises(ParameterError, match="prediction_type 'noise' is unknown"):
        ddpmcli.wrap(lambda x, t: x, schedule=sched, prediction_type="noise", data_shape=(3,))
    with pytest.raises(ParameterError, match=r"data_shape \[3, 4\]"):
        ddpmcli.wrap(lambda x, t: x, schedule=sched, data_shape=(3, 4))
    with pytest.raises(ParameterError, match="data_range"):
        ddpmcli.wrap(lambda x, t: x, schedule=sched, data_shape=(3,), data_range=(1.0, -1.0))
    with pytest.raises(CheckpointError, match="does not match data shape"):
        ddpmcli.wrap(lambda x, t: x[:, :2], schedule=sched, data_shape=(3,))


class _Labelled(nn.Module):
    """A class-conditional stand-in: a label table (4 classes and a null row 4) added to a
    linear map of x_t, so every label moves the output differently."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table, self.lin = nn.Embedding(5, 3), nn.Linear(3, 3)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        return self.lin(x) + self.table(labels)


def test_wrap_class_conditional_module_gets_each_rows_label_and_guidance() -> None:
    sched, net = ddpmcli.schedule("linear", timesteps=50), _Labelled()
    x0, ts = torch.rand(8, 3) - 0.5, [0, 25, 49]

    def rows(fn: Any, **labels: Any) -> list[dict[str, Any]]:
        model = ddpmcli.wrap(fn, schedule=sched, data_shape=(3,), **labels)
        with torch.inference_mode():
            return ddpmcli.reconstruct(model, x0, t=ts, seed=3).rows

    def fixed(label: Tensor) -> Any:
        return lambda x, t: net(x, t, label.expand(len(x)))

    two = dict(num_classes=4, null_label=4)
    assert rows(net, **two, class_label=2) == rows(fixed(torch.tensor(2)))
    assert rows(net, **two) == rows(fixed(torch.tensor(4)))  # no label: the null label
    assert rows(net, **two, class_label=1) != rows(net, **two, class_label=2)

    # `all` cycles by sample index: sample i gets label i % 4, at every t
    def per_sample(fn: Any, **labels: Any) -> list[dict[str, Any]]:
        model = ddpmcli.wrap(fn, schedule=sched, data_shape=(3,), **labels)
        return ddpmcli.reconstruct(model, x0, t=ts, seed=3, per_sample=True).sample_rows

    cycled = per_sample(net, **two, class_label="all")
    for label in range(4):
        alone = per_sample(fixed(torch.tensor(label)))
        mine = [r for r in cycled if r["sample"] % 4 == label]
        assert mine and mine == [r for r in alone if r["sample"] % 4 == label]

    def guided(x: Tensor, t: Tensor) -> Tensor:
        cond, null = net(x, t, torch.full_like(t, 1)), net(x, t, torch.full_like(t, 4))
        return null + 3.0 * (cond - null)

    got = rows(net, **two, class_label=1, guidance_scale=3.0)
    want = rows(guided)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        assert all(math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-9) for k in a)


def test_wrap_class_conditional_refusals() -> None:
    sched, net = ddpmcli.schedule("linear", timesteps=50), _Labelled()
    with pytest.raises(CheckpointError, match="4 classes and no null label: pass class_label"):
        ddpmcli.wrap(net, schedule=sched, data_shape=(3,), num_classes=4)
    with pytest.raises(CheckpointError, match="guidance_scale needs a null"):
        ddpmcli.wrap(
            net, schedule=sched, data_shape=(3,), num_classes=4, class_label=0, guidance_scale=2
        )
    with pytest.raises(ParameterError, match=r"null_label must be .* outside the classes 0\.\.3"):
        ddpmcli.wrap(net, schedule=sched, data_shape=(3,), num_classes=4, null_label=2)
    with pytest.raises(ParameterError, match="null_label needs num_classes"):
        ddpmcli.wrap(net, schedule=sched, data_shape=(3,), null_label=4)
    with pytest.raises(ParameterError, match="num_classes must be a positive integer"):
        ddpmcli.wrap(net, schedule=sched, data_shape=(3,), num_classes=0, class_label=0)
    with pytest.raises(
        ParameterError, match=r"class_label 7 is out of range: .* 4 classes \(0\.\.3\)"
    ):
        ddpmcli.wrap(net, schedule=sched, data_shape=(3,), num_classes=4, class_label=7)
    with pytest.raises(CheckpointError, match="class_label"):  # an unconditional module
        ddpmcli.wrap(lambda x, t: x, schedule=sched, data_shape=(3,), class_label=1)


def test_api_errors_name_parameters(ckpt: str) -> None:
    model = ddpmcli.load(ckpt)
    with pytest.raises(ParameterError, match=r"^t 100 is out of range"):
        ddpmcli.reconstruct(model, "gmm", n=4, t=[100])
    with pytest.raises(ParameterError, match=r"^t 2.5: timesteps are whole numbers"):
        ddpmcli.reconstruct(model, "gmm", n=4, t=[1, 2.5])  # type: ignore[list-item]
    as_tensor = ddpmcli.reconstruct(model, "gmm", n=4, t=torch.tensor([3, 7]), batch_size=8)
    assert [row["t"] for row in as_tensor.rows] == [3, 7]
    assert ddpmcli.reconstruct(model, "gmm", n=4, t=7, batch_size=8).rows == as_tensor.rows[1:]
    with pytest.raises(ParameterError, match=r"^eta applies to sampler ddim only"):
        ddpmcli.sample(model, n=2, eta=0.5)
    with pytest.raises(ParameterError, match=r"^steps 500 is more than"):
        ddpmcli.sample(model, n=2, steps=500)
    with pytest.raises(ParameterError, match=r"^t and t_random cannot"):
        ddpmcli.nll(model, "gmm", t=[0], t_random=5)
    with pytest.raises(ParameterError, match=r"^n must be"):
        ddpmcli.sample(model, n=0)


def test_schedule_takes_every_schedule_option(tmp_path: Path) -> None:
    cos = ddpmcli.schedule("cosine", timesteps=50)
    assert torch.equal(cos.alpha_bar, core.make_schedule("cosine", 50).alpha_bar)
    assert cos.alpha_bar.dtype == torch.float64
    shifted = ddpmcli.schedule(
        "linear", 50, beta_end=0.01, zero_terminal_snr=True, steps=10, spacing="trailing"
    )
    assert shifted.num_steps == 10 and float(shifted.alpha_bar[-1]) == 0.0
    by_hand = core.make_schedule("linear", 50, beta_end=0.01)
    by_hand = core.respaced(core.rescale_zero_terminal_snr(by_hand), 10, "trailing", 0)
    assert torch.equal(shifted.alpha_bar, by_hand.alpha_bar)
    betas = tmp_path / "b.txt"
    betas.write_text("0.1\n0.2\n0.3\n")
    custom = ddpmcli.schedule(betas_file=betas)
    assert custom.beta.tolist() == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ParameterError, match="timesteps cannot be combined with betas_file"):
        ddpmcli.schedule(betas_file=betas, timesteps=3)


def test_import_ddpmcli_does_not_import_torch() -> None:
    code = (
        "import sys, ddpmcli; assert 'torch' not in sys.modules; "
        "assert set(ddpmcli.__all__) == {'__version__', *ddpmcli._API}; "
        "ddpmcli.schedule; assert 'torch' in sys.modules; print(ddpmcli.load.__module__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ddpmcli.api"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ddpmcli.nothing  # noqa: B018


# ---------------------------------------------------------------------------------------------
# the README's training-loop example, run as written (fewer steps)

TRAINING_EXAMPLE = """\
import torch
from torch import nn

import ddpmcli

steps, every = 2000, 500
schedule = ddpmcli.schedule("cosine", timesteps=1000)


class Net(nn.Module):  # any denoiser: (x_t [B, 2], t [B]) -> predicted noise [B, 2]
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 2))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([x_t, t[:, None] / 1000], dim=1))


torch.manual_seed(0)
net = Net()
model = ddpmcli.wrap(net, schedule=schedule, prediction_type="epsilon", data_shape=(2,))
optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
data = torch.randn(8192, 2) * 0.3  # your training set
held_out = torch.randn(256, 2) * 0.3  # a fixed evaluation batch
alpha_bar = schedule.alpha_bar.float()
for step in range(1, steps + 1):
    x0 = data[torch.randint(len(data), (256,))]
    t = torch.randint(0, 1000, (256,))
    eps = torch.randn_like(x0)
    ab = alpha_bar[t, None]
    loss = (net(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t) - eps).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % every == 0:  # the per-t curve, with the same noise every time (seed=0)
        curve = ddpmcli.reconstruct(model, held_out, t=[0, 250, 500, 750, 999], seed=0)
        print(step, " ".join(f"{row['t']}:{row['eps_mse']:.3f}" for row in curve.rows))
"""


def test_training_loop_example_runs_and_logs_the_curve() -> None:
    source = TRAINING_EXAMPLE.replace("steps, every = 2000, 500", "steps, every = 60, 20")
    assert source != TRAINING_EXAMPLE
    out = io.StringIO()
    scope: dict[str, Any] = {}
    with contextlib.redirect_stdout(out):
        exec(compile(source, "README-example", "exec"), scope)
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["20", "40", "60"]
    curves = [[float(cell.split(":")[1]) for cell in line.split()[1:]] for line in lines]
    assert all(len(curve) == 5 for curve in curves)
    assert curves[-1] != curves[0]  # the wrapped module is the live one
    assert scope["net"].training  # the evaluation left training mode alone
    # the logged numbers are the API's: the last curve again, from the trained module
    again = ddpmcli.reconstruct(scope["model"], scope["held_out"], t=[0, 250, 500, 750, 999])
    assert [f"{row['t']}:{row['eps_mse']:.3f}" for row in again.rows] == lines[-1].split()[1:]


def test_the_commands_go_through_the_api() -> None:
    """No command calls the loader or a run loop itself: they call ddpmcli.api (so the CLI's
    numbers are the API's)."""
    import ast

    import ddpmcli.cli

    bypasses = {"load_checkpoint", "reconstruction_sweep", "variational_bound", "run_sample"}
    found = []
    for path in sorted(Path(ddpmcli.cli.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in bypasses:
                    found.append(f"{path.name}:{node.lineno} {name}")
    assert found == []


def test_reconstruct_compare_optimal_equals_cli(cli: Any, ckpt: str) -> None:
    args = ("reconstruct", ckpt, "--data", "gmm", "-n", "8", "--t", "10,90", "--compare-optimal")
    rows = _json_rows(cli, *args, "--batch-size", "8")
    model = ddpmcli.load(ckpt)
    api = ddpmcli.reconstruct(model, "gmm", n=8, t=[10, 90], compare_optimal=True, batch_size=8)
    assert rows == api.rows and rows[0]["optimal_mse"] < rows[0]["mse"]


def test_the_api_sits_between_the_cli_and_the_library() -> None:
    """cli -> api -> run -> checkpoints -> core: the API never imports the CLI, and nothing
    below it imports the API."""
    import ast

    package = Path(ddpmcli.__file__).parent

    def imports(path: Path) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        return names

    assert not any(name.startswith("ddpmcli.cli") for name in imports(package / "api.py"))
    below = [p for d in ("core", "run", "checkpoints") for p in (package / d).glob("*.py")]
    assert len(below) > 10
    assert [str(p) for p in below if "ddpmcli.api" in imports(p)] == []


@pytest.mark.diffusers
def test_class_conditional_folder_cli_equals_api(cli: Any, tmp_path: Path) -> None:
    """A tiny class-conditional diffusers UNet2DModel (4 classes and a null label): the CLI's
    reconstruct, guided sample and nll rows are the API's, given the same loader options."""
    import numpy as np

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=5,
    )  # fmt: skip
    unet.save_pretrained(tmp_path / "pipe" / "unet", safe_serialization=True)
    config_path = tmp_path / "pipe" / "unet" / "config.json"
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "null_class_label": 4})
    )
    diffusers.DDPMScheduler(num_train_timesteps=20).save_pretrained(tmp_path / "pipe" / "scheduler")
    images = np.random.default_rng(2).uniform(-1, 1, size=(4, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    folder, data = str(tmp_path / "pipe"), str(tmp_path / "x.npy")

    rec = _json_rows(
        cli, "reconstruct", folder, "--data", data, "--t", "0,19", "--class-label", "0-3",
        "--batch-size", "4",
    )  # fmt: skip
    model = ddpmcli.load(folder, class_label="0-3")
    assert rec == ddpmcli.reconstruct(model, data, t=[0, 19], n=64, batch_size=4).rows
    args = ("--steps", "3", "-n", "4", "--class-label", "random", "--guidance-scale", "4")
    guided = _json_rows(cli, "sample", folder, *args)
    model = ddpmcli.load(folder, class_label="random", guidance_scale=4.0)
    assert guided == as_json_rows(ddpmcli.sample(model, n=4, steps=3).rows)
    bound = _json_rows(
        cli, "nll", folder, "--data", data, "--class-label", "1", "--batch-size", "8"
    )
    model = ddpmcli.load(folder, class_label="1")
    assert bound == ddpmcli.nll(model, data, n=64, batch_size=8).rows
