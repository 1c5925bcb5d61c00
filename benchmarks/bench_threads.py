"""The default thread count against 1 and 2 threads, with a busy core beside the command.

Runs `ddpm sample`, `ddpm nll`, `ddpm reconstruct` and `ddpm train` on a 2-D MLP checkpoint and
on a small image UNet, each with the default threads (no --threads), --threads 1 and --threads 2,
while a busy-loop process occupies one core (``--no-busy`` leaves it out). Wall time of the whole
command, median of ``--repeats`` interleaved runs; the target is the default within 1.1x of the
best count. OMP_NUM_THREADS is removed from the commands' environment so the default is ours.

Usage:
    python benchmarks/bench_threads.py [--repeats 3] [--no-busy]
Writes benchmarks/out/threads.json (--record: the tracked
benchmarks/results/threads.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
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


def _spin() -> None:
    while True:
        pass


def _checkpoint(root: Path, arch: str) -> Path:
    shape = (2,) if arch == "mlp" else (1, 8, 8)
    torch.manual_seed(0)
    hp = models.default_hparams(arch, shape)
    refs = torch.rand(256, *shape) * 2 - 1
    return save_native_checkpoint(
        root / f"{arch}.pt", models.build_model(arch, hp), architecture=arch, hparams=hp,
        schedule=core.make_schedule("linear", 100), prediction_type="epsilon", data_shape=shape,
        reference_samples=refs,
    )  # fmt: skip


def _run(args: list[str], threads: int | None, cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    extra = [] if threads is None else ["--threads", str(threads)]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ddpmcli", *args, *extra, "-q"], cwd=cwd,
                          env=env, capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-busy", action="store_true")
    add_output_options(parser, "threads.json")
    opts = parser.parse_args()
    opts.out = output_path(opts, "threads.json")
    busy = None if opts.no_busy else multiprocessing.Process(target=_spin, daemon=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases: dict[str, list[str]] = {}
        for arch in ("mlp", "unet"):
            ckpt = str(_checkpoint(root, arch))
            n = "256" if arch == "mlp" else "32"
            cases[f"sample {arch}"] = ["sample", ckpt, "-n", n, "--steps", "50", "-f", "csv"]
            cases[f"nll {arch}"] = ["nll", ckpt, "-n", n, "--every", "4", "-f", "csv"]
            cases[f"reconstruct {arch}"] = ["reconstruct", ckpt, "-n", n, "-f", "csv"]
        # each repeat replaces the last one's checkpoint: --force
        cases["train mlp"] = ["train", "--force", "--data", "moons", "--steps", "300", "-o", "t"]
        cases["train unet"] = ["train", "--force", "--data", "shapes", "--steps", "20", "-o", "u"]
        if busy is not None:
            busy.start()
        times: dict[tuple[str, str], list[float]] = {}
        try:
            for _ in range(opts.repeats):
                for name, args in cases.items():
                    for label, threads in (("default", None), ("1", 1), ("2", 2)):
                        times.setdefault((name, label), []).append(_run(args, threads, root))
        finally:
            if busy is not None:
                busy.terminate()
    rows = []
    for name in cases:
        med = {label: statistics.median(times[(name, label)]) for label in ("default", "1", "2")}
        best = min(med["1"], med["2"])
        rows.append({"command": name, "seconds": med, "default_over_best": med["default"] / best})
    print(f"{'command':18} {'default':>8} {'1 thr':>8} {'2 thr':>8} {'default/best':>13}")
    for r in rows:
        s = r["seconds"]
        print(f"{r['command']:18} {s['default']:8.2f} {s['1']:8.2f} {s['2']:8.2f} "
              f"{r['default_over_best']:13.2f}")  # fmt: skip
    result = {"busy_core": busy is not None, "repeats": opts.repeats,
              "cpus": len(os.sched_getaffinity(0)), "load_after": os.getloadavg()[0],
              "torch": torch.__version__, "rows": rows}  # fmt: skip
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
