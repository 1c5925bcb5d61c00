"""An explicit list of timesteps (diffusers' custom ``timesteps``): ``sample(timesteps=...)`` and
``ddpm sample --timestep-list``. The run visits exactly those entries of the training schedule, so
it equals a run on the same timesteps reached another way (a trailing respacing), and a list
that cannot run is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import shrink_model  # noqa: E402

import ddpmcli  # noqa: E402
from ddpmcli import core  # noqa: E402
from ddpmcli.errors import ParameterError  # noqa: E402


def _model() -> ddpmcli.LoadedModel:
    return shrink_model(100)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m", "unipc", "ddpm"])
def test_explicit_timesteps_equal_the_same_grid_by_spacing(sampler: str) -> None:
    model = _model()
    by_spacing = ddpmcli.sample(model, 16, 5, sampler, spacing="trailing", seed=3)
    visited = [int(t) for t in by_spacing.schedule.timesteps]
    assert visited == [19, 39, 59, 79, 99]  # trailing: T - 1 down by T/steps
    for order in (visited, visited[::-1], [59, 99, 19, 79, 39]):  # any order runs largest first
        explicit = ddpmcli.sample(model, 16, sampler=sampler, timesteps=order, seed=3)
        assert torch.equal(explicit.samples, by_spacing.samples)
        assert [r["t"] for r in explicit.rows] == visited[::-1]


def test_explicit_timesteps_keep_the_training_values() -> None:
    model = _model()
    run = ddpmcli.sample(model, 4, sampler="ddim", timesteps=[99, 50, 7], seed=0)
    train = model.schedule
    for i, t in enumerate([7, 50, 99]):
        assert float(run.schedule.alpha_bar[i]) == float(train.alpha_bar[t])
    # the respaced posterior is the one between consecutive kept entries (ab' = ab_t/ab_s)
    direct = core.respace(train, [7, 50, 99])
    assert torch.equal(run.schedule.beta, direct.beta)


@pytest.mark.parametrize(
    ("timesteps", "extra", "fragment"),
    [
        ([99, 99, 5], {}, "repeats t = 99"),
        ([100, 5], {}, "outside the model's 0..99"),
        ([-1], {}, "outside"),
        ([2.5], {}, "whole numbers"),
        ([], {}, "at least one"),
        ([9, 5], {"steps": 4}, "cannot be used together"),
        ([9, 5], {"grid": [3.0, 1.0]}, "cannot be used together"),
    ],
)
def test_bad_timestep_lists_are_refused(timesteps: list, extra: dict, fragment: str) -> None:
    with pytest.raises(ParameterError, match=fragment):
        ddpmcli.sample(_model(), 4, sampler="ddim", timesteps=timesteps, **extra)


def test_timestep_list_through_the_cli(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    ckpt = tmp_path / "m.pt"
    done = cli("train", "--data", "moons", "--steps", "3", "--n", "64", "--out", str(ckpt), "-q")
    assert done.exit_code == 0, done.stderr
    args = ("sample", str(ckpt), "--n", "8", "--sampler", "ddim", "-f", "csv", "-c", "t", "-q")
    listed = cli(*args, "--timestep-list", "999,499,0")
    assert listed.exit_code == 0, listed.stderr
    assert listed.stdout.split() == ["t", "999", "499", "0"]
    for bad, fragment in (
        (["--timestep-list", "999,999"], "--timestep-list repeats t = 999"),
        (["--timestep-list", "1000"], "--timestep-list 1000 is outside the model's 0..999"),
        (["--timestep-list", "5,x"], "give comma-separated whole numbers"),
        (["--timestep-list", "9,5", "--steps", "4"], "--timestep-list and --steps cannot"),
        (["--timestep-list", "9,5", "--sigmas", "3,1"], "--timestep-list and --sigmas cannot"),
    ):
        done = cli(*args, *bad)
        lines = done.stderr.strip().splitlines()
        assert done.exit_code == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith("Error: ") and fragment in lines[0], lines[0]
