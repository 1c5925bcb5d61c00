"""Shared fixtures (keep small; add, never remove)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from typer.testing import CliRunner, Result

if TYPE_CHECKING:
    import torch

    from ddpmcli import core


@pytest.fixture
def runner() -> CliRunner:
    """typer's CliRunner; its results keep stdout and stderr apart (`result.stdout`, `.stderr`)."""
    return CliRunner()


@pytest.fixture
def cli(runner: CliRunner) -> Callable[..., Result]:
    """Run `ddpm ARGS...` in-process through the real app (and its error boundary)."""
    from ddpmcli.cli.app import app

    def invoke(*args: str, **kwargs: object) -> Result:
        return runner.invoke(app, list(args), **kwargs)  # type: ignore[arg-type]

    return invoke


HOSTILE_T = 10  # the model timestep where the hostile programs below misbehave


@pytest.fixture(scope="session")
def hostile_programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """TorchScript denoisers of 2-D data (run with ``--trust-program --kind linear -T 20
    --prediction-type eps --data-shape 2``) that output 0.1 x except at t = HOSTILE_T, where
    ``nan`` returns NaN for those rows and ``raise`` raises RuntimeError("boom at ten")."""
    import torch
    from torch import Tensor, nn

    class Hostile(nn.Module):
        def __init__(self, mode: int) -> None:
            super().__init__()
            self.mode = mode
            self.at = HOSTILE_T

        def forward(self, x: Tensor, t: Tensor) -> Tensor:
            hit = (t == self.at).reshape(-1, 1)
            if self.mode == 1 and bool(hit.any()):
                raise RuntimeError("boom at ten")
            return torch.where(hit, torch.full_like(x, float("nan")), 0.1 * x)

    root = tmp_path_factory.mktemp("hostile")
    out = {}
    for name, mode in (("nan", 0), ("raise", 1)):
        path = root / f"{name}.pt"
        with warnings.catch_warnings():  # torch.jit is deprecated, and still what people ship
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(Hostile(mode)), str(path))
        out[name] = str(path)
    return out


HOSTILE_FLAGS = ("--trust-program", "--kind", "linear", "-T", "20", "--prediction-type", "eps",
                 "--data-shape", "2")  # fmt: skip


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test: these tensors are tiny, one thread is as fast, and on a
    busy machine OpenMP threads that wait on each other make each small op take milliseconds
    (40 s instead of 1 s). Use as ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian_denoiser(
    schedule: core.Schedule, mu: float, s: float, var_value: float | None = None
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    """The exact E[x0 | x_t] for x0 ~ N(mu, s^2 I), as a "sample"-prediction model:
    x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab), so E[x0|x_t] = mu + sqrt(ab) s^2 (x_t - sqrt(ab) mu)
    / (ab s^2 + 1 - ab) (Gaussian conditioning). Indexed by *model* timestep; ``var_value``
    (if given) is returned as a learned-variance output filled with it."""
    import torch

    ab_all = schedule.alpha_bar

    def predict(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        ab = ab_all[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x0 = mu + ab.sqrt() * s * s / (ab * s * s + 1 - ab) * (x - ab.sqrt() * mu)
        v = None if var_value is None else torch.full_like(x, var_value)
        return x0, v

    return predict


def tiny_mlp_checkpoint(path: Path, timesteps: int, references: int = 0, seed: int = 0) -> Path:
    """An untrained native MLP checkpoint of 2-D data (weights from ``torch.manual_seed(seed)``)
    on a linear schedule of ``timesteps``, with ``references`` N(0, 0.5^2) reference samples."""
    import torch

    from ddpmcli import core, models
    from ddpmcli.checkpoints import save_native_checkpoint

    torch.manual_seed(seed)
    hp = models.default_hparams("mlp", (2,))
    gen = torch.Generator().manual_seed(seed)
    refs = torch.randn(references, 2, generator=gen) * 0.5 if references else None
    return save_native_checkpoint(
        path, models.build_model("mlp", hp), architecture="mlp", hparams=hp,
        schedule=core.make_schedule("linear", timesteps), prediction_type="epsilon",
        data_shape=(2,), reference_samples=refs,
    )  # fmt: skip


def shrink_model(timesteps: int) -> Any:
    """A wrapped epsilon model of 3-D data, ``0.3 x + 1e-4 t`` on a cosine schedule of
    ``timesteps``: cheap, deterministic, and different at every t (so a grid shows in the run)."""
    import torch

    import ddpmcli

    class Shrink(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return 0.3 * x + 1e-4 * t.to(x.dtype)[:, None]

    return ddpmcli.wrap(
        Shrink(), schedule=ddpmcli.schedule("cosine", timesteps), prediction_type="epsilon",
        data_shape=(3,), data_range=(-1.0, 1.0),
    )  # fmt: skip


def k_diffusion_sampling(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """k_diffusion.sampling alone: the package's __init__ imports its training stack (wandb,
    torchvision, clean-fid, kornia, ...), so the package is stubbed and its utils module replaced
    by the one helper log_likelihood uses (append_dims); sampling.py itself needs torchdiffeq,
    torchsde, scipy and tqdm."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    for dep in ("torchdiffeq", "torchsde", "scipy", "tqdm"):
        if importlib.util.find_spec(dep) is None:
            pytest.skip(f"k_diffusion.sampling needs {dep}, which is not installed")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]  # type: ignore[attr-defined]
    package.utils = utils  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "k_diffusion", package)
    monkeypatch.setitem(sys.modules, "k_diffusion.utils", utils)
    monkeypatch.delitem(sys.modules, "k_diffusion.sampling", raising=False)
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError as exc:  # pragma: no cover - depends on the installed versions
        pytest.skip(f"k_diffusion.sampling does not import: {exc}")


@pytest.fixture(scope="session")
def flow_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SD3 (with and without T5), Flux-dev and schnell-style Flux (no guidance embedding)
    folders saved by diffusers' own pipelines, built once for every test file that reads them
    (read-only: a test that edits one copies it first)."""
    import pipeline_folders as pf

    mk = tmp_path_factory.mktemp
    return {
        "sd3": pf.sd3_folder(mk("sd3")),
        "sd3-no-t5": pf.sd3_folder(mk("sd3_no_t5"), t5=False),
        "flux-dev": pf.flux_folder(mk("flux")),
        "flux-schnell": pf.flux_folder(mk("schnell"), guidance=False),
    }


def write_images(path: Path, n: int) -> Path:
    """``n`` random 3x8x8 images in [-1, 1] (seed 1) as a .npy at ``path``."""
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(1)
    np.save(path, (torch.rand((n, 3, 8, 8), generator=gen) * 2 - 1).numpy())
    return path
