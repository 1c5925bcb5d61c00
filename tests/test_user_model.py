"""`--model MODULE:FACTORY` (checkpoints.user) and the adapters in examples/.

The research-code checkpoints are built here from small stand-in networks with the real key
layouts (improved-diffusion's ``UNetModel``: ``time_embed.``, ``input_blocks.``, ``out.``, 2C
outputs with learn_sigma; denoising-diffusion-pytorch: a ``GaussianDiffusion`` with the ``Unet``
under ``model.`` and its schedule buffers, an ``ema_pytorch.EMA`` with ``ema_model.`` and
``online_model.``, saved as ``Trainer.save`` writes ``model-N.pt``). Each is checked against the
same network saved as a TorchScript program with the same metadata ("wrapped natively"): the CLI
must print the same numbers.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import Result

from ddpmcli.checkpoints import load_checkpoint, load_weights, save_torchscript
from ddpmcli.errors import CheckpointError, ParameterError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
T = 50  # training timesteps of the stand-ins
SIZE = 8  # image side of the stand-ins

# The stand-in networks, and factories built on the examples' adapt() functions (the examples'
# own make() builds the real projects' networks, which are not installed here).
STANDINS = """
import importlib.util
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

EXAMPLES = Path({examples!r})


def example(name):
    spec = importlib.util.spec_from_file_location("example_" + name, EXAMPLES / (name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TinyIddpm(nn.Module):
    # improved-diffusion UNetModel's key layout: time_embed.0, input_blocks.0.0, out.2
    def __init__(self, channels=3, learn_sigma=True):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(1, 8), nn.SiLU())
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1))])
        self.out = nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU(),
                                 nn.Conv2d(8, channels * (2 if learn_sigma else 1), 1))

    def forward(self, x, timesteps, y: Optional[Tensor] = None):
        emb = self.time_embed(timesteps.to(x.dtype)[:, None] / 1000.0)
        return self.out(self.input_blocks[0](x) + emb[:, :, None, None])


class TinyIddpmCond(TinyIddpm):
    # class_cond: UNetModel's label_emb = nn.Embedding(num_classes, C), added to the time
    # embedding; like UNetModel, it wants y if and only if it has classes
    def __init__(self, num_classes, channels=3, learn_sigma=True):
        super().__init__(channels, learn_sigma)
        self.label_emb = nn.Embedding(num_classes, 8)

    def forward(self, x, timesteps, y: Optional[Tensor] = None):
        if y is None:
            raise ValueError("must specify y if and only if the model is class-conditional")
        emb = self.time_embed(timesteps.to(x.dtype)[:, None] / 1000.0) + self.label_emb(y)
        return self.out(self.input_blocks[0](x) + emb[:, :, None, None])


def tiny_iddpm(settings):
    # what the example's network(settings) builds from the project, as a stand-in
    rows = settings.get("label_rows")
    if rows:
        return TinyIddpmCond(rows, learn_sigma=settings["learn_sigma"])
    return TinyIddpm(learn_sigma=settings["learn_sigma"])


class TinyUnet(nn.Module):
    # denoising-diffusion-pytorch Unet's names: channels, init_conv, time_mlp, final_conv
    def __init__(self, channels=3):
        super().__init__()
        self.channels = channels
        self.init_conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.time_mlp = nn.Linear(1, 8)
        self.final_conv = nn.Conv2d(8, channels, 1)

    def forward(self, x, time, x_self_cond: Optional[Tensor] = None):
        h = self.init_conv(x) + self.time_mlp(time.to(x.dtype)[:, None] / 100.0)[:, :, None, None]
        return self.final_conv(torch.tanh(h))


class GaussianDiffusion(nn.Module):
    # the buffers denoising-diffusion-pytorch registers (float32), the Unet under .model
    def __init__(self, model, betas):
        super().__init__()
        self.model = model
        ab = torch.cumprod(1 - betas, 0)
        for name, value in (("betas", betas), ("alphas_cumprod", ab),
                            ("sqrt_alphas_cumprod", ab.sqrt()), ("loss_weight", ab / (1 - ab))):
            self.register_buffer(name, value.to(torch.float32))


class EMA(nn.Module):
    # ema_pytorch.EMA's state dict: ema_model., online_model., initted, step
    def __init__(self, online, ema):
        super().__init__()
        self.online_model = online
        self.ema_model = ema
        self.register_buffer("initted", torch.tensor(True))
        self.register_buffer("step", torch.tensor(10))


def ddp(path, load_weights):
    return example("adapt_denoising_diffusion_pytorch").adapt(
        TinyUnet(), load_weights(path), objective="pred_v", image_size={size})


def ddp_online(path, load_weights):
    return example("adapt_denoising_diffusion_pytorch").adapt(
        TinyUnet(), load_weights(path), objective="pred_v", use_ema=False, image_size={size})


