"""Shared fixtures (keep small; add, never remove)."""

from __future__ import annotations

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
