"""The automatic chunk of `ddpm reconstruct` against the plain diffusers loop, at two model sizes.

Issue 8: at google/ddpm-cifar10-32's architecture the old automatic chunk packed all 80 (sample, t)
pairs of ``--n 16 --t 0,250,500,750,999`` into one call: 1.10x the wall time of the plain loop and
1.6x its peak memory. The chunk now starts at one timestep's batch and grows only while it pays
(``ddpmcli.run.chunking``). This runs, each case in a fresh subprocess (peak RSS its own):

- ``cifar``: a diffusers pipeline folder with google/ddpm-cifar10-32's UNet config (35.7M
  parameters, block_out_channels (128, 256, 256, 256), 2 layers per block, attention at 16x16),
  random weights (speed and memory do not depend on them), the linear 1000-step scheduler;
  16 images, 5 timesteps.
  Cases: ``diffusers`` (for each t: ``add_noise``, the UNet at batch 16, ``step(...)
  .pred_original_sample``, the mse), ``auto`` (``reconstruction_sweep`` with the default chunk),
  ``chunk16`` and ``chunk80`` (fixed chunks: the plain loop's batch, and the old automatic choice).
- ``mlp``: the built-in 2-D MLP, 256 samples at every 10th of 1000 t: ``plain`` (the sweep at a
  chunk of one timestep's batch, what a per-t loop does), ``auto``, ``chunk4096``.

Time: the loop only (after loading and one warm-up call), best of ``--repeats`` runs, the cases
interleaved; peak RSS: the child's ``ru_maxrss`` (whole process, same loading in every case).
``chunk`` is the result's ``batch_size``: for ``auto`` the cap the chunk may grow to, not the size
it settled on. The machine's load average before and after is recorded: on a shared 2-core
machine timings move by 1.5x between repeats, so compare only cases of one run.

Usage: python benchmarks/bench_chunk.py [--repeats 2]  -> benchmarks/results/chunk.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def diffusers_loop(folder: Path) -> float:
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    x0 = torch.from_numpy(np.load(folder / "x.npy"))
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        unet(x0[:1], 0)  # warm-up, as the sweep's first chunk
        began = time.perf_counter()
        for t in CIFAR_T:
            noise = torch.randn(x0.shape, generator=gen)
            x_t = sched.add_noise(x0, noise, torch.tensor([t]))
            eps = unet(x_t, t).sample
            x0_hat = sched.step(eps, t, x_t).pred_original_sample
            float(((x0_hat - x0) ** 2).mean())
        return time.perf_counter() - began


def sweep(ckpt: Path, data: Path, ts: list[int], chunk: int | None) -> tuple[float, int]:
    from ddpmcli.checkpoints import load_checkpoint
    from ddpmcli.run import reconstruction_sweep

    model = load_checkpoint(ckpt)
    x0 = torch.from_numpy(np.load(data))
    reconstruction_sweep(model, x0[:1], ts[:1], batch_size=1)  # warm-up
    began = time.perf_counter()
    result = reconstruction_sweep(model, x0, ts, batch_size=chunk)
    return time.perf_counter() - began, result.batch_size


def run_case(case: str, folder: Path) -> dict[str, Any]:
    chunk_used: int | None = None
    if case == "cifar:diffusers":
        seconds = diffusers_loop(folder)
    elif case.startswith("cifar:"):
        fixed = {"auto": None, "chunk16": 16, "chunk80": 80}[case.split(":")[1]]
        seconds, chunk_used = sweep(folder, folder / "x.npy", CIFAR_T, fixed)
    else:
        fixed = {"plain": 256, "auto": None, "chunk4096": 4096}[case.split(":")[1]]
        seconds, chunk_used = sweep(folder / "mlp.pt", folder / "ring.npy", MLP_T, fixed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": case, "seconds": seconds, "peak_rss_mb": peak / 2**20, "chunk": chunk_used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, Path(args.folder))))
        return
    cases = {
        "cifar": ["cifar:diffusers", "cifar:auto", "cifar:chunk16", "cifar:chunk80"],
        "mlp": ["mlp:plain", "mlp:auto", "mlp:chunk4096"],
    }
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"cifar": build_cifar(Path(tmp) / "cifar"), "mlp": build_mlp(Path(tmp) / "mlp")}
        for group, names in cases.items():
            best: dict[str, dict[str, Any]] = {}
            for _ in range(args.repeats):
                for case in names:
                    where = str(folders[group])
                    cmd = [sys.executable, __file__, "--case", case, "--folder", where]
                    got = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
                    print(json.dumps(got), file=sys.stderr)
                    if case not in best or got["seconds"] < best[case]["seconds"]:
                        best[case] = got
            base = best[names[0]]
            for row in best.values():
                row["time_vs_baseline"] = row["seconds"] / base["seconds"]
                row["rss_vs_baseline"] = row["peak_rss_mb"] / base["peak_rss_mb"]
            out[group] = list(best.values())
    out["load_after"] = os.getloadavg()[0]
    path = ROOT / "results" / "chunk.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
