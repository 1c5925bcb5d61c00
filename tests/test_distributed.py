"""torchrun: 2 gloo processes on CPU give one process's rows; a failing rank ends every rank with
one Error line naming it; --num-samples passes through the launcher. Threads: the default choice
(OMP_NUM_THREADS, small models, affinity, cgroup quota, local world) with fakes."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_mlp_checkpoint

from ddpmcli import models
from ddpmcli.run.distributed import Ranks, current, shares
from ddpmcli.run.runtime import (
    SMALL_MODEL_WORK,
    cpu_times,
    default_threads,
    idle_cores,
    model_work,
    usable_cores,
)

TIMEOUT = 120


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a small shared machine
    env.pop("DDPM_DEBUG", None)
    return env


def _ddpm(args: list[str], cwd: Path, ranks: int = 1) -> subprocess.CompletedProcess[str]:
    """``python -m ddpmcli ARGS`` in one process, or under torchrun with ``ranks`` processes."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "ddpmcli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--standalone", "-m", "ddpmcli", *args]  # fmt: skip
    return subprocess.run(
        cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _same_rows(one: list[dict[str, str]], two: list[dict[str, str]], rel: float) -> None:
    assert len(one) == len(two) > 0
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            try:
                number = float(value)
            except ValueError:  # a term name, an empty stderr
                assert b[key] == value, key
                continue
            assert float(b[key]) == pytest.approx(number, rel=rel, abs=1e-9), key


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mlp_checkpoint(tmp_path_factory.mktemp("dist") / "mlp.pt", 12, references=64)


@pytest.mark.parametrize(
    "args",
    [
        ["reconstruct", "--num-samples", "9", "--per-sample", "--every", "3"],
        ["nll", "-n", "9"],
    ],
    ids=["reconstruct", "nll"],
)
def test_two_ranks_print_one_process_rows(ckpt: Path, args: list[str]) -> None:
    # 9 samples: the ranks hold 5 and 4, so the split is uneven and sample order matters
    full = [args[0], str(ckpt), *args[1:], "--seed", "3", "-f", "csv"]
    one, two = _ddpm(full, ckpt.parent), _ddpm(full, ckpt.parent, ranks=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    _same_rows(_rows(one.stdout), _rows(two.stdout), rel=1e-9)  # float64 sums, other order
    assert not [line for line in two.stderr.splitlines() if line.startswith("Error")]


def test_two_ranks_sample_the_same_arrays(ckpt: Path) -> None:
    base = ["sample", str(ckpt), "--num-samples", "7", "--steps", "6", "--seed", "2", "-f", "csv"]
    one = _ddpm([*base, "--save", "one.npz"], ckpt.parent)
    two = _ddpm([*base, "--save", "two.npz"], ckpt.parent, ranks=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = np.load(ckpt.parent / "one.npz"), np.load(ckpt.parent / "two.npz")
    assert a["samples"].shape == b["samples"].shape == (7, 2)
    # the same noise per sample; only the float32 model's batch differs (4 and 3 rows, not 7)
    np.testing.assert_allclose(b["samples"], a["samples"], rtol=0, atol=1e-6)
    _same_rows(_rows(one.stdout), _rows(two.stdout), rel=1e-5)  # float32 stats vs moments
    assert two.stdout.count("\n") == one.stdout.count("\n")  # rank 1 printed nothing


PICKY = '''
    import torch
    from torch import Tensor, nn


    class Picky(nn.Module):
        """0.1 x, but raises on inputs above 50: the samples that only rank 1 holds."""

        def forward(self, x: Tensor, t: Tensor) -> Tensor:
            if bool((x.abs() > 50).any()):
                raise RuntimeError("sample too large")
            return 0.1 * x
'''


def test_a_failing_rank_ends_the_run_with_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "picky_model.py").write_text(textwrap.dedent(PICKY))
    sys.path.insert(0, str(tmp_path))
    try:
        import picky_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(picky_model.Picky()), str(tmp_path / "picky.pt"))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("picky_model", None)
    data = np.zeros((8, 2))
    data[4:] = 60.0  # samples 4..7: rank 1's share of 8
    np.save(tmp_path / "data.npy", data)
    meta = ["--trust-program", "--kind", "linear", "-T", "8", "--prediction-type", "eps"]
    args = ["nll", "picky.pt", *meta, "--data-shape", "2", "--data", "data.npy", "-n", "8"]
    two = _ddpm(args, tmp_path, ranks=2)
    errors = [line for line in two.stderr.splitlines() if line.startswith("Error:")]
    assert two.returncode != 0
    assert errors == [
        "Error: rank 1: the model failed at t = 0..7: RuntimeError: sample too large"
    ], two.stderr
    assert two.stdout == ""


def test_shares_split_evenly_and_in_order() -> None:
    assert shares(9, 2) == [(0, 5), (5, 9)]
    assert shares(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert Ranks(rank=1, world=2).share(9) == (5, 9)


def test_one_process_needs_no_process_group() -> None:
    ranks = current({"WORLD_SIZE": "1"})
    assert not ranks.active and ranks.is_main
    t = torch.ones(3)
    assert ranks.sum(t) is t and ranks.gather(5) == [5]
    with pytest.raises(ValueError, match="boom"):
        ranks.settle(ValueError("boom"))
    assert current({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) \
        == Ranks(rank=3, world=4, local_rank=1, local_world=2)  # fmt: skip


def test_single_process_cli_joins_no_process_group(ckpt: Path) -> None:
    code = (
        "import sys; from ddpmcli.cli.app import main\n"
        f"sys.argv = ['ddpm', 'nll', {str(ckpt)!r}, '-n', '4', '-f', 'csv']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "import torch.distributed as d\n"
        "print('DIST', d.is_initialized(), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert "DIST False" in done.stderr, done.stderr


# --- threads ------------------------------------------------------------------------------


def test_omp_num_threads_wins() -> None:
    assert default_threads(10**9, environ={"OMP_NUM_THREADS": "3"}, cores=8) == 3
    assert default_threads(10, environ={"OMP_NUM_THREADS": "3"}, cores=8) == 3


def test_torchruns_own_omp_default_counts_as_unset() -> None:
    env = {"OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": "x"}
    assert default_threads(10**9, local_world=2, environ=env, cores=8) == 4
    assert default_threads(10**9, local_world=1, environ=env, cores=8) == 1  # the user's


def test_small_models_get_one_thread_large_ones_the_cores() -> None:
    assert default_threads(SMALL_MODEL_WORK - 1, environ={}, cores=8) == 1
    assert default_threads(SMALL_MODEL_WORK, environ={}, cores=8) == 8
    assert default_threads(None, environ={}, cores=8) == 8  # unknown (a program): large
    assert default_threads(None, local_world=3, environ={}, cores=8) == 2
    assert default_threads(None, local_world=16, environ={}, cores=8) == 1


def test_usable_cores_from_affinity_and_quota() -> None:
    cpus = set(range(8))
    assert usable_cores(cpus, cpu_max="max 100000") == 8
    assert usable_cores(cpus, cpu_max="250000 100000") == 3  # 2.5 CPUs: rounded up
    assert usable_cores({0, 1}, cpu_max="800000 100000") == 2  # affinity is tighter
    assert usable_cores(cpus, cfs=("-1", "100000")) == 8  # v1, no quota
    assert usable_cores(cpus, cfs=("50000", "100000")) == 1
    assert usable_cores(cpus, cpu_max="garbage") == 8
    assert usable_cores(set(), cpu_max="max 100000") == 1


def test_model_work_of_the_mlp_is_small() -> None:
    mlp = models.build_model("mlp", models.default_hparams("mlp", (2,)))
    work = model_work(mlp, 2)
    assert work is not None and work < SMALL_MODEL_WORK
    assert model_work(object(), 2) is None


STAT_BEFORE = "cpu  10 0 10 100 0 0 0 0 0 0\ncpu0 100 0 0 100 0 0 0 0 0 0\ncpu1 0 0 0 200 0 0 0 0\n"
STAT_AFTER = "cpu  10 0 10 100 0 0 0 0 0 0\ncpu0 200 0 0 100 0 0 0 0 0 0\ncpu1 0 0 10 290 0 0 0 0\n"


def test_a_busy_neighbour_leaves_one_free_core() -> None:
    # cpu0 spent the window busy (100 user jiffies, no idle); cpu1 was 90% idle
    before, after = cpu_times(STAT_BEFORE), cpu_times(STAT_AFTER)
    assert before == {0: (100, 200), 1: (200, 200)}
    assert idle_cores(before, after, {0, 1}) == pytest.approx(0.9)
    assert idle_cores(before, after, {0}) == pytest.approx(0.0)
    assert idle_cores(before, after, {7}) is None  # not measured: the caller keeps its count
    assert cpu_times("garbage\ncpuX 1 2\n") == {}