def iddpm(path, load_weights):
    # the example's make(), with the stand-in network
    ex = example("adapt_improved_diffusion")
    state = load_weights(path)
    settings = ex.with_classes(ex.settings_from_env(), state)
    return ex.adapt(tiny_iddpm(settings), state, settings)


def cc_plain(path, load_weights):
    # a factory of its own declaring 4 classes, and nothing about the variance
    net = TinyIddpmCond(4)
    net.load_state_dict(load_weights(path))
    return net, {{"schedule": {{"kind": "cosine", "timesteps": 200}}, "prediction_type": "eps",
                 "data_shape": [3, {size}, {size}], "num_classes": 4}}


def plain(path, load_weights):
    return TinyIddpm(learn_sigma=False)


def not_a_module(path, load_weights):
    return 42


def raises(path, load_weights):
    raise RuntimeError("no such layer")


def bad_metadata(path, load_weights):
    return TinyIddpm(), {{"schedule": "cosine"}}


def bad_classes(path, load_weights):
    return TinyIddpm(), {{"num_classes": "4"}}


def null_in_classes(path, load_weights):
    return TinyIddpm(), {{"num_classes": 4, "null_label": 2}}


def null_without_classes(path, load_weights):
    return TinyIddpm(), {{"null_label": 4}}
"""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The stand-ins module, its factory file, a data file, and the checkpoints."""
    root = tmp_path_factory.mktemp("user_model")
    (root / "standins.py").write_text(STANDINS.format(examples=str(EXAMPLES), size=SIZE))
    sys.path.insert(0, str(root))
    try:
        standins = importlib.import_module("standins")
    finally:
        sys.path.remove(str(root))
    gen = torch.Generator().manual_seed(0)
    data = torch.rand((6, 3, SIZE, SIZE), generator=gen) * 1.8 - 0.9
    np.save(root / "data.npy", data.numpy())
    out: dict[str, Any] = {"root": root, "m": standins, "data": str(root / "data.npy")}
    out.update(_ddp_checkpoint(standins, root))
    out.update(_iddpm_checkpoint(standins, root))
    out.update(_iddpm_cond_checkpoints(standins, root))
    return out


