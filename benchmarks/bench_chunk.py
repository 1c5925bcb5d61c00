"""The automatic chunk of `ddpm reconstruct` against the plain diffusers loop, at two model sizes.

Issue 8: at google/ddpm-cifar10-32's architecture the old automatic chunk packed all 80 (sample, t)
pairs of ``--n 16 --t 0,250,500,750,999`` into one call: 1.10x the wall time of the plain loop and
1.6x its peak memory. The chunk is now one timestep's batch, or more only while the extra
activations stay small (``ddpmcli.run.chunking``). This runs, each case in a fresh subprocess
(peak RSS its own):

- ``cifar``: a diffusers pipeline folder with google/ddpm-cifar10-32's UNet config (35.7M
  parameters, block_out_channels (128, 256, 256, 256), 2 layers per block, attention at 16x16),
  random weights (speed and memory do not depend on them), the linear 1000-step scheduler;
  16 images, 5 timesteps.
  Cases: ``diffusers`` (``UNet2DModel.from_pretrained``; for each t: ``add_noise``, the UNet at
  batch 16, ``step(...).pred_original_sample``, the mse), ``auto`` (``load_checkpoint`` and
  ``reconstruction_sweep`` with the default chunk), ``chunk16`` and ``chunk8`` (fixed chunks:
  the plain loop's batch, and half of it); ``chunk80`` (the old automatic choice) on request.
- ``mlp``: the built-in 2-D MLP, 256 samples at every 10th of 1000 t: ``diffusers`` (the same
  plain diffusers loop: DDPMScheduler ``add_noise``/``step`` around the bare network at batch
  256), ``plain`` (the sweep at a chunk of one timestep's batch, what a per-t loop does),
  ``auto``, ``chunk4096``.

Statistics. Each case runs ``--repeats`` times (default 5), interleaved (repeat r runs the cases
in an order rotated by r, so no case always follows the same one), each a fresh subprocess. Per
case: the median, min and max of the loop's time (after loading and one warm-up call) and of
the process's peak RSS (``VmHWM``: loading included, the same in every case), the peak RSS
once loaded and warmed up (``load_peak_rss_mb``: what the load alone costs), and the ratio of
medians to the group's first case (the baseline). Peak RSS under glibc's default allocator
moves by ~60 MB between identical runs (its mmap threshold grows as large blocks are freed, and
freed activations then stay in its arenas, depending on the order of earlier frees), so single
readings mean little. ``live``: each cifar case once more with ``MALLOC_MMAP_THRESHOLD_=131072``
(a fixed threshold: every large block is returned when freed), whose peak is the memory really
live at once and repeats to within ~1 MB: the allocator-independent comparison. On a shared
2-core machine timings move by 1.5x between runs: compare ratios within one run. The machine's
load average before and after is recorded.

Usage: python benchmarks/bench_chunk.py [--repeats 5] [--cases cifar:auto,...] [--no-live]
  -> benchmarks/out/chunk.json (--record: benchmarks/results/chunk.json)
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
from typing import Any

import numpy as np
import torch
from _results import add_output_options, output_path  # noqa: E402  (benchmarks/)

ROOT = Path(__file__).resolve().parent
CIFAR_T = [0, 250, 500, 750, 999]
MLP_T = list(range(0, 1000, 10))


def build_cifar(folder: Path) -> Path:
    """A diffusers pipeline folder: the cifar10-32 UNet (random weights) and a DDPM scheduler."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(
        folder / "scheduler"
    )
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    np.save(folder / "x.npy", x.numpy())
    return folder


def build_mlp(folder: Path) -> Path:
    from ddpmcli import core, models
    from ddpmcli.checkpoints import save_native_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    hp = models.default_hparams("mlp", (2,))
    save_native_checkpoint(
        folder / "mlp.pt", models.build_model("mlp", hp), architecture="mlp", hparams=hp,
        schedule=core.make_schedule("linear", 1000), prediction_type="epsilon", data_shape=(2,),
    )  # fmt: skip
    np.save(folder / "ring.npy", np.random.default_rng(0).normal(size=(256, 2)).astype("float32"))
    return folder


def diffusers_loop(folder: Path) -> tuple[float, float]:
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    x0 = torch.from_numpy(np.load(folder / "x.npy"))
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        unet(x0[:1], 0)  # warm-up, as the sweep's first chunk
        loaded = peak_rss_mb()
        began = time.perf_counter()
        for t in CIFAR_T:
            noise = torch.randn(x0.shape, generator=gen)
            x_t = sched.add_noise(x0, noise, torch.tensor([t]))
            eps = unet(x_t, t).sample
            x0_hat = sched.step(eps, t, x_t).pred_original_sample
            float(((x0_hat - x0) ** 2).mean())
        return time.perf_counter() - began, loaded


