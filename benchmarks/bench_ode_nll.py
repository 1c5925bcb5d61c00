"""`ddpm nll --method ode`: how much of the time is the model's, and whether memory grows with the
number of solver steps (issue 19).

Cases (each in a fresh subprocess, CPU, float32 model, one thread unless --threads):

- ``mlp_exact``: the built-in 2-D MLP (the moons model's architecture; --ckpt uses a trained
  checkpoint instead of random weights), 256 samples, exact divergence (2 VJPs per evaluation),
  Dormand-Prince at rtol = atol = 1e-5;
- ``unet_hutchinson``: the built-in UNet on 1x16x16 images (the `shapes` model's architecture,
  random weights), 4 samples, Hutchinson with 1 Rademacher probe, RK4 on 8 equal steps (random
  weights make an adaptive solve's length arbitrary; the cost per evaluation is what is measured);
- ``memory``: the MLP case with RK4 on 20 and on 400 steps: the process's peak RSS (``VmHWM``)
  after the run, and the largest live tensor memory seen inside the right-hand side (every
  50th evaluation, all tensors the garbage collector reaches; the scans make this case's time
  meaningless).

Time in the model: the model's forward calls (``predict``) plus the vector-Jacobian products of
the divergence (``_divergence``: its backward passes through the model and the output
conversion), timed around each call; the ratio is the whole solve's wall time over that time
(the issue's bar: at most 1.5). The rest is the solver's own arithmetic, the path coefficients and
the timestep interpolation.

Usage: python benchmarks/bench_ode_nll.py [--cases mlp_exact,unet_hutchinson,memory] [--ckpt PATH]
  -> benchmarks/out/ode_nll.json (--record: benchmarks/results/ode_nll.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _results import add_output_options, output_path  # noqa: E402  (benchmarks/)

ROOT = Path(__file__).resolve().parent


def _vmhwm_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _model(kind: str, ckpt: str | None) -> Any:
    import torch

    import ddpmcli
    from ddpmcli import core, models

    if ckpt:
        return ddpmcli.load(ckpt)
    shape = (2,) if kind == "mlp" else (1, 16, 16)
    torch.manual_seed(0)
    hp = models.default_hparams(kind, shape)
    net = models.build_model(kind, hp).eval()
    return ddpmcli.wrap(
        net, schedule=core.make_schedule("linear", 1000), prediction_type="epsilon",
        data_shape=shape,
    )  # fmt: skip


def run_case(case: str, steps: int, ckpt: str | None) -> dict[str, Any]:
    """One case in this process: wall time, time in the model, evaluations, peak memory."""
    import torch

    from ddpmcli.run import ode_likelihood as mod

    kind = "mlp" if case in ("mlp_exact", "memory") else "unet"
    model = _model(kind, ckpt if kind == "mlp" else None)
    gen = torch.Generator().manual_seed(1)
    n = 256 if kind == "mlp" else 4
    x0 = torch.rand((n, *model.data_shape), generator=gen) * 1.6 - 0.8
    if case == "mlp_exact":
        settings = mod.OdeSettings(exact_divergence=True, rtol=1e-5, atol=1e-5)
    elif case == "memory":
        settings = mod.OdeSettings(exact_divergence=True, steps=steps)
    else:
        settings = mod.OdeSettings(probes=1, steps=8)
    spent = {"forward": 0.0, "vjp": 0.0, "calls": 0}
    live = {"peak": 0}
    predict = model.predict

    def timed_predict(x: Any, t: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        out = predict(x, t, **kw)
        spent["forward"] += time.perf_counter() - start
        spent["calls"] += 1
        return out

    divergence = mod._divergence

    def timed_divergence(*args: Any) -> Any:
        start = time.perf_counter()
        out = divergence(*args)
        spent["vjp"] += time.perf_counter() - start
        if case == "memory" and spent["calls"] % 50 == 1:  # a scan takes ~0.3 s
            import gc

            gc.collect()
            total = sum(o.numel() * o.element_size() for o in gc.get_objects()
                        if isinstance(o, torch.Tensor))  # fmt: skip
            live["peak"] = max(live["peak"], total)
        return out

    mod._divergence = timed_divergence
    start = time.perf_counter()
    result = mod.ode_likelihood(
        timed_predict, model.schedule, model.prediction_type, x0, settings=settings,
        model_dtype=torch.float32,
    )  # fmt: skip
    wall = time.perf_counter() - start
    in_model = spent["forward"] + spent["vjp"]
    return {
        "case": case, "samples": n, "data_shape": list(model.data_shape), "steps": steps,
        "wall_s": wall, "forward_s": spent["forward"], "vjp_s": spent["vjp"],
        "model_calls": spent["calls"], "evals_per_sample": float(result.evals.double().mean()),
        "ratio_wall_to_model": wall / in_model, "peak_rss_mb": _vmhwm_mb(),
        "live_tensor_peak_mb": live["peak"] / 2**20 if case == "memory" else None,
        "total_bpd": result.total_bpd,
    }  # fmt: skip


def _child(case: str, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--child", case, "--steps", str(steps), "--threads",
           str(args.threads)] + (["--ckpt", args.ckpt] if args.ckpt else [])  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="mlp_exact,unet_hutchinson,memory")
    parser.add_argument("--ckpt", default=None, help="a trained 2-D checkpoint for mlp_exact")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    add_output_options(parser, "ode_nll.json")
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_case(args.child, args.steps, args.ckpt)))
        return
    results = []
    for case in args.cases.split(","):
        for steps in (20, 400) if case == "memory" else (0,):
            row = _child(case, steps, args)
            results.append(row)
            print(json.dumps(row), flush=True)
    record = {
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "threads": args.threads,
        "results": results,
    }
    path = output_path(args, "ode_nll.json")
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
