"""Shared fixtures (keep small; add, never remove)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
from typer.testing import CliRunner, Result


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
