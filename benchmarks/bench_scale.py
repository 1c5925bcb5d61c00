"""Throughput against process count: items/s of `ddpm reconstruct`, `ddpm nll` and `ddpm sample`
in one process and under torchrun with 2 CPU processes (gloo), on one checkpoint.

Items: (sample, t) pairs for reconstruct and nll, sample steps (samples x steps) for sample. The
time is the whole command's wall time (start-up, the process group and the gather included), the
median of ``--repeats`` interleaved runs, so small settings understate the scaling: start-up is a
fixed cost. Every command runs with ``--threads 1`` per process, so 2 processes use 2 cores.

Usage:
    python benchmarks/bench_scale.py [--arch mlp|unet] [--n 2000] [--repeats 3]
Writes benchmarks/out/scale.json (--record: the tracked
benchmarks/results/scale.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _results import add_output_options, output_path  # noqa: E402  (benchmarks/)

from ddpmcli import core, models
from ddpmcli.checkpoints import save_native_checkpoint


def _checkpoint(root: Path, arch: str, steps: int) -> tuple[Path, tuple[int, ...]]:
    shape = (2,) if arch == "mlp" else (1, 8, 8)
    torch.manual_seed(0)
    hp = models.default_hparams(arch, shape)
    refs = torch.rand(4096 if arch == "mlp" else 512, *shape) * 2 - 1
    path = save_native_checkpoint(
        root / f"{arch}.pt", models.build_model(arch, hp), architecture=arch, hparams=hp,
        schedule=core.make_schedule("linear", steps), prediction_type="epsilon",
        data_shape=shape, reference_samples=refs,
    )  # fmt: skip
    return path, shape


def _run(args: list[str], procs: int, cwd: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "ddpmcli"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(procs), "-m", "ddpmcli"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run([*launcher, *args, "--threads", "1", "-q", "-f", "csv"], cwd=cwd,
                          env=env, capture_output=True, text=True, check=False)  # fmt: skip
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} with {procs} process(es) failed:\n{done.stderr}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("mlp", "unet"), default="mlp")
    parser.add_argument("--n", type=int, default=2000, help="samples per command")
    parser.add_argument("--steps", type=int, default=200, help="the schedule's T")
    parser.add_argument("--repeats", type=int, default=3)
    add_output_options(parser, "scale.json")
    opts = parser.parse_args()
    opts.out = output_path(opts, "scale.json")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt, _ = _checkpoint(root, opts.arch, opts.steps)
        n = str(opts.n)
        cases = {
            "reconstruct": (["reconstruct", str(ckpt), "--num-samples", n, "--every", "10"],
                            opts.n * len(range(0, opts.steps, 10))),
            "nll": (["nll", str(ckpt), "--num-samples", n, "--every", "5"],
                    opts.n * len(range(0, opts.steps, 5))),
            "sample": (["sample", str(ckpt), "--num-samples", n], opts.n * opts.steps),
        }  # fmt: skip
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(opts.repeats):
            for name, (args, _items) in cases.items():
                for procs in (1, 2):
                    times.setdefault((name, procs), []).append(_run(args, procs, root))
    rows = []
    for name, (_args, items) in cases.items():
        one = statistics.median(times[(name, 1)])
        two = statistics.median(times[(name, 2)])
        rows.append({"command": name, "items": items, "seconds_1": one, "seconds_2": two,
                     "items_per_s_1": items / one, "items_per_s_2": items / two,
                     "speedup": one / two})  # fmt: skip
    print(f"{'command':12} {'items':>9} {'1 proc items/s':>15} {'2 procs items/s':>16} {'x':>6}")
    for r in rows:
        print(f"{r['command']:12} {r['items']:9d} {r['items_per_s_1']:15.0f} "
              f"{r['items_per_s_2']:16.0f} {r['speedup']:6.2f}")  # fmt: skip
    result = {
        "arch": opts.arch, "n": opts.n, "T": opts.steps, "repeats": opts.repeats,
        "cpus": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0],
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "rows": rows,
    }  # fmt: skip
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