def diffusers_mlp_loop(folder: Path) -> tuple[float, float]:
    """The plain diffusers loop over the MLP: for each t, ``add_noise``, the network at batch 256,
    ``step(...).pred_original_sample`` and the mse, with diffusers' DDPMScheduler (linear, 1000
    steps: the checkpoint's schedule). The network is loaded as ddpm loads it (diffusers has no
    MLP), and called bare."""
    from diffusers import DDPMScheduler

    from ddpmcli.checkpoints import load_checkpoint

    net = load_checkpoint(folder / "mlp.pt").denoiser
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    x0 = torch.from_numpy(np.load(folder / "ring.npy"))
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        net(x0[:1], torch.zeros(1, dtype=torch.long))  # warm-up, as the sweep's first chunk
        loaded = peak_rss_mb()
        began = time.perf_counter()
        for t in MLP_T:
            noise = torch.randn(x0.shape, generator=gen)
            x_t = sched.add_noise(x0, noise, torch.tensor([t]))
            eps = net(x_t, torch.full((len(x0),), t, dtype=torch.long))
            x0_hat = sched.step(eps, t, x_t).pred_original_sample
            float(((x0_hat - x0) ** 2).mean())
        return time.perf_counter() - began, loaded


def sweep(ckpt: Path, data: Path, ts: list[int], chunk: int | None) -> tuple[float, float, int]:
    from ddpmcli.checkpoints import load_checkpoint
    from ddpmcli.run import reconstruction_sweep

    model = load_checkpoint(ckpt)
    x0 = torch.from_numpy(np.load(data))
    reconstruction_sweep(model, x0[:1], ts[:1], batch_size=1)  # warm-up
    loaded = peak_rss_mb()
    began = time.perf_counter()
    result = reconstruction_sweep(model, x0, ts, batch_size=chunk)
    return time.perf_counter() - began, loaded, result.batch_size


def peak_rss_mb() -> float:
    """This process's peak RSS, ``VmHWM``: the peak of its own memory since ``exec``. (Not
    ``ru_maxrss``, which Linux carries over from the parent's memory across fork and exec: every
    child would report at least the driver's ~490 MB, the size of the cifar folder it built.)"""
    with open("/proc/self/status") as status:
        line = next(s for s in status if s.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def run_case(case: str, folder: Path) -> dict[str, Any]:
    chunk_used: int | None = None
    if case == "cifar:diffusers":
        seconds, loaded = diffusers_loop(folder)
    elif case.startswith("cifar:"):
        fixed = {"auto": None, "chunk16": 16, "chunk8": 8, "chunk80": 80}[case.split(":")[1]]
        seconds, loaded, chunk_used = sweep(folder, folder / "x.npy", CIFAR_T, fixed)
    elif case == "mlp:diffusers":
        seconds, loaded = diffusers_mlp_loop(folder)
    else:
        fixed = {"plain": 256, "auto": None, "chunk4096": 4096}[case.split(":")[1]]
        seconds, loaded, chunk_used = sweep(folder / "mlp.pt", folder / "ring.npy", MLP_T, fixed)
    return {
        "case": case, "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
        "load_peak_rss_mb": loaded, "chunk": chunk_used,
    }  # fmt: skip


def child(case: str, folder: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One case in a fresh interpreter: its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--case", case, "--folder", str(folder)]
    run = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    got: dict[str, Any] = json.loads(run.stdout)
    print(json.dumps(got), file=sys.stderr, flush=True)
    return got


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of each measured figure over a case's runs, and the raw values."""
    row: dict[str, Any] = {"case": runs[0]["case"], "chunk": runs[0]["chunk"], "runs": len(runs)}
    for key in ("seconds", "peak_rss_mb", "load_peak_rss_mb"):
        values = [r[key] for r in runs]
        row[key] = {
            "median": statistics.median(values), "min": min(values), "max": max(values),
            "all": [round(v, 4) for v in values],
        }  # fmt: skip
    return row


def measure(names: list[str], folder: Path, repeats: int) -> list[dict[str, Any]]:
    """Every case ``repeats`` times, interleaved in a rotated order; summaries with the ratios
    of medians to the first case."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            runs[name].append(child(name, folder))
    rows = [summary(runs[name]) for name in names]
    base = rows[0]
    for row in rows:
        for key, ratio in (("seconds", "time_vs_baseline"), ("peak_rss_mb", "rss_vs_baseline")):
            row[ratio] = row[key]["median"] / base[key]["median"]
    return rows


CASES = {
    "cifar": ["cifar:diffusers", "cifar:auto", "cifar:chunk16", "cifar:chunk8"],
    "mlp": ["mlp:diffusers", "mlp:plain", "mlp:auto", "mlp:chunk4096"],
}
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", help="comma-separated cases (default: all but cifar:chunk80)")
    parser.add_argument("--no-live", action="store_true", help="skip the fixed-threshold runs")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    add_output_options(parser, "chunk.json")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, Path(args.folder))))
        return
    cases = CASES
    if args.cases:
        wanted = args.cases.split(",")
        cases = {g: [c for c in wanted if c.startswith(g + ":")] for g in CASES}
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"cifar": build_cifar(Path(tmp) / "cifar"), "mlp": build_mlp(Path(tmp) / "mlp")}
        for group, names in cases.items():
            if names:
                out[group] = measure(names, folders[group], args.repeats)
        if cases["cifar"] and not args.no_live:
            live = [child(c, folders["cifar"], LIVE_ENV) for c in cases["cifar"]]
            out["cifar_live"] = {
                "env": LIVE_ENV,
                "peak_rss_mb": {r["case"]: r["peak_rss_mb"] for r in live},
                "load_peak_rss_mb": {r["case"]: r["load_peak_rss_mb"] for r in live},
            }
    out["load_after"] = os.getloadavg()[0]
    path = output_path(args, "chunk.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
