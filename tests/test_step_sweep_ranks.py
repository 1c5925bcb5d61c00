"""`ddpm steps` under torchrun: 2 gloo processes on CPU, each stepping its share of every run's
samples, print one process's rows (common random numbers: the same x_T and step noise per sample
whatever the rank count). In its own file, beside test_distributed's helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_mlp_checkpoint
from test_distributed import _ddpm, _rows, _same_rows


def test_two_ranks_print_one_process_sweep(cli, tmp_path: Path) -> None:
    ckpt = tiny_mlp_checkpoint(tmp_path / "mlp.pt", 12, references=16)
    # 9 samples: ranks of 5 and 4; float64 so only the sums' order differs; euler-a draws noise
    args = [
        "steps", str(ckpt), "--sampler", "ddim,euler-a", "--steps", "2,4", "--num-samples", "9",
        "--reference-steps", "6", "--dtype", "float64", "--seed", "3", "-f", "csv",
    ]  # fmt: skip
    one, two = cli(*args), _ddpm(args, tmp_path, ranks=2)  # one process: in this one
    assert one.exit_code == 0, one.stderr
    assert two.returncode == 0, two.stderr
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in _rows(one.stdout)]
    again = [{k: v for k, v in r.items() if k != "wall_s"} for r in _rows(two.stdout)]
    assert len(strip) == 4 and [r["sampler"] for r in strip] == ["ddim"] * 2 + ["euler-a"] * 2
    _same_rows(strip, again, rel=1e-9)
    assert two.stdout.count("\n") == one.stdout.count("\n")  # rank 1 printed no rows
    assert two.stderr.count("reference: unipc at 6 steps") == 1, two.stderr  # nor notes


@pytest.fixture(autouse=True)
def _no_rank_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
