"""Hostile input, third round: the Gaussian paths, the new samplers and their grids, --init,
ddpm steps, nll --method ode and check CKPT, used as a careless or hostile user would.

Every case ends in one ``Error:`` line (never the bug hint) with the right exit status, within a
memory cap and a time limit. The cases run in one subprocess under ``RLIMIT_AS`` 4 GiB (one
interpreter start for the batch): a case that allocated what it asks for would die of the cap
(MemoryError, reaching the bug handler) instead of printing its line.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from capped import assert_cases, run_capped  # noqa: E402


def _native(path: Path, kind: str, prediction_type: str) -> Path:
    from ddpmcli import checkpoints, core, models

    base = models.default_hparams("mlp", (2,))
    checkpoints.save_native_checkpoint(
        path, models.build_model("mlp", base), architecture="mlp", hparams=base,
        schedule=core.make_schedule(kind, 1000), prediction_type=prediction_type,
        data_shape=(2,),
    )  # fmt: skip
    return path


def _forged_npy(path: Path, shape: tuple[int, ...]) -> Path:
    """A .npy whose header claims ``shape`` of float32, followed by 64 bytes."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    header = header + " " * (118 - len(header)) + "\n"
    blob = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()
    path.write_bytes(blob + b"\0" * 64)
    return path


# (argv, exit status, fragments of the one Error line)
CASES: list[tuple[list[str], int, list[str]]] = [
    # a flow's dynamic shift e^mu past float64: math.exp's OverflowError reached the bug handler
    (["schedule", "--kind", "flow", "--param", "mu=800"], 2, ["mu=800", "overflows"]),
    (["schedule", "--from", "flux-dev", "--resolution", "1000000000"], 2, ["overflows"]),
    (["schedule", "--from", "flux-dev@99999999999999999999"], 2, ["overflows"]),
    (["schedule", "--from", "flux-dev", "--param", "mu=1e308", "--steps", "4"], 2, ["overflows"]),
    # a sigma spacing's count was allocated before any check (8 GB for 10**9, then the OOM killer)
    (["sample", "vp.pt", "--n", "4", "--steps", "1000000000", "--spacing", "karras"], 2,
     ["--steps must be between 1 and"]),
    (["steps", "vp.pt", "--n", "4", "--steps", "5,1000000000", "--spacing", "karras"], 2,
     ["--steps must be between 1 and"]),
    # euler, euler-a and heun on a flow starting at s = 1 (alpha = 0): ZeroDivisionError
    (["sample", "flow.pt", "--n", "4", "--sampler", "euler", "--steps", "3"], 2,
     ["alpha_t = 0", "flow-euler"]),
    (["sample", "flow.pt", "--n", "4", "--sampler", "euler-a", "--steps", "3"], 2,
     ["alpha_t = 0"]),
    (["sample", "flow.pt", "--n", "4", "--sampler", "heun", "--steps", "3"], 2, ["alpha_t = 0"]),
    # steps --target nan/-1/inf ran the sweep and answered nonsense; --reference-steps 10**8
    # was refused naming --steps
    (["steps", "vp.pt", "--n", "4", "--steps", "2", "--target", "nan"], 2, ["--target"]),
    (["steps", "vp.pt", "--n", "4", "--steps", "2", "--target", "-1"], 2, ["--target"]),
    (["steps", "vp.pt", "--n", "4", "--steps", "2", "--reference-steps", "100000000"], 2,
     ["--reference-steps must be"]),
    # ve/edm_sigma sigma_max whose square leaves float64: ve printed inf and nan columns, exit 0
    (["schedule", "--kind", "ve", "--param", "sigma_max=1e200"], 2, ["sigma_max", "too large"]),
    (["compare", "ve:sigma_max=1e300", "--summary"], 2, ["too large"]),
    # check CKPT --n 10**9 built the data set before any size check (8 GB)
    (["check", "vp.pt", "--data", "moons", "--n", "1000000000"], 2, ["--n 1000000000 needs"]),
    # nll: ODE flags with the bound, and --t with the ODE, were ignored without a word
    (["nll", "vp.pt", "--n", "4", "--probes", "5"], 2, ["--probes: ODE options"]),
    (["nll", "vp.pt", "--n", "4", "--method", "ode", "--ode-steps", "2", "--t", "5"], 2,
     ["--method ode has none"]),
    (["nll", "vp.pt", "--n", "4", "--method", "ode", "--ode-steps", "2", "--t-random", "5"], 2,
     ["--t-random pick the bound's rows"]),
    # the flag is --final-sigmas: errors named --final-sigmas-type and --final-sigma
    (["sample", "vp.pt", "--n", "4", "--sampler", "dpmpp-2m", "--final-sigmas", "nope"], 2,
     ["--final-sigmas 'nope' is unknown"]),
    (["sample", "vp.pt", "--n", "4", "--sampler", "ddim", "--final-sigmas", "sigma_min"], 2,
     ["--final-sigmas does not apply"]),
    # --init whose header claims 745 GiB: np.load's MemoryError reached the bug handler
    (["sample", "vp.pt", "--n", "4", "--init", "huge.npy"], 2, ["header claims shape"]),
]  # fmt: skip


def test_hostile_round3_cases(tmp_path: Path) -> None:
    _native(tmp_path / "vp.pt", "linear", "epsilon")
    _native(tmp_path / "flow.pt", "flow", "flow")
    _forged_npy(tmp_path / "huge.npy", (100_000_000_000, 2))
    rows = run_capped([argv for argv, _, _ in CASES], tmp_path)
    assert_cases(CASES, rows)


def test_max_gap_of_a_flow_grid_from_s_1_is_inf_not_nan() -> None:
    """A flow's trailing grid starts at s = 1 (lambda = -inf): its first step's gap is infinite,
    and only the last step onto data is left out (a 2-step grid printed nan)."""
    from ddpmcli import core
    from ddpmcli.run.step_sweep import max_gap
    from ddpmcli.run.steps import SampleSettings, respaced_schedule

    grid = respaced_schedule(core.make_schedule("flow", 1000), 2, "trailing", 0)
    assert max_gap(grid, SampleSettings(sampler="flow-euler")) == float("inf")


def test_steps_plot_of_deterministic_samplers_warns_nothing(tmp_path: Path) -> None:
    """No stochastic sampler: matplotlib's 'No artists with labels found to put in legend'
    UserWarning reached stderr."""
    _native(tmp_path / "vp.pt", "linear", "epsilon")
    argv = ["steps", "vp.pt", "--n", "4", "--steps", "2", "--sampler", "ddim",
            "--reference-steps", "4", "--plot", "s.png", "-f", "csv"]  # fmt: skip
    [(status, stderr, _)] = run_capped([argv], tmp_path)
    assert status == 0, stderr
    assert "Warning" not in stderr and (tmp_path / "s.png").is_file(), stderr


def test_guidance_scale_past_float32_is_refused() -> None:
    """sample FLUX --guidance-scale 1e308 failed inside the model ('value cannot be converted to
    type float without overflow', exit 1); now a usage error naming the flag."""
    from ddpmcli.checkpoints.conditioning import guidance_value
    from ddpmcli.errors import ParameterError

    assert guidance_value(3e38) == 3e38
    with pytest.raises(ParameterError, match="past float32"):
        guidance_value(1e308)