def _sigmoid_betas(timesteps: int, start: float = -3.0, end: float = 3.0) -> torch.Tensor:
    """denoising-diffusion-pytorch's default (sigmoid) schedule, as its docs define it
    (Jabri et al. 2022): alpha_bar from a sigmoid over [start, end], normalised, betas capped."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    v_start, v_end = torch.tensor(start).sigmoid(), torch.tensor(end).sigmoid()
    ab = (-(t * (end - start) + start).sigmoid() + v_end) / (v_end - v_start)
    ab = ab / ab[0]
    return (1 - ab[1:] / ab[:-1]).clamp(0, 0.999)


def _ddp_checkpoint(m: Any, root: Path) -> dict[str, Any]:
    torch.manual_seed(1)
    online = m.GaussianDiffusion(m.TinyUnet(), _sigmoid_betas(T))
    ema = m.GaussianDiffusion(m.TinyUnet(), _sigmoid_betas(T))  # other weights than the online
    trainer = {
        "step": 10,
        "model": online.state_dict(),
        "opt": torch.optim.Adam(online.parameters(), lr=1e-4).state_dict(),
        "ema": m.EMA(online, ema).state_dict(),
        "scaler": None,
        "version": "2.1.1",
    }
    path = root / "model-1.pt"
    torch.save(trainer, path)
    meta = {
        "schedule": {"betas": _sigmoid_betas(T).tolist()},  # as the adapter recovers them
        "prediction_type": "v",
        "data_shape": [3, SIZE, SIZE],
        "learned_variance": False,
    }
    ts = _script(ema.model, root / "ddp_ema_ts.pt", meta)
    return {"ddp": str(path), "ddp_ts": ts, "ddp_betas": online.betas, "ddp_online": online}


def _iddpm_checkpoint(m: Any, root: Path) -> dict[str, Any]:
    torch.manual_seed(2)
    net = m.TinyIddpm()
    path = root / "ema_0.9999_000010.pt"
    torch.save(net.state_dict(), path)
    ex = m.example("adapt_improved_diffusion")
    steps = 4 * T  # rescale_timesteps then feeds t / 4
    meta = {
        "schedule": ex.schedule_spec("cosine", steps),
        "prediction_type": "epsilon",
        "learned_variance": True,
        "data_shape": [3, SIZE, SIZE],
    }
    ts = _script(ex.RescaledTimesteps(net, steps), root / "iddpm_ts.pt", meta)
    return {"iddpm": str(path), "iddpm_ts": ts, "iddpm_net": net, "iddpm_steps": steps}


CLASSES = 4  # the class-conditional stand-ins' classes


def _iddpm_cond_checkpoints(m: Any, root: Path) -> dict[str, Any]:
    """A class-conditional improved/guided-diffusion state dict (no null label, as guided-
    diffusion's ImageNet models), and one trained with label dropout (a null row, CLASSES)."""
    torch.manual_seed(3)
    cond = m.TinyIddpmCond(CLASSES)
    torch.save(cond.state_dict(), root / "ema_cond.pt")
    cfg = m.TinyIddpmCond(CLASSES + 1)
    torch.save(cfg.state_dict(), root / "ema_cfg.pt")
    return {
        "iddpm_cc": str(root / "ema_cond.pt"), "iddpm_cc_net": cond,
        "iddpm_cfg": str(root / "ema_cfg.pt"), "iddpm_cfg_net": cfg,
    }  # fmt: skip


def _script(module: torch.nn.Module, path: Path, meta: dict[str, Any]) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_torchscript(module.eval(), path, meta)
    return str(path)


IDDPM_ENV = {"MODEL_FLAGS": "--image_size 8 --learn_sigma True", "DIFFUSION_FLAGS": ""}


@pytest.fixture
def iddpm_env(monkeypatch: pytest.MonkeyPatch, zoo: dict[str, Any]) -> None:
    monkeypatch.setenv("MODEL_FLAGS", IDDPM_ENV["MODEL_FLAGS"])
    monkeypatch.setenv(
        "DIFFUSION_FLAGS", f"--diffusion_steps {zoo['iddpm_steps']} --noise_schedule cosine"
    )


def _factory(zoo: dict[str, Any], name: str) -> str:
    return f"{zoo['root'] / 'standins.py'}:{name}"


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _same_rows(a: Result, b: Result) -> None:
    """Two runs print the same rows (numbers within float32 rounding of each other)."""
    rows_a, rows_b = _json(a), _json(b)
    assert len(rows_a) == len(rows_b) > 0
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra.keys() == rb.keys()
        for key, va in ra.items():
            if isinstance(va, float) and math.isfinite(va):
                assert va == pytest.approx(rb[key], rel=1e-6, abs=1e-9), key
            else:
                assert va == rb[key], key


# -- denoising-diffusion-pytorch model-N.pt ----------------------------------------------------


def test_ddp_info_reads_objective_and_stored_betas(
    cli: Callable[..., Result], zoo: dict[str, Any]
) -> None:
    row = _json(cli("info", "--model", _factory(zoo, "ddp"), zoo["ddp"], "-f", "json"))[0]
    assert row["format"] == "user"
    assert row["architecture"] == "TinyUnet"
    assert row["prediction_type"] == "v_prediction"
    assert row["learned_variance"] is False
    assert row["data_shape"] == f"3x{SIZE}x{SIZE}"
    assert row["timesteps"] == T
    ab = torch.cumprod(1 - _sigmoid_betas(T), 0)  # the float64 betas the stored ones round
    assert row["terminal_alpha_bar"] == pytest.approx(float(ab[-1]), rel=1e-12)


def test_ddp_schedule_is_the_recovered_float64_betas(zoo: dict[str, Any]) -> None:
    """The stored float32 betas are the rounding of the package's float64 sigmoid schedule,
    which the adapter recovers (issue 18: its buffers were computed from the float64 ones)."""
    loaded = load_checkpoint(zoo["ddp"], model=_factory(zoo, "ddp"))
    stored = zoo["ddp_betas"]
    assert stored.dtype == torch.float32
    assert torch.equal(loaded.schedule.beta, _sigmoid_betas(T))
    assert not torch.equal(stored.double(), _sigmoid_betas(T))  # the float32 rounding undone


def test_ddp_uses_ema_weights_not_online(zoo: dict[str, Any]) -> None:
    x = torch.zeros(2, 3, SIZE, SIZE)
    t = torch.tensor([0, T - 1])
    ema = load_checkpoint(zoo["ddp"], model=_factory(zoo, "ddp")).predict(x, t)[0]
    online = load_checkpoint(zoo["ddp"], model=_factory(zoo, "ddp_online")).predict(x, t)[0]
    with torch.no_grad():
        want_online = zoo["ddp_online"].model(x, t)
    assert torch.equal(online, want_online)
    assert not torch.allclose(ema, online)


def test_ddp_reconstruct_and_sample_equal_the_native_program(
    cli: Callable[..., Result], zoo: dict[str, Any]
) -> None:
    common = ("--data", zoo["data"], "--n", "4", "--t", "0,10,49", "--seed", "3", "-f", "json")
    via_model = cli("reconstruct", "--model", _factory(zoo, "ddp"), zoo["ddp"], *common)
    native = cli("reconstruct", "--trust-program", zoo["ddp_ts"], *common)
    _same_rows(via_model, native)
    sample = ("--n", "2", "--steps", "5", "--seed", "1", "-f", "json")
    _same_rows(
        cli("sample", "--model", _factory(zoo, "ddp"), zoo["ddp"], *sample),
        cli("sample", "--trust-program", zoo["ddp_ts"], *sample),
    )


def test_ddp_v_prediction_is_applied(cli: Callable[..., Result], zoo: dict[str, Any]) -> None:
    """Read as epsilon instead, the same network gives other errors: the objective matters."""
    common = ("--data", zoo["data"], "--n", "4", "--t", "10", "--seed", "3", "-f", "json")
    as_v = _json(cli("reconstruct", "--model", _factory(zoo, "ddp"), zoo["ddp"], *common))
    as_eps = _json(
        cli("reconstruct", "--model", _factory(zoo, "ddp"), zoo["ddp"], "--prediction-type",
            "eps", *common)
    )  # fmt: skip
    assert as_v[0]["mse"] != pytest.approx(as_eps[0]["mse"], rel=1e-3)


# -- improved-diffusion / guided-diffusion ema_0.9999_*.pt -------------------------------------


@pytest.mark.usefixtures("iddpm_env")
def test_iddpm_learned_sigma_and_schedule(cli: Callable[..., Result], zoo: dict[str, Any]) -> None:
    row = _json(cli("info", "--model", _factory(zoo, "iddpm"), zoo["iddpm"], "-f", "json"))[0]
    assert row["learned_variance"] is True
    assert row["prediction_type"] == "epsilon"
    assert row["kind"] == "cosine"
    assert row["timesteps"] == zoo["iddpm_steps"]
    assert row["architecture"] == "RescaledTimesteps"


@pytest.mark.usefixtures("iddpm_env")
def test_iddpm_rescales_timesteps(zoo: dict[str, Any]) -> None:
    """improved-diffusion feeds the network t * 1000 / T (rescale_timesteps, its default)."""
    loaded = load_checkpoint(zoo["iddpm"], model=_factory(zoo, "iddpm"))
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 150])
    prediction, v = loaded.predict(x, t)
    with torch.no_grad():
        out = zoo["iddpm_net"](x, t.float() * 1000.0 / zoo["iddpm_steps"])
    assert v is not None
    assert torch.equal(prediction, out[:, :3])
    assert torch.equal(v, out[:, 3:])


