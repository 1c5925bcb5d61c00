"""Speed and memory of `ddpm reconstruct` (issue 3's targets), on a small built-in UNet.

(a) memory: the sweep streams (sample, t) pairs in chunks, so its peak memory follows the chunk size
    and stays flat as samples x timesteps grow (up to 64 x 1000). Measured on CPU as the growth of
    the process's peak RSS (``resource.getrusage(...).ru_maxrss``) over its RSS just before the
    sweep, each case in a fresh subprocess; on CUDA as ``torch.cuda.max_memory_allocated()`` over
    the memory allocated before the sweep.
(b) overhead: the full sweep (noise, q_sample, model, x0/eps reconstruction, metrics) against the
    model's own forward passes alone on the same chunks (same shapes, same t); target < 5%.
    Each timing is the best of ``--repeats`` runs, the two interleaved (robust to a busy machine).
    Also the sweep's own cost alone, measured directly: the same sweep with an identity "model"
    whose forward pass costs nothing (``own_cost_s``; ``own_cost_pct`` of the forward passes), a
    figure that load on a shared machine barely moves.
(c) against the loop a user writes with diffusers on the same UNet: for each t,
    ``DDPMScheduler.add_noise``, the forward pass, ``scheduler.step(...).pred_original_sample`` and
    the mse, batch = the n samples (``step`` takes one t at a time), timed in the same repeats as
    the forward passes and the sweep at chunk n (the same batches). Skipped without diffusers.

Untrained weights: speed and memory do not depend on them. The UNet, image size and the timestep
stride default to what 2 CPU cores finish in a few minutes (8x8 images, base 16 channels, every 8th
t for the timings); with ``--device cuda``: 16x16, base 32 channels, every t.

Usage:
    python benchmarks/bench_reconstruct.py                 # CPU
    python benchmarks/bench_reconstruct.py --device cuda   # GPU
Writes benchmarks/out/reconstruct.json (--record: the tracked
benchmarks/results/reconstruct.json) (one entry per device, others kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _results import add_output_options, output_path  # noqa: E402  (benchmarks/)

from ddpmcli import core, models
from ddpmcli.checkpoints import LoadedModel, load_checkpoint, save_native_checkpoint
from ddpmcli.run import (
    auto_chunk_size,
    iter_chunks,
    reconstruction_sweep,
    resolve_device,
)

ROOT = Path(__file__).resolve().parent


def build(args: argparse.Namespace, folder: Path) -> Path:
    """A native checkpoint of an untrained UNet (fixed seed) on the linear schedule."""
    torch.manual_seed(0)
    shape = (1, args.image_size, args.image_size)
    hp = {**models.default_hparams("unet", shape), "base_channels": args.base_channels}
    hp["time_dim"] = 4 * args.base_channels
    net = models.build_model("unet", hp)
    return save_native_checkpoint(
        folder / "unet.pt",
        net,
        architecture="unet",
        hparams=hp,
        schedule=core.make_schedule("linear", args.timesteps),
        prediction_type="epsilon",
        data_shape=shape,
    )


def data(model: LoadedModel, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand((n, *model.data_shape), generator=gen, dtype=torch.float64) * 2 - 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------
# (a) memory


def memory_case(ckpt: Path, device: str, n: int, n_t: int, chunk: int) -> dict[str, Any]:
    """Peak extra memory of one sweep of n samples x n_t timesteps (run in this process)."""
    model = load_checkpoint(ckpt)
    dev = resolve_device(device)
    x0 = data(model, n)
    steps = model.schedule.num_steps
    ts = [round(i * (steps - 1) / max(1, n_t - 1)) for i in range(n_t)]
    reconstruction_sweep(model, x0[:1], [0], batch_size=1, device=dev)  # warm-up: lazy init
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = rss_bytes()
    start = time.perf_counter()
    reconstruction_sweep(model, x0, ts, batch_size=chunk, device=dev)
    sync(dev)
    seconds = time.perf_counter() - start
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - before
        method = "torch.cuda.max_memory_allocated - allocated before"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        method = "ru_maxrss - RSS before the sweep (fresh process)"
    return {
        "n": n,
        "timesteps": n_t,
        "pairs": n * n_t,
        "chunk": chunk,
        "peak_extra_mib": max(0, peak) / 2**20,
        "seconds": seconds,
        "method": method,
    }


def memory(args: argparse.Namespace, ckpt: Path) -> list[dict[str, Any]]:
    t_full = args.timesteps
    t_small = max(2, t_full // 8)
    cases = [(8, t_small, 256), (args.n, t_small, 256), (args.n, t_full, 256)]
    cases += [(args.n, t_small, 64), (args.n, t_small, 1024)]
    out = []
    for n, n_t, chunk in cases:
        if args.device == "cpu":
            cmd = [sys.executable, __file__, "--_child", json.dumps([str(ckpt), n, n_t, chunk])]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            row = memory_case(ckpt, args.device, n, n_t, chunk)
        print(
            f"  memory  n={n:3d} x T={n_t:4d} ({n * n_t:6d} pairs), chunk {chunk:5d}: "
            f"peak +{row['peak_extra_mib']:7.1f} MiB  ({row['seconds']:.1f} s)",
            flush=True,
        )
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# (b) overhead over the model's own forward passes, (c) the diffusers loop


def forward_only(model: LoadedModel, n: int, ts: list[int], chunk: int) -> float:
    """Seconds of the model's forward passes alone over the sweep's chunks (t-major pairs)."""
    dev = model.device
    steps = torch.tensor(ts, dtype=torch.long)
    total = n * len(ts)
    x = torch.randn((chunk, *model.data_shape), device=dev, dtype=model.dtype)
    sync(dev)
    start = time.perf_counter()
    with torch.inference_mode():
        for a, b in iter_chunks(total, chunk):
            t = steps[torch.arange(a, b) // n].to(dev)
            model.predict(x[: b - a], t)
    sync(dev)
    return time.perf_counter() - start


def sweep_time(model: LoadedModel, x0: torch.Tensor, ts: list[int], chunk: int | None) -> float:
    sync(model.device)
    start = time.perf_counter()
    reconstruction_sweep(model, x0, ts, batch_size=chunk, device=model.device, seed=0)
    sync(model.device)
    return time.perf_counter() - start


class IdentityModel:
    """A model whose forward pass costs nothing (returns x_t): the sweep around it is all that is
    timed."""

    def __init__(self, model: LoadedModel) -> None:
        self.schedule = model.schedule
        self.prediction_type = model.prediction_type
        self.data_range = model.data_range
        self.data_shape = model.data_shape

    def to(self, device: Any = None, dtype: Any = None) -> IdentityModel:
        return self

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x_t, None


def own_cost(model: LoadedModel, x0: torch.Tensor, ts: list[int], chunk: int | None) -> float:
    """Seconds of the sweep around a free model (its own work: noise, indexing, formulas, sums)."""
    sync(model.device)
    start = time.perf_counter()
    reconstruction_sweep(
        IdentityModel(model), x0, ts, batch_size=chunk, device=model.device, seed=0
    )
    sync(model.device)
    return time.perf_counter() - start


def diffusers_loop(model: LoadedModel, x0: torch.Tensor, ts: list[int]) -> float | None:
    """The loop a user writes with diffusers: per t, add_noise, forward, step(...).x0, mse."""
    try:
        from diffusers import DDPMScheduler
        from diffusers.utils import logging as dlogging
    except ImportError:
        return None
    dlogging.set_verbosity_error()
    sched: Any = DDPMScheduler(
        num_train_timesteps=model.schedule.num_steps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=True,
    )
    dev = model.device
    x = x0.to(dev, torch.float32)
    gen = torch.Generator(device=dev).manual_seed(0)
    sync(dev)
    start = time.perf_counter()
    errors = []
    with torch.inference_mode():
        for t in ts:
            noise = torch.randn(x.shape, generator=gen, device=dev)
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=dev)
            x_t = sched.add_noise(x, noise, tt)
            eps = model.denoiser(x_t, tt)
            x0_hat = sched.step(eps, t, x_t).pred_original_sample
            errors.append(((x0_hat - x) ** 2).mean())
    torch.stack(errors).cpu()
    sync(dev)
    return time.perf_counter() - start


def best(fn: Any, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def speed(args: argparse.Namespace, ckpt: Path) -> dict[str, Any]:
    dev = resolve_device(args.device)
    model = load_checkpoint(ckpt).to(dev, torch.float32)
    x0 = data(model, args.n)
    ts = list(range(0, model.schedule.num_steps, args.t_stride))
    pairs = args.n * len(ts)
    auto = auto_chunk_size(
        int(torch.tensor(model.data_shape).prod()), pairs, device=dev, bytes_per_element=4
    )
    reconstruction_sweep(model, x0[:4], ts[:2], device=dev)  # warm-up
    forward_only(model, 4, ts[:2], 8)
    out: dict[str, Any] = {"pairs": pairs, "timesteps_evaluated": len(ts), "auto_chunk": auto}
    with_diffusers = not args.no_diffusers and diffusers_loop(model, x0, ts[:2]) is not None
    loops: list[float] = []
    rows = []
    for chunk in (args.n, auto):
        fwd, full = [], []
        for _ in range(args.repeats):  # interleaved, best of each: robust to a busy machine
            fwd.append(forward_only(model, args.n, ts, chunk))
            full.append(sweep_time(model, x0, ts, chunk))
            if with_diffusers and chunk == args.n:  # side by side with the same batches
                loops.append(diffusers_loop(model, x0, ts) or math.inf)
        own = min(own_cost(model, x0, ts, chunk) for _ in range(max(3, args.repeats)))
        row = {
            "chunk": chunk,
            "forward_only_s": min(fwd),
            "sweep_s": min(full),
            "overhead_pct": 100 * (min(full) / min(fwd) - 1),
            "own_cost_s": own,
            "own_cost_pct": 100 * own / min(fwd),
        }
        rows.append(row)
        print(
            f"  speed   chunk {chunk:5d}: forward only {row['forward_only_s']:7.2f} s, sweep "
            f"{row['sweep_s']:7.2f} s, overhead {row['overhead_pct']:+.1f}%; the sweep's own "
            f"work {own:.3f} s ({row['own_cost_pct']:.1f}% of the forward passes)",
            flush=True,
        )
    out["overhead"] = rows
    loop = min(loops) if loops else None
    out["diffusers_loop_s"] = loop
    if loop is None:
        print("  diffusers not installed: (c) skipped", flush=True)
    else:
        ours = rows[0]["sweep_s"]
        out["sweep_vs_diffusers"] = ours / loop
        print(
            f"  diffusers loop (batch {args.n}, per t): {loop:7.2f} s; ddpm sweep at the same "
            f"batch {ours:7.2f} s ({ours / loop:.2f}x), auto chunk {rows[1]['sweep_s']:7.2f} s",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--base-channels", type=int, default=None)
    parser.add_argument("--t-stride", type=int, default=None, help="every k-th t for timings")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--no-diffusers", action="store_true")
    add_output_options(parser, "reconstruct.json")
    parser.add_argument("--note", default=None, help="conditions of the run, kept in the JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = output_path(args, "reconstruct.json")
    if args._child:
        ckpt, n, n_t, chunk = json.loads(args._child)
        print(json.dumps(memory_case(Path(ckpt), "cpu", n, n_t, chunk)))
        return
    gpu = args.device.startswith("cuda")
    args.image_size = args.image_size or (16 if gpu else 8)
    args.base_channels = args.base_channels or (32 if gpu else 16)
    args.t_stride = args.t_stride or (1 if gpu else 8)
    args.repeats = args.repeats or (3 if gpu else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{os.cpu_count()}"
    print(
        f"ddpm reconstruct benchmark on {name}: UNet base {args.base_channels} channels, "
        f"1x{args.image_size}x{args.image_size}, n={args.n}, T={args.timesteps}, "
        f"torch {torch.__version__}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build(args, Path(tmp))
        params = models.count_parameters(load_checkpoint(ckpt).denoiser)  # type: ignore[arg-type]
        result: dict[str, Any] = {
            "device": name,
            "torch": torch.__version__,
            "unet": {
                "base_channels": args.base_channels,
                "image": [1, args.image_size, args.image_size],
                "parameters": params,
            },
            "n": args.n,
            "T": args.timesteps,
            "t_stride_for_timings": args.t_stride,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "repeats": args.repeats,
            "cpu_threads": torch.get_num_threads(),
        }
        if args.note:
            result["note"] = args.note
        if not args.skip_memory:
            result["memory"] = memory(args, ckpt)
        result["speed"] = speed(args, ckpt)
    existing: dict[str, Any] = {}
    if args.out.exists():
        existing = json.loads(args.out.read_text())
    if args.skip_memory and "memory" in existing.get(dev.type, {}):
        result["memory"] = existing[dev.type]["memory"]  # keep the last memory figures
    existing[dev.type] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
