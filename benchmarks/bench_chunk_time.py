"""Time of the CIFAR-10-size sweep at chunks 8, 10 (the automatic one), 16 and the plain
diffusers loop, all in one process, interleaved (alternating order), median of ``--repeats``.

``bench_chunk.py`` runs each case in a fresh process so that its peak memory is its own; that
costs each case its own start-up and spreads its timings by ~10% on a 2-core machine. Here the
model is loaded once and the cases take turns, so their times compare directly. Same folder and
cases as ``bench_chunk.py`` (google/ddpm-cifar10-32's UNet, random weights, 16 images x 5 t).

Usage: python benchmarks/bench_chunk_time.py [--repeats 5] [--record]
  -> benchmarks/out/chunk_time.json (--record: benchmarks/results/chunk_time.json)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_chunk  # noqa: E402  (the same folder, loop and timesteps)
from _results import add_output_options, output_path  # noqa: E402  (benchmarks/)

from ddpmcli.checkpoints import load_checkpoint  # noqa: E402
from ddpmcli.run import reconstruction_sweep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    add_output_options(parser, "chunk_time.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = bench_chunk.build_cifar(Path(tmp) / "cifar")
        model = load_checkpoint(folder)
        x0 = torch.from_numpy(np.load(folder / "x.npy"))
        reconstruction_sweep(model, x0[:1], bench_chunk.CIFAR_T[:1], batch_size=1)  # warm-up
        # the automatic chunk (this first full sweep also warms every kernel up)
        model_chunk = reconstruction_sweep(model, x0, bench_chunk.CIFAR_T).batch_size
        cases: list[Any] = [*dict.fromkeys([8, model_chunk, 16]), "diffusers"]
        times: dict[str, list[float]] = {str(c): [] for c in cases}
        for r in range(args.repeats):
            for case in cases if r % 2 == 0 else cases[::-1]:
                if case == "diffusers":
                    seconds, _ = bench_chunk.diffusers_loop(folder)  # its loop only
                else:
                    began = time.perf_counter()
                    reconstruction_sweep(model, x0, bench_chunk.CIFAR_T, batch_size=case)
                    seconds = time.perf_counter() - began
                times[str(case)].append(seconds)
                print(case, round(seconds, 3), file=sys.stderr, flush=True)
    base = statistics.median(times["diffusers"])
    out = {
        "automatic_chunk": model_chunk,
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "cases": {
            c: {
                "median_s": statistics.median(v),
                "vs_diffusers": statistics.median(v) / base,
                "all": [round(s, 4) for s in v],
            }
            for c, v in times.items()
        },  # fmt: skip
    }
    path = output_path(args, "chunk_time.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
