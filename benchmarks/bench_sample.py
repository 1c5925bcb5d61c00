"""Speed of `ddpm sample`'s loop (issue 4's targets) on a diffusers UNet2DModel.

(a) overhead: the whole sampling loop of :func:`ddpmcli.run.sample` (noise, x0_hat, clipping,
    posterior step, the per-step diagnostics row) against the model's own forward passes alone
    (the same UNet, batch and timesteps, called directly); target < 5% per step. Also the loop
    alone, with a model that costs nothing: its own work as a fraction of the forward passes,
    free of the run-to-run noise of two long timings.
(b) against diffusers: ``DDPMPipeline`` (ancestral, fixed_small, clipping) and ``DDIMPipeline``
    (eta = 0) on the same UNet and step count, side by side with ``ddpm sample``'s ddpm and ddim
    samplers. The UNet is loaded through ddpmcli's own loader from a diffusers pipeline folder
    written here (``save_pretrained``), so (a) and (b) time the path ``ddpm sample`` takes.

Untrained weights: speed does not depend on them. Every case runs ``--repeats`` times, interleaved
(so background load hits all cases alike), after one warm-up; the median is reported.
Defaults fit 2 CPU cores in a few minutes (16 images of 3x32x32, a 2-level UNet, 20 steps);
``--device cuda`` uses 64 images and 100 steps.

Usage:
    python benchmarks/bench_sample.py                  # CPU
    python benchmarks/bench_sample.py --device cuda    # GPU
Writes benchmarks/out/sample.json (--record: the tracked
benchmarks/results/sample.json) (one entry per device, others kept) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _results import add_output_options, output_path  # noqa: E402  (benchmarks/)

from ddpmcli.checkpoints import load_checkpoint
from ddpmcli.run import SampleSettings, respaced_schedule, sample


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def build_pipeline_folder(root: Path, image_size: int, channels: tuple[int, ...]) -> Path:
    """A diffusers pipeline folder (unet/ + scheduler/) with a seeded, untrained UNet2DModel."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        norm_num_groups=8,
    )
    unet.save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=None, help="batch (images per run)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice). On a shared or busy machine, 1 avoids "
        "OpenMP threads waiting on each other, which inflates every small op by milliseconds.",
    )
    add_output_options(parser, "sample.json")
    args = parser.parse_args()
    args.out = output_path(args, "sample.json")

    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.n or (64 if gpu else 16)
    steps = args.steps or (100 if gpu else 20)
    channels = (64, 128) if gpu else (32, 64)

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_pipeline_folder(Path(tmp), args.image_size, channels)
        model = load_checkpoint(folder, device=device)
    unet = model.denoiser.unet if hasattr(model.denoiser, "unet") else None
    if unet is None:
        raise SystemExit("the loaded diffusers model does not expose its UNet")
    shape = (n, *model.data_shape)
    schedule = respaced_schedule(model.schedule, steps, "leading")
    model_ts = schedule.timesteps.flip(0).tolist()

    x_in = torch.randn(shape, device=device)

    def forward_only() -> None:
        with torch.inference_mode():
            for t in model_ts:
                unet(x_in, torch.full((n,), t, device=device, dtype=torch.long), return_dict=False)

    def ours(sampler: str) -> Callable[[], object]:
        settings = SampleSettings(sampler=sampler, clip=True, data_range=model.data_range)
        return lambda: sample(
            model.predict, schedule, model.prediction_type, model.data_shape, n=n,
            settings=settings, seed=0, device=device,
        )  # fmt: skip

    def zero_model(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(x), None

    def loop_only() -> None:
        settings = SampleSettings(sampler="ddpm", clip=True, data_range=model.data_range)
        sample(
            zero_model, schedule, model.prediction_type, model.data_shape, n=n,
            settings=settings, seed=0, device=device,
        )  # fmt: skip

    ddpm_pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    ddim_pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    for pipe in (ddpm_pipe, ddim_pipe):
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)

    def diffusers_ddpm() -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        ddpm_pipe(batch_size=n, generator=gen, num_inference_steps=steps, output_type="np")

    def diffusers_ddim() -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        ddim_pipe(batch_size=n, generator=gen, num_inference_steps=steps, eta=0.0, output_type="np")

    cases: dict[str, Callable[[], object]] = {
        "unet forward passes only": forward_only,
        "ddpm sample --sampler ddpm": ours("ddpm"),
        "diffusers DDPMPipeline": diffusers_ddpm,
        "ddpm sample --sampler ddim": ours("ddim"),
        "diffusers DDIMPipeline": diffusers_ddim,
        "ddpm loop alone (zero-cost model)": loop_only,
    }
    for fn in cases.values():  # warm-up (kernels, allocator, lazy imports)
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(_timed(fn, device))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    base = median["unet forward passes only"]
    rows: list[dict[str, Any]] = []
    for name, seconds in median.items():
        rows.append(
            {
                "case": name,
                "seconds": seconds,
                "ms_per_step": 1000 * seconds / steps,
                "vs_forward_only": seconds / base,
                "runs": times[name],
            }
        )
    overhead = {s: median[f"ddpm sample --sampler {s}"] / base - 1 for s in ("ddpm", "ddim")}
    # the loop's own work per step (everything but the forward pass), measured with a model that
    # costs nothing: the overhead free of run-to-run noise in the forward passes
    loop_fraction = median["ddpm loop alone (zero-cost model)"] / base
    vs_diffusers = {
        "ddpm": median["ddpm sample --sampler ddpm"] / median["diffusers DDPMPipeline"],
        "ddim": median["ddpm sample --sampler ddim"] / median["diffusers DDIMPipeline"],
    }
    entry = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "batch": n,
        "image": list(model.data_shape),
        "unet_channels": list(channels),
        "unet_parameters": model.info.get("parameters"),
        "steps": steps,
        "repeats": args.repeats,
        "cases": rows,
        "overhead_vs_forward": overhead,
        "loop_only_vs_forward": loop_fraction,
        "overhead_target": 0.05,
        "ratio_vs_diffusers": vs_diffusers,
    }
    results: dict[str, Any] = {}
    if args.out.exists():
        results = json.loads(args.out.read_text())
    key = device.type if args.threads is None else f"{device.type}-threads{args.threads}"
    results[key] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(
        f"{entry['device_name']} ({device}), batch {n} x {tuple(model.data_shape)}, {steps} steps, "
        f"UNet2DModel {list(channels)} ({entry['unet_parameters']} params), median of "
        f"{args.repeats}"
    )
    print(f"{'case':34s} {'seconds':>9s} {'ms/step':>9s} {'x forward':>10s}")
    for row in rows:
        print(
            f"{row['case']:34s} {row['seconds']:9.3f} {row['ms_per_step']:9.2f} "
            f"{row['vs_forward_only']:10.3f}"
        )
    for sampler in ("ddpm", "ddim"):
        print(
            f"{sampler}: overhead over forward passes {100 * overhead[sampler]:+.1f}% "
            f"(target < 5%); time vs diffusers {vs_diffusers[sampler]:.3f}x"
        )
    print(
        f"the ddpm loop's own work (zero-cost model): {100 * loop_fraction:.2f}% of the forward "
        "passes"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