@pytest.mark.usefixtures("iddpm_env")
def test_iddpm_numbers_equal_the_native_program(
    cli: Callable[..., Result], zoo: dict[str, Any]
) -> None:
    common = ("--data", zoo["data"], "--n", "3", "--t", "0,100,199", "--seed", "5", "-f", "json")
    _same_rows(
        cli("reconstruct", "--model", _factory(zoo, "iddpm"), zoo["iddpm"], *common),
        cli("reconstruct", "--trust-program", zoo["iddpm_ts"], *common),
    )
    sample = ("--n", "2", "--steps", "4", "--variance", "learned_range", "-f", "json")
    _same_rows(
        cli("sample", "--model", _factory(zoo, "iddpm"), zoo["iddpm"], *sample),
        cli("sample", "--trust-program", zoo["iddpm_ts"], *sample),
    )
    # the adapter declares learned_range (--learn_sigma True); a program's default is fixed_small
    nll = ("--data", zoo["data"], "--n", "2", "--t-random", "4", "--variance", "learned_range")
    nll += ("-f", "json")
    _same_rows(
        cli("nll", "--model", _factory(zoo, "iddpm"), zoo["iddpm"], *nll),
        cli("nll", "--trust-program", zoo["iddpm_ts"], *nll),
    )


def test_iddpm_linear_schedule_scales_with_t(zoo: dict[str, Any]) -> None:
    ex = zoo["m"].example("adapt_improved_diffusion")
    loaded = load_checkpoint(
        zoo["iddpm"], model=_factory(zoo, "plain"), **ex_meta(ex.schedule_spec("linear", 4000))
    )
    # improved-diffusion: betas = linspace(1e-4 * 1000/T, 0.02 * 1000/T, T)
    assert float(loaded.schedule.beta[0]) == pytest.approx(1e-4 / 4, rel=1e-12)
    assert float(loaded.schedule.beta[-1]) == pytest.approx(0.02 / 4, rel=1e-12)


def ex_meta(spec: dict[str, Any]) -> dict[str, Any]:
    from ddpmcli import core

    return {
        "schedule": core.schedule_from_spec(spec),
        "prediction_type": "eps",
        "data_shape": (3, SIZE, SIZE),
    }


def test_iddpm_flags_parse_like_argparse() -> None:
    ex = importlib.import_module("standins").example("adapt_improved_diffusion")
    model_flags = "--image_size 64 --learn_sigma True --dropout 0.1 --attention_resolutions 16,8"
    settings = ex.settings_from_env(
        {
            "MODEL_FLAGS": model_flags,
            "DIFFUSION_FLAGS": "--diffusion_steps 4000 --noise_schedule cosine",
        }
    )
    assert settings["image_size"] == 64
    assert settings["learn_sigma"] is True
    assert settings["diffusion_steps"] == 4000
    assert settings["noise_schedule"] == "cosine"
    assert settings["rescale_timesteps"] is True
    assert (settings["dropout"], settings["attention_resolutions"]) == (0.1, "16,8")


