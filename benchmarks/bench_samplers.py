"""The samplers' own work against the model's forward passes, on CPU (issue 17's target: at most
5% over the forward passes at batch 16-256; the multistep history costs O(order x batch)).

For each model (the built-in MLP on 2-D data and the built-in UNet on 3x32x32 images, random
weights) and each batch size, every sampler runs ``--steps`` steps of
:func:`ddpmcli.run.samplers.sample` twice:

- with the model: ``run``;
- with a denoiser that costs nothing (zeros of the right shape): ``own`` - the loop, the step's
  update, the statistics, everything but the network.

``forward`` is the network alone on the same inputs, called as many times as the run calls it
(Heun: 2N - 1). The overhead is ``own / forward`` (and, as a cross-check, ``run / forward - 1``).
Time is this process's CPU time on ``--threads`` threads (1 by default), the median of
``--repeats`` runs after a warm-up. Prints one JSON object per (model, batch, sampler) and writes
them, with the command and the machine's load average before and after, to
benchmarks/out/samplers.json (``--record``: the tracked benchmarks/results/samplers.json).

    python benchmarks/bench_samplers.py --repeats 3

Measured (benchmarks/results/samplers.json; shared 2-core machine, 1 thread, 20 Karras steps):
the UNet (3x32x32, batch 16): own work 0.4-1.3% of the forward passes for every sampler (ddim
0.8%, dpmpp-2m 1.0%, dpmpp-3m 1.3%, unipc 0.9%, euler 1.1%, euler-a 0.9%, heun 0.4%,
dpmpp-2m-sde 0.9%); run/forward - 1 scatters by +-10% there (load). The 2-D MLP's forward pass
is ~0.5 ms at batch 16, below the loop's own fixed cost per step (statistics, Python): own/forward
0.5-1.2 at batch 16 and 0.18-0.45 at batch 256 for every sampler, ddim included (1.21 and 0.30):
the new solvers add nothing over ddim's loop there, and the 5% target holds only where the model
costs more than the loop.

2026-12-07, the loop's fixed cost cut without changing a number (commit 610ca1e: index tables made
once per run, no slice views for one batch, no no-op casts, a 2-kernel NaN count, no no-op casts
in core.extract): per-step own cost on the MLP, min of 60 runs (20 minus 2 Karras steps),
median of 3 interleaved rounds against the tree before it, load average 5.2-5.7 on 2 cores:
batch 16 ddim 332 -> 248 us (-25%), dpmpp-2m 296 -> 227, dpmpp-3m 326 -> 265, unipc 439 -> 379,
euler 301 -> 257, euler-a 295 -> 290, heun 414 -> 283, dpmpp-2m-sde 331 -> 254; batch 256
ddim 331 -> 291, dpmpp-2m 298 -> 262, dpmpp-3m 333 -> 270, unipc 439 -> 434, euler 301 -> 266,
euler-a 341 -> 288, heun 426 -> 362, dpmpp-2m-sde 486 -> 274 (its base rounds scatter). The
MLP's forward (~0.5 ms at batch 16 on a quiet machine) still costs about as much as the loop:
the 5% target is out of reach there for a
Python loop of ~50 torch calls a step (measured with a TorchFunctionMode count: 62.6 -> 51.8 for
ddim after core.extract's change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ddpmcli import core, models
from ddpmcli.run.samplers import SampleSettings, sample
from ddpmcli.run.solver_grid import sigma_grid
from ddpmcli.run.steps import registered

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_output_options, output_path  # noqa: E402  (benchmarks/)

SAMPLERS = ("ddim", "dpmpp-2m", "dpmpp-3m", "unipc", "euler", "euler-a", "heun", "dpmpp-2m-sde")


def _clock(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def _case(
    name: str, shape: tuple[int, ...], batch: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    arch = "mlp" if len(shape) == 1 else "unet"
    net = models.build_model(arch, models.default_hparams(arch, shape)).eval()
    train = core.make_schedule("linear", 1000)
    grid = sigma_grid(train, args.steps, "karras")

    def model(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, None]:
        return net(x, t.to(torch.float32)), None

    def free(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(x), None

    x = torch.randn(batch, *shape)
    t = torch.full((batch,), 500.0)
    rows = []
    for sampler in SAMPLERS:
        settings = SampleSettings(sampler=sampler, clip=False)
        calls = registered(sampler).evaluations
        nfe = calls(args.steps, settings) if calls else args.steps

        def run(predict: Callable = model, settings: SampleSettings = settings) -> None:
            with torch.inference_mode():
                sample(predict, grid, "epsilon", shape, n=batch, settings=settings, seed=1)

        def forward(nfe: int = nfe) -> None:
            with torch.inference_mode():
                for _ in range(nfe):
                    net(x, t)

        full = _clock(run, args.repeats)
        own = _clock(lambda: run(free), args.repeats)
        fwd = _clock(forward, args.repeats)
        rows.append({
            "model": name, "batch": batch, "sampler": sampler, "steps": args.steps, "nfe": nfe,
            "run_s": round(full, 4), "own_s": round(own, 4), "forward_s": round(fwd, 4),
            "own_over_forward": round(own / fwd, 4), "run_over_forward_minus_1":
            round(full / fwd - 1, 4),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="16,256")
    parser.add_argument("--models", default="mlp,unet")
    add_output_options(parser, "samplers.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {"mlp": (2,), "unet": (3, 32, 32)}
    load_before = os.getloadavg()
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            rows += _case(name, shapes[name], batch, args)
    out = {
        "command": "python benchmarks/bench_samplers.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs, {args.threads} torch thread(s), process CPU time, "
        "median of repeats",
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "rows": rows,
    }
    path = output_path(args, "samplers.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
