"""The examples/ adapters against the real packages they adapt: denoising-diffusion-pytorch
2.3.4's own ``GaussianDiffusion``, ``Trainer`` checkpoints and ``model_predictions``, and
openai/improved-diffusion's own ``script_util`` flags, ``UNetModel`` and diffusion.

denoising-diffusion-pytorch runs in CI: the README's test command installs it with ``--no-deps``
and the ``examples-check`` extra brings what its modules import (einops, ema-pytorch, accelerate;
scipy, tqdm and pillow come with the other extras). Its torchvision is left out: the torchvision
that pairs with the pinned CPU torch 2.13.0 (0.28.0) is on PyPI only as a CUDA build, which cannot
import beside a CPU torch ("operator torchvision::nms does not exist"), and a newer one replaces
torch. Where torchvision is not installed, the package is imported over a stand-in for the two
transforms modules it imports at its top (see ``_torchvision_stand_in``); pytorch-fid is imported
only for FID, which these tests turn off.

improved-diffusion is not on PyPI: its tests skip unless ``improved_diffusion`` is importable
(``pip install -e`` a clone of github.com/openai/improved-diffusion, or put it on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import ddpmcli
from ddpmcli import core

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.usefixtures("one_thread")


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# lucidrains/denoising-diffusion-pytorch


def _torchvision_stand_in() -> dict[str, ModuleType]:
    """torchvision as far as denoising_diffusion_pytorch uses it here: its main module imports
    ``transforms`` and ``utils`` (``save_image``, for samples, which these tests never take); its
    image ``Dataset`` composes ``Lambda``, ``Resize``, ``CenterCrop`` and ``ToTensor`` (and
    ``RandomHorizontalFlip`` with ``augment_horizontal_flip``, off here). The images here are
    already the model's size, so Resize and CenterCrop only check that. Checked once beside
    torchvision 0.28.0: the package's Dataset gave bit-identical tensors for RGB, L and mixed
    folders of 8x8 PNGs through either, image size 8 or (8, 8)."""
    import numpy as np

    def compose(steps: list[Any]) -> Any:
        def run(image: Any) -> Any:
            for step in steps:
                image = step(image)
            return image

        return run

    def same_size(size: int | tuple[int, int]) -> Any:
        height, width = (size, size) if isinstance(size, int) else size

        def check(image: Any) -> Any:  # PIL's size is (width, height)
            if image.size != (width, height):
                raise ValueError(f"the stand-in takes {width}x{height} images, not {image.size}")
            return image

        return check

    def to_tensor() -> Any:
        def convert(image: Any) -> torch.Tensor:
            array = np.array(image, dtype=np.uint8)
            array = array[:, :, None] if array.ndim == 2 else array
            return torch.from_numpy(array).permute(2, 0, 1).float().div(255)

        return convert

    transforms = ModuleType("torchvision.transforms")
    transforms.__dict__.update(
        Compose=compose, Lambda=lambda fn: fn, Resize=same_size, CenterCrop=same_size,
        ToTensor=to_tensor,
    )  # fmt: skip
    utils = ModuleType("torchvision.utils")
    package = ModuleType("torchvision")
    package.__dict__.update(transforms=transforms, utils=utils)
    return {
        "torchvision": package,
        "torchvision.transforms": transforms,
        "torchvision.utils": utils,
    }


@pytest.fixture(scope="module")
def ddp() -> Any:
    if importlib.util.find_spec("denoising_diffusion_pytorch") is None:
        pytest.skip(
            "denoising-diffusion-pytorch is not installed (pip install -e '.[examples-check]' "
            "and pip install --no-deps denoising-diffusion-pytorch==2.3.4)"
        )
    if importlib.util.find_spec("torchvision") is not None:
        try:
            return importlib.import_module("denoising_diffusion_pytorch")
        except RuntimeError as exc:  # a CUDA torchvision beside a CPU torch
            pytest.skip(f"torchvision does not import beside this torch: {exc}")
    with pytest.MonkeyPatch.context() as patch:  # the stand-in only while the package imports
        for name, module in _torchvision_stand_in().items():
            patch.setitem(sys.modules, name, module)
        return importlib.import_module("denoising_diffusion_pytorch")


def _diffusion(ddp: Any, schedule: str, timesteps: int = 1000) -> Any:
    torch.manual_seed(0)
    unet = ddp.Unet(dim=8, dim_mults=(1, 2), flash_attn=False)
    return ddp.GaussianDiffusion(unet, image_size=8, timesteps=timesteps, beta_schedule=schedule)


@pytest.mark.parametrize("schedule", ["sigmoid", "cosine", "linear"])
@pytest.mark.parametrize("timesteps", [1000, 37])
def test_recovered_schedule_is_the_trainers(ddp, schedule, timesteps) -> None:
    """The adapter's float64 betas give the package's own float32 buffers to their rounding
    (half an ulp, 2^-24 relative); the stored float32 betas did not (1.3e-5 at T-1)."""
    adapter = _example("adapt_denoising_diffusion_pytorch")
    gd = _diffusion(ddp, schedule, timesteps)
    betas, name = adapter.recover_betas(gd.betas)
    assert name == schedule and betas.dtype == torch.float64
    module = sys.modules[type(gd).__module__]  # the package's own schedule functions
    assert torch.equal(betas, getattr(module, f"{schedule}_beta_schedule")(timesteps))
    ours = core.schedule_from_betas(betas)
    pairs = {
        "alphas_cumprod": ours.alpha_bar,
        "sqrt_alphas_cumprod": ours.sqrt_alpha_bar,
        "sqrt_one_minus_alphas_cumprod": ours.sqrt_one_minus_alpha_bar,
        "sqrt_recip_alphas_cumprod": ours.sqrt_recip_alpha_bar,
        "sqrt_recipm1_alphas_cumprod": ours.sqrt_recipm1_alpha_bar,
        "posterior_variance": ours.posterior_variance,
        "posterior_mean_coef1": ours.posterior_mean_coef_x0,
        "posterior_mean_coef2": ours.posterior_mean_coef_xt,
    }
    for buffer, mine in pairs.items():
        theirs = getattr(gd, buffer).double()
        assert torch.equal(mine.float().double(), theirs) or bool(
            ((mine - theirs).abs() <= 2**-24 * theirs.abs() + 1e-300).all()
        ), buffer
    stored = core.schedule_from_betas(gd.betas.double())  # what the adapter used to do
    gap = float((stored.alpha_bar[-1] - gd.alphas_cumprod[-1].double()).abs())
    if schedule != "linear":  # their last beta is the 0.999 clip, rounded to 0.99900001287
        assert gap > 100 * float((ours.alpha_bar[-1] - gd.alphas_cumprod[-1].double()).abs())


def test_custom_betas_are_taken_as_stored(ddp) -> None:
    adapter = _example("adapt_denoising_diffusion_pytorch")
    stored = torch.linspace(1e-4, 0.03, 50, dtype=torch.float32)
    betas, name = adapter.recover_betas(stored)
    assert name == "custom" and torch.equal(betas, stored.double())


@pytest.fixture(scope="module")
def trainer_checkpoint(ddp: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """``Trainer.save`` after one step on 100 8x8 images (its minimum), sigmoid schedule,
    T = 100, pred_v (the package's defaults), without the horizontal flip augmentation."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("ddp")
    images = root / "images"
    images.mkdir()
    gen = np.random.default_rng(0)
    for i in range(100):
        Image.fromarray((gen.random((8, 8, 3)) * 255).astype("uint8")).save(images / f"{i}.png")
    gd = _diffusion(ddp, "sigmoid", 100)
    with pytest.MonkeyPatch.context() as patch:  # its DataLoader's num_workers=cpu_count(): load
        patch.setattr(sys.modules[ddp.Trainer.__module__], "cpu_count", lambda: 0)  # in-process
        trainer = ddp.Trainer(
            gd, str(images), train_batch_size=16, train_num_steps=1, results_folder=str(root),
            calculate_fid=False, amp=False, save_and_sample_every=10**9,
            augment_horizontal_flip=False,
        )  # fmt: skip
    trainer.train()
    trainer.save(1)
    return root / "model-1.pt", trainer


def test_trainer_checkpoint_predictions_equal_the_packages(
    trainer_checkpoint, monkeypatch, cli
) -> None:
    path, trainer = trainer_checkpoint
    monkeypatch.setenv(
        "DDPM_UNET", json.dumps({"dim": 8, "dim_mults": [1, 2], "flash_attn": False})
    )
    monkeypatch.setenv("DDPM_IMAGE_SIZE", "8")
    spec = f"{EXAMPLES / 'adapt_denoising_diffusion_pytorch.py'}:make"
    model = ddpmcli.load(path, model=spec)
    gd = trainer.ema.ema_model  # the EMA copy, which the adapter reads by default
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.tensor([0, 31, 64, 99])
    with torch.no_grad():
        theirs = gd.model_predictions(x, t, clip_x_start=False)
    out, _ = model.predict(x, t)
    x0 = model.schedule.predict_x0(out.double(), x.double(), t, model.prediction_type)
    torch.testing.assert_close(x0.float(), theirs.pred_x_start, rtol=1e-5, atol=1e-5)
    eps = model.schedule.predict_eps(out.double(), x.double(), t, model.prediction_type)
    torch.testing.assert_close(eps.float(), theirs.pred_noise, rtol=1e-4, atol=1e-4)
    info = cli("info", str(path), "--model", spec, "--format", "json")
    assert info.exit_code == 0, info.stderr
    row = json.loads(info.stdout)[0]
    assert row["timesteps"] == 100 and row["prediction_type"] == "v_prediction"
    assert row["terminal_alpha_bar"] == pytest.approx(float(gd.alphas_cumprod[-1]), rel=2**-23)


# ---------------------------------------------------------------------------------------------
# openai/improved-diffusion

MODEL_FLAGS = (
    "--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16 "
    "--learn_sigma False --dropout 0.1 --use_scale_shift_norm yes"
)
DIFFUSION_FLAGS = "--diffusion_steps 50 --noise_schedule cosine"


IMPROVED_DIFFUSION_ABSENT = (
    "improved-diffusion is not installed, and no package registry has it: openai publishes it "
    "only as a GitHub repository (pip install -e a clone, or put it on PYTHONPATH); PyPI's "
    "improved-diffusion-for-SMLM is a fork with other defaults and a changed GaussianDiffusion"
)


@pytest.fixture(scope="module")
def script_util() -> Any:
    if importlib.util.find_spec("improved_diffusion") is None:
        pytest.skip(IMPROVED_DIFFUSION_ABSENT)
    return importlib.import_module("improved_diffusion.script_util")


def test_flags_are_typed_as_the_package_types_them(script_util) -> None:
    """The adapter reads MODEL_FLAGS as improved-diffusion's own argparse does
    (``add_dict_to_argparser``: each flag by its default's type): attention_resolutions "16"
    stays the string the UNet splits (typed by its look it became 4, and failed)."""
    adapter = _example("adapt_improved_diffusion")
    words = shlex.split(MODEL_FLAGS + " " + DIFFUSION_FLAGS)
    parser = argparse.ArgumentParser()
    script_util.add_dict_to_argparser(parser, script_util.model_and_diffusion_defaults())
    theirs = vars(parser.parse_args(words))
    ours = adapter.parse_flags(MODEL_FLAGS + " " + DIFFUSION_FLAGS)
    assert ours == {k: theirs[k] for k in ours}
    assert ours["attention_resolutions"] == "16" and ours["use_scale_shift_norm"] is True
    with pytest.raises(ValueError, match="reads it as int"):
        adapter.parse_flags("--num_channels 16.5")


def test_package_unet_through_make(script_util, tmp_path, monkeypatch, cli) -> None:
    """`ddpm info --model examples/adapt_improved_diffusion.py:make` on the package's own
    UNetModel (the AttributeError of the issue), and ddpm's x0 prediction equal to the
    package's ``p_mean_variance`` pred_xstart (rescale_timesteps on, as improved-diffusion's)."""
    monkeypatch.setenv("MODEL_FLAGS", MODEL_FLAGS)
    monkeypatch.setenv("DIFFUSION_FLAGS", DIFFUSION_FLAGS)
    adapter = _example("adapt_improved_diffusion")
    settings = adapter.settings_from_env()
    defaults = script_util.model_and_diffusion_defaults()
    torch.manual_seed(0)
    net, diffusion = script_util.create_model_and_diffusion(
        **{k: settings.get(k, v) for k, v in defaults.items()}
    )
    path = tmp_path / "ema_0.9999_000000.pt"
    torch.save(net.state_dict(), path)
    spec = f"{EXAMPLES / 'adapt_improved_diffusion.py'}:make"
    info = cli("info", str(path), "--model", spec, "--format", "json")
    assert info.exit_code == 0, info.stderr
    model = ddpmcli.load(path, model=spec)
    net.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    t = torch.tensor([0, 20, 49])
    with torch.no_grad():
        theirs = diffusion.p_mean_variance(net, x, t, clip_denoised=False)
    out, _ = model.predict(x, t)
    x0 = model.schedule.predict_x0(out.double(), x.double(), t, model.prediction_type)
    torch.testing.assert_close(x0.float(), theirs["pred_xstart"].float(), rtol=1e-4, atol=1e-4)
    alpha_bar = torch.from_numpy(diffusion.alphas_cumprod)
    torch.testing.assert_close(model.schedule.alpha_bar, alpha_bar, rtol=1e-12, atol=1e-15)


FACTORY = """
import importlib.util, sys
from torch import nn
spec = importlib.util.spec_from_file_location("ex_iddpm", {path!r})
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)


class Net(nn.Conv2d):  # called net(x, t), as improved-diffusion's UNetModel is
    def forward(self, x, t):
        return super().forward(x)


def make(path, load_weights):
    weights = load_weights(path)
    net = Net(3, weights["weight"].shape[0], 1)  # 6 outputs with a learned variance
    settings = ex.settings_from_env()
    settings["image_size"] = 8
    return ex.adapt(net, weights, settings)
"""


@pytest.mark.parametrize(
    ("flags", "declared"),
    [
        ("", "fixed_large"),
        ("--sigma_small True", "fixed_small"),
        ("--learn_sigma True", "learned_range"),
    ],
)
def test_adapter_declares_the_trainers_variance(flags, declared, tmp_path, monkeypatch) -> None:
    """improved-diffusion evaluates a model with the variance create_gaussian_diffusion gives it:
    learned_range with learn_sigma, else fixed_large (its ``sigma_small`` False default;
    fixed_small with it): the adapter declares it, and sample's and nll's default variance is
    then that one (an explicit variance still wins)."""
    monkeypatch.setenv("MODEL_FLAGS", flags)
    monkeypatch.setenv("DIFFUSION_FLAGS", "--diffusion_steps 20")
    (tmp_path / "fac.py").write_text(
        FACTORY.format(path=str(EXAMPLES / "adapt_improved_diffusion.py"))
    )
    torch.manual_seed(0)
    width = 6 if declared == "learned_range" else 3
    torch.save(torch.nn.Conv2d(3, width, 1).state_dict(), tmp_path / "w.pt")
    model = ddpmcli.load(tmp_path / "w.pt", model=f"{tmp_path / 'fac.py'}:make")
    assert model.info.get("variance") == declared
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    kinds = ("fixed_small", "fixed_large") + (("learned_range",) if width == 6 else ())
    rows = {v: ddpmcli.nll(model, x0, t=[1, 7], variance=v).rows for v in kinds}
    assert all(rows[v] != rows[declared] for v in kinds if v != declared)
    assert ddpmcli.nll(model, x0, t=[1, 7]).rows == rows[declared]
    settings = ddpmcli.api.sample_settings(model, 2)
    assert settings.variance == declared


def test_cli_nll_default_is_the_declared_variance(tmp_path, monkeypatch, cli) -> None:
    """`ddpm nll --model` without --variance uses the adapter's fixed_large."""
    import numpy as np

    monkeypatch.setenv("MODEL_FLAGS", "")
    monkeypatch.setenv("DIFFUSION_FLAGS", "--diffusion_steps 20")
    (tmp_path / "fac.py").write_text(
        FACTORY.format(path=str(EXAMPLES / "adapt_improved_diffusion.py"))
    )
    torch.manual_seed(0)
    torch.save(torch.nn.Conv2d(3, 3, 1).state_dict(), tmp_path / "w.pt")
    np.save(tmp_path / "x.npy", (torch.rand(2, 3, 8, 8) * 2 - 1).numpy())
    args = ("nll", str(tmp_path / "w.pt"), "--model", f"{tmp_path / 'fac.py'}:make",
            "--data", str(tmp_path / "x.npy"), "--t", "1,7", "--format", "json")  # fmt: skip
    runs = {v: cli(*args, "--variance", v) for v in ("fixed_small", "fixed_large")}
    default = cli(*args)
    assert default.exit_code == 0, default.stderr
    assert json.loads(default.stdout) == json.loads(runs["fixed_large"].stdout)
    assert json.loads(default.stdout) != json.loads(runs["fixed_small"].stdout)


def test_package_variances_are_the_ones_declared(script_util) -> None:
    """The fact the adapter encodes, from the package itself."""
    gd = pytest.importorskip("improved_diffusion.gaussian_diffusion")
    for learn_sigma, sigma_small, kind in (
        (False, False, gd.ModelVarType.FIXED_LARGE),
        (False, True, gd.ModelVarType.FIXED_SMALL),
        (True, False, gd.ModelVarType.LEARNED_RANGE),
    ):
        args = {"learn_sigma": learn_sigma, "sigma_small": sigma_small}
        diffusion = script_util.create_gaussian_diffusion(
            steps=10, learn_sigma=learn_sigma, sigma_small=sigma_small, noise_schedule="cosine",
            use_kl=False, predict_xstart=False, rescale_timesteps=True,
            rescale_learned_sigmas=True, timestep_respacing="",
        )  # fmt: skip
        assert diffusion.model_var_type == kind, args