# -- the examples' own factories, errors and safety --------------------------------------------


@pytest.mark.parametrize(
    ("example", "package"),
    [
        ("adapt_improved_diffusion", "improved_diffusion"),
        ("adapt_denoising_diffusion_pytorch", "denoising_diffusion_pytorch"),
    ],
)
def test_example_make_without_the_package_is_one_line(
    cli: Callable[..., Result], zoo: dict[str, Any], example: str, package: str
) -> None:
    if importlib.util.find_spec(package) is not None:
        pytest.skip("the real package is installed")
    ckpt = zoo["iddpm"] if example == "adapt_improved_diffusion" else zoo["ddp"]
    result = cli("info", "--model", f"{EXAMPLES / example}.py:make", ckpt)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: --model {EXAMPLES / example}.py:make: the factory failed")
    assert "No module named" in lines[0]


def test_pickle_payload_is_refused_through_model(
    cli: Callable[..., Result], zoo: dict[str, Any], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            import os

            return (os.mkdir, (str(marker),))

    bad = tmp_path / "model-9.pt"
    torch.save({"model": {}, "ema": Payload()}, bad)
    for factory in (
        f"{EXAMPLES / 'adapt_denoising_diffusion_pytorch'}.py:make",
        _factory(zoo, "ddp"),
    ):
        result = cli("info", "--model", factory, str(bad))
        assert result.exit_code == 1
        assert result.stderr.startswith(f"Error: {bad}: refused")
        assert "mkdir" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_load_weights_reads_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {"w": torch.arange(6, dtype=torch.float16).reshape(2, 3)}
    save_file(state, str(tmp_path / "w.safetensors"))
    got = load_weights(tmp_path / "w.safetensors")
    assert got.keys() == {"w"}
    assert got["w"].dtype == torch.float16
    assert torch.equal(got["w"], state["w"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{oops}")
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_weights(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{root}/standins.py:nope", "standins.py has no attribute 'nope'"),
        ("{root}/standins.py:EXAMPLES", "EXAMPLES is a PosixPath, not a callable factory"),
        ("{root}/missing.py:make", "no such file"),
        ("no_such_module_xyz:make", "cannot import no_such_module_xyz (No module named"),
        ("{root}/standins.py:not_a_module", "the factory returned a int, not an nn.Module"),
        ("{root}/standins.py:raises", "the factory failed on"),
        ("{root}/standins.py:bad_metadata", "schedule must be a schedule spec dict"),
        ("{root}/standins.py:bad_classes", "metadata num_classes must be an integer in 1..1048576"),
        ("{root}/standins.py:null_in_classes", "null_label must be an integer outside the classes"),
        ("{root}/standins.py:null_without_classes", "gives null_label but no num_classes"),
    ],
)
def test_factory_errors_are_one_line(
    cli: Callable[..., Result], zoo: dict[str, Any], spec: str, message: str
) -> None:
    result = cli("info", "--model", spec.format(root=zoo["root"]), zoo["iddpm"])
    assert result.exit_code == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert message in lines[0]
    assert result.stdout == ""


def test_factory_spec_without_colon_is_a_usage_error(
    cli: Callable[..., Result], zoo: dict[str, Any]
) -> None:
    result = cli("info", "--model", "standins", zoo["iddpm"])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: --model 'standins': want MODULE:FACTORY")
    with pytest.raises(ParameterError, match="model 'x': want MODULE:FACTORY"):
        load_checkpoint(zoo["iddpm"], model="x")


def test_missing_metadata_names_the_flags(cli: Callable[..., Result], zoo: dict[str, Any]) -> None:
    result = cli("info", "--model", _factory(zoo, "plain"), zoo["iddpm"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: {zoo['iddpm']}: the factory {_factory(zoo, 'plain')} gives no schedule, "
        "prediction_type, data_shape; return it in its metadata dict, or pass --kind (and "
        "--timesteps), --prediction-type, --data-shape"
    )
    partial = cli("info", "--model", _factory(zoo, "plain"), zoo["iddpm"], "--kind", "cosine")
    assert partial.stderr.strip().endswith("or pass --prediction-type, --data-shape")
    flags = ("--kind", "cosine", "-T", "20", "--prediction-type", "x0", "--data-shape", "3,8,8")
    ok = cli("info", "--model", _factory(zoo, "plain"), zoo["iddpm"], *flags, "-f", "json")
    row = _json(ok)[0]
    assert (row["kind"], row["timesteps"], row["prediction_type"]) == ("cosine", 20, "sample")
    assert row["learned_variance"] is False


def test_dotted_module_from_the_current_folder(
    cli: Callable[..., Result], zoo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(zoo["root"])
    monkeypatch.setenv("MODEL_FLAGS", IDDPM_ENV["MODEL_FLAGS"])
    row = _json(cli("info", "--model", "standins:iddpm", zoo["iddpm"], "-f", "json"))[0]
    assert row["learned_variance"] is True
    assert row["timesteps"] == 1000  # DIFFUSION_FLAGS unset: improved-diffusion's default T


def test_readme_factory(cli: Callable[..., Result], tmp_path: Path) -> None:
    """The factory examples/README.md shows, as written there, through the CLI."""
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    source = readme.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "mynet.py").write_text(source)
    conv = torch.nn.Conv2d(3, 3, 1)
    torch.save({f"conv.{k}": v for k, v in conv.state_dict().items()}, tmp_path / "net.pt")
    row = _json(
        cli("info", "--model", f"{tmp_path / 'mynet.py'}:make", str(tmp_path / "net.pt"),
            "-f", "json")
    )[0]  # fmt: skip
    assert (row["architecture"], row["parameters"], row["data_shape"]) == ("Net", 12, "3x32x32")


def test_python_api_load_takes_the_factory(zoo: dict[str, Any]) -> None:
    """``ddpmcli.load(path, model=...)``: the same loader as the CLI's ``--model``."""
    import ddpmcli

    loaded = ddpmcli.load(zoo["ddp"], model=_factory(zoo, "ddp"))
    assert (loaded.prediction_type, loaded.info["format"]) == ("v_prediction", "user")
    assert torch.equal(loaded.schedule.beta, _sigmoid_betas(T))


# -- class-conditional improved/guided-diffusion (label_emb), through checkpoints.conditioning ---


@pytest.fixture
def cfg_env(monkeypatch: pytest.MonkeyPatch, iddpm_env: None) -> None:
    """The label-dropout stand-in: its table's last row is the null label."""
    monkeypatch.setenv("DDPM_NULL_LABEL", str(CLASSES))


class _CountCalls:
    """Counts a module's forward calls and the rows each carries."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.rows: list[int] = []
        module.register_forward_pre_hook(lambda _m, args: self.rows.append(int(args[0].shape[0])))


def _rescaled(zoo: dict[str, Any], t: torch.Tensor) -> torch.Tensor:
    return t.float() * 1000.0 / zoo["iddpm_steps"]  # rescale_timesteps (improved-diffusion's)


@pytest.mark.usefixtures("iddpm_env")
def test_iddpm_class_conditional_is_read_from_label_emb(
    cli: Callable[..., Result], zoo: dict[str, Any]
) -> None:
    """MODEL_FLAGS says nothing of class_cond: the state dict's label_emb.weight [4, C] does."""
    spec = _factory(zoo, "iddpm")
    row = _json(cli("info", "--model", spec, zoo["iddpm_cc"], "-f", "json"))[0]
    assert row["num_classes"] == CLASSES
    assert "null_label" not in row and "class_label" not in row  # none; info needs no label
    assert (row["architecture"], row["learned_variance"]) == ("RescaledTimesteps", True)
    row = _json(cli("info", "--model", spec, zoo["iddpm_cc"], "--class-label", "all", "-f", "json"))
    assert row[0]["class_label"] == f"0-{CLASSES - 1}"
    plain = _json(cli("info", "--model", spec, zoo["iddpm"], "-f", "json"))[0]
    assert "num_classes" not in plain  # the unconditional one stays unconditional


@pytest.mark.usefixtures("iddpm_env")
def test_iddpm_labels_reach_the_network_and_all_cycles(zoo: dict[str, Any]) -> None:
    import ddpmcli

    model = ddpmcli.load(zoo["iddpm_cc"], model=_factory(zoo, "iddpm"), class_label="all")
    x = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    t = torch.full((6,), 120)
    index = torch.arange(6) + 3  # global sample indices 3..8: labels 3, 0, 1, 2, 3, 0
    eps, v = model.predict(x, t, sample_index=index)
    with torch.no_grad():
        want = zoo["iddpm_cc_net"](x, _rescaled(zoo, t), torch.tensor([3, 0, 1, 2, 3, 0]))
    assert v is not None
    assert torch.equal(eps, want[:, :3]) and torch.equal(v, want[:, 3:])
    fixed = [
        ddpmcli.load(zoo["iddpm_cc"], model=_factory(zoo, "iddpm"), class_label=k).predict(x, t)[0]
        for k in ("0", "1")
    ]
    assert float((fixed[0] - fixed[1]).detach().abs().min()) > 0  # another label: every value moves


@pytest.mark.usefixtures("iddpm_env")
def test_iddpm_class_labels_through_the_cli(
    cli: Callable[..., Result], zoo: dict[str, Any]
) -> None:
    base = ("reconstruct", "--model", _factory(zoo, "iddpm"), zoo["iddpm_cc"], "--data",
            zoo["data"], "--n", "6", "--t", "0,100,199", "--seed", "2", "-f", "json")  # fmt: skip
    by_label = [_json(cli(*base, "--class-label", k)) for k in ("0", "1")]
    assert [r["t"] for r in by_label[0]] == [0, 100, 199]
    assert all(a["mse"] != b["mse"] for a, b in zip(*by_label, strict=True))
    every = cli(*base, "--class-label", "all")
    _same_rows(every, cli(*base, "--class-label", f"0-{CLASSES - 1}"))
    _same_rows(every, cli(*base, "--class-label", "all", "--batch-size", "4"))  # by sample index
    sample = ("sample", "--model", _factory(zoo, "iddpm"), zoo["iddpm_cc"], "--n", "2", "--steps",
              "3", "--variance", "learned_range", "-f", "json")  # fmt: skip
    drawn = [_json(cli(*sample, "--class-label", k)) for k in ("1", "2")]
    assert [r["x0_std"] for r in drawn[0]] != [r["x0_std"] for r in drawn[1]]
    nll = ("nll", "--model", _factory(zoo, "iddpm"), zoo["iddpm_cc"], "--data", zoo["data"],
           "--n", "2", "--t-random", "3", "-f", "json")  # fmt: skip
    totals = [_json(cli(*nll, "--class-label", k))[-1] for k in ("0", "3")]
    assert totals[0]["term"] == "total_estimate"  # --t-random: an estimate of the bound
    assert totals[0]["bits_per_dim"] != totals[1]["bits_per_dim"]


@pytest.mark.usefixtures("iddpm_env")
@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (["--class-label", "1", "--guidance-scale", "2"], 1,
         "Error: --guidance-scale needs a null (unconditional) label, and this model has none"),
        (["--class-label", "null"], 1,
         "Error: --class-label null: this model has no null (unconditional) label"),
        ([], 1, f"Error: a class-conditional model with {CLASSES} classes and no null label: pass "
         "--class-label (K, A-B, all, random or null)"),
        (["--class-label", "4"], 2, "Error: --class-label 4 is out of range: the model has 4"),
    ],
)  # fmt: skip
def test_iddpm_without_null_label_refuses_guidance(
    cli: Callable[..., Result], zoo: dict[str, Any], args: list[str], code: int, line: str
) -> None:
    """guided-diffusion's ImageNet models guide with a classifier: no null label to guide with."""
    result = cli("sample", "--model", _factory(zoo, "iddpm"), zoo["iddpm_cc"], "--n", "2",
                 "--steps", "2", "-q", *args)  # fmt: skip
    assert result.exit_code == code
    assert result.stderr.startswith(line) and result.stderr.count("\n") == 1
    assert result.stdout == ""


@pytest.mark.usefixtures("iddpm_env")
def test_unconditional_user_model_refuses_class_labels(
    cli: Callable[..., Result], zoo: dict[str, Any]
) -> None:
    result = cli("sample", "--model", _factory(zoo, "iddpm"), zoo["iddpm"], "--n", "2", "--steps",
                 "2", "-q", "--class-label", "1")  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {zoo['iddpm']}: --class-label given, but the model is unconditional\n"
    )


