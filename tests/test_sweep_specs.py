"""Samplers with their own solver options in the step sweep: ``NAME:OPTION=VALUE`` (``ddpm steps
--sampler dpmpp-3m,dpmpp-3m:dpm-form=exact``), so variants of one solver sit side by side. A
spec's row is the run ``ddpmcli.sample`` gives with those options from the same x_T."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import shrink_model  # noqa: E402

import ddpmcli  # noqa: E402
from ddpmcli.api_sampling import parse_sampler_spec, step_sweep  # noqa: E402
from ddpmcli.errors import ParameterError  # noqa: E402


def _model() -> ddpmcli.LoadedModel:
    return shrink_model(200)


def test_parse_sampler_spec() -> None:
    assert parse_sampler_spec("ddim") == ("ddim", {})
    assert parse_sampler_spec("dpmpp-3m:dpm-form=exact") == ("dpmpp-3m", {"dpm_form": "exact"})
    assert parse_sampler_spec("unipc:order=3:corrector=off:solver_type=bh1") == (
        "unipc", {"order": 3, "corrector": False, "solver_type": "bh1"},
    )  # fmt: skip
    assert parse_sampler_spec("euler:s-churn=1.5:s_tmax=2") == (
        "euler", {"s_churn": 1.5, "s_tmax": 2.0},
    )  # fmt: skip
    assert parse_sampler_spec("dpmpp-2m:final-sigmas=sigma_min") == (
        "dpmpp-2m", {"final_sigmas_type": "sigma_min"},
    )  # fmt: skip
    for bad, fragment in (
        ("dpmpp-3m:dpm-form", "is not OPTION=VALUE"),
        ("dpmpp-3m:bogus=1", "is not OPTION=VALUE"),
        ("unipc:order=x", "order='x' must be a whole number"),
        ("unipc:corrector=maybe", "must be true or false"),
        ("euler:s-churn=lots", "must be a number"),
        ("unipc:order=2:order=3", "gives order twice"),
    ):
        with pytest.raises(ParameterError, match=fragment):
            parse_sampler_spec(bad)


@pytest.mark.parametrize(
    ("spec", "name", "options", "extra_calls"),
    [
        ("dpmpp-3m:dpm-form=exact", "dpmpp-3m", {"dpm_form": "exact"}, 1),  # its 2S start
        ("dpmpp-3m", "dpmpp-3m", {}, 0),
        ("unipc:order=3:corrector=off", "unipc", {"order": 3, "corrector": False}, 0),
    ],
)
def test_a_specs_row_is_that_samplers_run(
    spec: str, name: str, options: dict, extra_calls: int
) -> None:
    model, seen = _model(), {}

    def exact(x_t: torch.Tensor) -> torch.Tensor:  # the sweep's x_T, and a zero reference
        seen["x_t"] = x_t.clone()
        return torch.zeros_like(x_t)

    result = step_sweep(
        model, [spec], [6], n=16, seed=5, spacing="trailing", exact=exact, clip=False
    )
    (row,) = result.rows
    assert row["sampler"] == spec and row["nfe"] == 6 + extra_calls
    run = ddpmcli.sample(
        model, 16, 6, name, spacing="trailing", init=seen["x_t"].float(), clip=False, seed=5,
        **options,
    )  # fmt: skip
    rms = math.sqrt(float(run.samples.double().pow(2).mean()))
    assert row["rms_error"] == pytest.approx(rms, rel=1e-6)


def test_steps_command_takes_specs(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from conftest import tiny_mlp_checkpoint

    ckpt = tiny_mlp_checkpoint(tmp_path / "m.pt", timesteps=40, references=8)
    base = ["steps", str(ckpt), "--steps", "4,8", "--n", "8", "--reference-steps", "16"]
    done = cli(*base, "--sampler", "dpmpp-3m,dpmpp-3m:dpm-form=exact", "--format", "csv")
    assert done.exit_code == 0, done.stderr
    rows = [line.split(",") for line in done.stdout.splitlines()[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("dpmpp-3m", "4", "4"), ("dpmpp-3m", "8", "8"),
        ("dpmpp-3m:dpm-form=exact", "4", "5"), ("dpmpp-3m:dpm-form=exact", "8", "9"),
    ]  # fmt: skip
    assert "dpmpp-3m:dpm-form=exact order" in done.stderr
    for spec, fragment in (
        ("ddim:order=2", "does not apply to --sampler ddim"),
        ("unipc:order=x", "--sampler 'unipc:order=x': order='x' must be a whole number"),
        ("nosuch:order=2", "--sampler 'nosuch' is unknown"),
    ):
        bad = cli(*base, "--sampler", spec)
        lines = bad.stderr.strip().splitlines()
        assert bad.exit_code == 2 and len(lines) == 1 and fragment in lines[0], bad.stderr


def test_the_reference_is_finer_than_every_run_and_within_reach(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The converged reference judges the runs: at most as many steps as a run it judged itself
    coarser (it printed 'halving the steps changes it by 14.8 RMS'); its default count, 500,
    fails a T = 3 model's table spacing, where the line named --steps, a flag the user gave right;
    two spellings of one run rerun it."""
    from conftest import tiny_mlp_checkpoint

    small = str(tiny_mlp_checkpoint(tmp_path / "t3.pt", timesteps=3, references=8))
    big = str(tiny_mlp_checkpoint(tmp_path / "m.pt", timesteps=40, references=8))
    ok = cli("steps", small, "--sampler", "ddim", "--steps", "1,2", "--n", "4", "-f", "json")
    assert ok.exit_code == 0, ok.stderr
    assert "reference: unipc at 3 steps" in ok.stderr  # min(500, T) on trailing spacing
    one_step = json.loads(ok.stdout)[0]
    assert one_step["steps"] == 1 and one_step["max_log_snr_gap"] is None  # no gap but onto data
    base = ["steps", big, "--n", "4", "--steps", "2,5"]
    for args, line in (
        (["--reference-steps", "5"],
         "Error: --reference-steps 5 must exceed every --steps count (the reference judges them; "
         "the largest is 5)"),
        (["--reference-steps", "41"],
         "Error: --reference-steps 41 is more than the model's T = 40 training timesteps, the "
         "most --spacing trailing can make (fewer, or a sigma spacing: karras)"),
        (["--sampler", "heun:s_churn=1,heun:s-churn=1.0"],
         "Error: --sampler lists 'heun:s_churn=1' and 'heun:s-churn=1.0', the same run; give it "
         "once"),
        (["--sampler", "heun:s_churn=nan"],
         "Error: the sampler option s_churn must be a finite number >= 0, got nan"),
    ):  # fmt: skip
        done = cli(*base, *args)
        assert done.exit_code == 2 and done.stderr.strip() == line, done.stderr
    sigma = cli(*base, "--sampler", "ddim", "--spacing", "karras", "--reference-steps", "41")
    assert sigma.exit_code == 0, sigma.stderr  # a sigma grid is not bound by T
