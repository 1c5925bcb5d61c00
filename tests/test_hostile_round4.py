"""Hostile input, fourth round: --timestep-list, --dpm-form exact, Karras churn, `ddpm steps`'
defaults, --max-sequence-length, check CKPT on paths, -T without --kind, train at zero terminal
SNR, used as a careless or hostile user would.

The one-line cases run in one subprocess under ``RLIMIT_AS`` 4 GiB (tests/capped.py): each ends
in one ``Error:`` line (never the bug hint) with the right exit status.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from capped import assert_one_line, run_capped  # noqa: E402


def _native(path: Path, kind: str, prediction_type: str) -> Path:
    from ddpmcli import checkpoints, core, models

    base = models.default_hparams("mlp", (2,))
    checkpoints.save_native_checkpoint(
        path, models.build_model("mlp", base), architecture="mlp", hparams=base,
        schedule=core.make_schedule(kind, 1000), prediction_type=prediction_type,
        data_shape=(2,),
    )  # fmt: skip
    return path


# (argv, exit status, fragments of the one Error line)
CASES: list[tuple[list[str], int, list[str]]] = [
    # make_schedule's own keywords given as a kind parameter: TypeError 'got multiple values for
    # keyword argument' reached the bug handler (schedule, check, train: every --param user)
    (["schedule", "--kind", "linear", "--param", "zero_terminal_snr=1", "-T", "5"], 2,
     ["zero_terminal_snr is not a parameter", "--zero-terminal-snr"]),
    (["check", "--kind", "cosine", "--param", "logsnr_shift=1"], 2, ["--logsnr-shift"]),
    (["train", "--data", "moons", "--steps", "2", "--param", "zero_terminal_snr=1", "--out",
      "z.pt"], 2, ["--zero-terminal-snr"]),
]  # fmt: skip


def test_hostile_round4_cases(tmp_path: Path) -> None:
    _native(tmp_path / "vp.pt", "linear", "epsilon")
    rows = run_capped([argv for argv, _, _ in CASES], tmp_path)
    for (argv, code, fragments), row in zip(CASES, rows, strict=True):
        try:
            assert_one_line(row, code, *fragments)
        except AssertionError as exc:
            raise AssertionError(f"{argv}: {exc}") from None
    assert not (tmp_path / "z.pt").exists()