@pytest.mark.usefixtures("cfg_env")
def test_iddpm_null_label_guides_in_one_batched_call(
    cli: Callable[..., Result], zoo: dict[str, Any]
) -> None:
    import ddpmcli

    spec = _factory(zoo, "iddpm")
    row = _json(cli("info", "--model", spec, zoo["iddpm_cfg"], "-f", "json"))[0]
    assert (row["num_classes"], row["null_label"], row["class_label"]) == (CLASSES, CLASSES, "null")
    scale = 3.0
    model = ddpmcli.load(zoo["iddpm_cfg"], model=spec, class_label="random", guidance_scale=scale)
    counter = _CountCalls(model.denoiser)
    steps, n = 3, 5
    ddpmcli.sample(model, n=n, steps=steps, sampler="ddim", seed=0, batch_size=n)
    assert counter.rows == [2 * n] * steps  # cond and null rows in ONE call per step
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([7, 150])
    labels = model.conditioning.labels(torch.arange(2))  # type: ignore[union-attr]
    eps, v = model.predict(x, t)
    with torch.no_grad():
        cond = zoo["iddpm_cfg_net"](x, _rescaled(zoo, t), labels)
        null = zoo["iddpm_cfg_net"](x, _rescaled(zoo, t), torch.full((2,), CLASSES))
    torch.testing.assert_close(eps, null[:, :3] + scale * (cond[:, :3] - null[:, :3]))
    assert v is not None and torch.equal(v, cond[:, 3:])  # the variance is the conditional's
    one = ddpmcli.load(zoo["iddpm_cfg"], model=spec, class_label="random", guidance_scale=1.0)
    counter = _CountCalls(one.denoiser)
    ddpmcli.sample(one, n=n, steps=steps, sampler="ddim", seed=0, batch_size=n)
    assert counter.rows == [n] * steps  # scale 1: no second pass


@pytest.mark.usefixtures("cfg_env")
def test_iddpm_null_label_guidance_through_the_cli(
    cli: Callable[..., Result], zoo: dict[str, Any]
) -> None:
    spec = _factory(zoo, "iddpm")
    sample = ("sample", "--model", spec, zoo["iddpm_cfg"], "--n", "3", "--steps", "3",
              "--class-label", "random", "--variance", "learned_range", "-f", "json")  # fmt: skip
    plain, one = _json(cli(*sample)), _json(cli(*sample, "--guidance-scale", "1"))
    guided = _json(cli(*sample, "--guidance-scale", "4"))
    assert [r["x0_std"] for r in one] == [r["x0_std"] for r in plain]
    assert [r["x0_std"] for r in guided] != [r["x0_std"] for r in plain]
    rec = ("reconstruct", "--model", spec, zoo["iddpm_cfg"], "--data", zoo["data"], "--n", "3",
           "--t", "50,150", "-f", "json")  # fmt: skip
    measured = [_json(cli(*rec, "--class-label", "1", "--guidance-scale", s)) for s in ("1", "4")]
    assert all(a["mse"] != b["mse"] for a, b in zip(*measured, strict=True))  # the guided one
    unconditional = _json(cli(*rec))  # no label: the null label
    assert all(a["mse"] != b["mse"] for a, b in zip(unconditional, measured[0], strict=True))


def test_iddpm_null_label_must_be_the_last_row(zoo: dict[str, Any]) -> None:
    ex = zoo["m"].example("adapt_improved_diffusion")
    state = load_weights(zoo["iddpm_cfg"])
    assert ex.label_classes(state) == (CLASSES + 1, None)
    assert ex.label_classes(state, CLASSES) == (CLASSES, CLASSES)
    with pytest.raises(ValueError, match="must be the label table's last row, 4, got 2"):
        ex.label_classes(state, 2)
    with pytest.raises(ValueError, match="not class-conditional"):
        ex.label_classes(load_weights(zoo["iddpm"]), 4)
    settings = dict(ex.DEFAULTS, class_cond=True)
    with pytest.raises(ValueError, match="class_cond is True, but the checkpoint has no label_emb"):
        ex.adapt(zoo["m"].TinyIddpm(), load_weights(zoo["iddpm"]), settings)


def test_factory_classes_and_an_inferred_variance(
    cli: Callable[..., Result], zoo: dict[str, Any]
) -> None:
    """``info`` tells a learned variance apart with one forward pass, with a label for a model
    that declares classes (the stand-in refuses a call without one)."""
    row = _json(cli("info", "--model", _factory(zoo, "cc_plain"), zoo["iddpm_cc"], "-f", "json"))
    assert (row[0]["num_classes"], row[0]["learned_variance"]) == (CLASSES, True)


FAKE_SCRIPT_UTIL = """
from standins import TinyIddpm, TinyIddpmCond

NUM_CLASSES = 1000  # as in improved-diffusion's script_util; the adapter sets it from label_emb


def model_and_diffusion_defaults():
    return {"image_size": 64, "class_cond": False, "learn_sigma": False}


def create_model_and_diffusion(image_size, class_cond, learn_sigma):
    if class_cond:
        return TinyIddpmCond(NUM_CLASSES, learn_sigma=learn_sigma), None
    return TinyIddpm(learn_sigma=learn_sigma), None
"""


@pytest.mark.usefixtures("cfg_env")
def test_example_make_builds_the_class_conditional_network(
    cli: Callable[..., Result], zoo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example's own make(), on a stand-in project package: class_cond and NUM_CLASSES
    come from label_emb.weight (5 rows: 4 classes and the null row), not from the flags."""
    package = zoo["root"] / "fake_iddpm_hb"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "script_util.py").write_text(FAKE_SCRIPT_UTIL)
    monkeypatch.syspath_prepend(str(zoo["root"]))
    monkeypatch.setenv("DDPM_UNET_PACKAGE", "fake_iddpm_hb")
    spec = f"{EXAMPLES / 'adapt_improved_diffusion'}.py:make"
    row = _json(cli("info", "--model", spec, zoo["iddpm_cfg"], "-f", "json"))[0]
    assert (row["num_classes"], row["null_label"]) == (CLASSES, CLASSES)
    model = load_checkpoint(zoo["iddpm_cfg"], model=spec, class_label="2")
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0, 99])
    with torch.no_grad():
        want = zoo["iddpm_cfg_net"](x, _rescaled(zoo, t), torch.tensor([2, 2]))
    assert torch.equal(model.predict(x, t)[0], want[:, :3])
