"""Speed and memory of conditional and latent models (issue 9's targets), on CPU.

(a) a class-conditional diffusers ``UNet2DModel`` (3x32x32, labels ``0-9`` cycled over the
    samples): :func:`ddpmcli.api.sample` against the model's own forward passes alone, the same
    calls replayed straight into the UNet (same count, batch, timesteps and labels, recorded from
    the run itself); plain, and with classifier-free guidance (scale 3), whose forward passes are
    one call per step at batch 2B. The model calls are counted (guided: must equal the steps).
(b) a DiT pipeline (``DiTTransformer2DModel`` on 4x16x16 latents of a small ``AutoencoderKL``,
    3x32x32 images, learned sigma): :func:`ddpmcli.api.reconstruct` of n images at k timesteps
    against the forward passes alone (replayed as in (a)) plus one VAE encode of the n images;
    the VAE encode calls are counted (one per group of images, none per t). Peak RSS of two
    (n, T) sizes, each in a fresh subprocess, shows memory flat in samples x timesteps.

(c) with ``--text``: a text-conditioned flow transformer at DiT-S/2's size (an
    ``SD3Transformer2DModel``: width 384 = 6 heads x 64, 12 layers, patch 2, on 4x32x32 latents;
    MM-DiT blocks carry a text branch too, so about twice DiT-S/2's parameters; tiny CLIP-L,
    CLIP-G and T5 encoders, T5 read at SD3's 256 tokens): :func:`ddpmcli.api.reconstruct` of n
    images at k timesteps with a prompt and classifier-free guidance (scale 3), against the
    forward passes alone (replayed with the very keyword inputs recorded from the run) plus one
    VAE encode; the text-encoder calls are counted (once per encoder and prompt, the empty
    prompt included, on the first run; none after) and so are the transformer calls (guidance
    is one batched call of both halves).

For each, the run's own work is also timed directly with a denoiser that costs nothing (returns
zeros of the right shape; labels, guidance, formulas and metrics still run): a figure that load on
a shared machine barely moves (median of ``--repeats`` runs).

Timing on a shared machine: by default every time is this process's CPU time
(``time.process_time``; torch runs on ``--threads`` threads, 1 by default), which other
processes do not stretch the way they stretch wall-clock time (they still share caches and
memory bandwidth); ``--clock wall`` times wall-clock. The cases are interleaved over
``--repeats`` rounds after a warm-up, in alternating order (ABC, CBA, ...), so a slow spell
falls on every case alike. The overhead is computed per round, from the cases timed next to each
other (run / baseline - 1), and reported as the median and the spread (min, max) of those paired
ratios; the ratio of the best times is kept too. Every run is kept in the JSON.

The baseline is the model's own work only, which any loop over these inputs must also do: the
forward passes (the very calls the run made, replayed) and, for a latent model, one VAE encode of
the images; not the noising, the x0 formulas or the metrics, which are the overhead measured.

Untrained, seeded weights built here from configs (no hub): speed and memory do not depend on
them. Defaults take about 2.5 minutes on 2 CPU cores; ``--quick`` about half a minute.

Usage:
    python benchmarks/bench_conditional.py            # --threads 1 --clock cpu --repeats 7
    python benchmarks/bench_conditional.py --quick
    python benchmarks/bench_conditional.py --clock wall   # on a quiet machine
Writes benchmarks/out/conditional.json (--record: the tracked
benchmarks/results/conditional.json) (one entry per mode, others kept) and prints a table;
the figures for the README come from a quiet machine (load average in the JSON).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _results import add_output_options, output_path  # noqa: E402  (benchmarks/)
from torch import Tensor

from ddpmcli import api
from ddpmcli.checkpoints import LoadedModel, load_checkpoint

ROOT = Path(__file__).resolve().parent
CLASSES = 10
LABELS = "0-9"


# ---------------------------------------------------------------------------------------------
# models, written as diffusers pipeline folders


def build_unet_folder(root: Path, channels: tuple[int, ...]) -> Path:
    """unet/ (a class-conditional UNet2DModel, 3x32x32, a null label) and scheduler/."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=channels,
        layers_per_block=1, down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=8,
        num_class_embeds=CLASSES + 1,
    )  # fmt: skip
    unet.save_pretrained(root / "unet", safe_serialization=True)
    config_path = root / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["null_class_label"] = CLASSES
    config_path.write_text(json.dumps(config))
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return root


DIT_SIZES: dict[str, dict[str, Any]] = {
    # a toy DiT on 4x16x16 latents of 3x32x32 images
    "tiny": {"heads": 4, "head_dim": 16, "layers": 2, "latent": 16, "image": 32, "vae": (16, 32)},
    # DiT-S/2's transformer (Peebles & Xie: width 384, 12 layers, 6 heads, patch 2) on 4x32x32
    # latents of 256x256 images, with a small VAE of the same downsampling (8x)
    "s2": {"heads": 6, "head_dim": 64, "layers": 12, "latent": 32, "image": 256,
           "vae": (16, 32, 32, 32)},
}  # fmt: skip


def build_dit_folder(root: Path, size: str = "tiny") -> Path:
    """transformer/ (DiT, learned sigma), vae/ (AutoencoderKL images -> 4-channel latents),
    scheduler/, at one of :data:`DIT_SIZES`."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    dims = DIT_SIZES[size]
    torch.manual_seed(0)
    net = DiTTransformer2DModel(
        num_attention_heads=dims["heads"], attention_head_dim=dims["head_dim"], in_channels=4,
        out_channels=8, num_layers=dims["layers"], sample_size=dims["latent"], patch_size=2,
        num_embeds_ada_norm=CLASSES, norm_num_groups=4,
    )  # fmt: skip
    with torch.no_grad():  # diffusers zero-initialises the adaLN-zero and output layers
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    net.save_pretrained(root / "transformer", safe_serialization=True)
    blocks = dims["vae"]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
        latent_channels=4, norm_num_groups=8, sample_size=dims["image"], layers_per_block=1,
    )  # fmt: skip
    vae.save_pretrained(root / "vae", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range").save_pretrained(
        root / "scheduler"
    )
    return root


def build_sd3_folder(root: Path) -> Path:
    """An SD3 pipeline folder (tests/pipeline_folders.py's tiny one: VAE, CLIP-L, CLIP-G, T5,
    FlowMatchEuler shift 3) whose transformer is replaced by one at DiT-S/2's size."""
    from diffusers import SD3Transformer2DModel

    sys.path.insert(0, str(ROOT.parent / "tests"))
    import pipeline_folders as pf

    pf.sd3_folder(root)
    torch.manual_seed(0)
    net = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=12,
        attention_head_dim=64, num_attention_heads=6, joint_attention_dim=32,
        caption_projection_dim=384, pooled_projection_dim=16, pos_embed_max_size=32,
    )  # fmt: skip
    with torch.no_grad():  # diffusers zero-initialises the output layers
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    net.save_pretrained(root / "transformer", safe_serialization=True)
    return root


def parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# recording the calls a run makes, replaying them into the bare network


Call = tuple[int, Tensor, Tensor | None]
"""One forward pass of the bare network: its batch, timesteps and class labels."""


def recorded_calls(net: torch.nn.Module, run: Callable[[], object]) -> list[Call]:
    """The forward passes ``run`` makes into ``net`` (a pre-hook on the module itself, so it
    sees the calls whatever wraps or moves the network)."""
    calls: list[Call] = []

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        labels = kwargs.get("class_labels")
        calls.append(
            (int(args[0].shape[0]), args[1].clone(), None if labels is None else labels.clone())
        )

    _while_hooked(net, hook, run)
    return calls


def _while_hooked(
    net: torch.nn.Module, hook: Callable[..., None], run: Callable[[], object]
) -> None:
    """``run()`` with ``hook`` as a forward pre-hook (with kwargs) on ``net``, removed after."""
    handle = net.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()


def replay(net: Any, calls: list[Call], shape: tuple[int, ...]) -> Callable[[], None]:
    """The bare network's forward passes for ``calls`` (inputs drawn once, outside the timing)."""
    x = torch.randn((max(b for b, _, _ in calls), *shape))

    def forward_only() -> None:
        with torch.inference_mode():
            for b, t, labels in calls:
                net(x[:b], t, class_labels=labels, return_dict=False)

    return forward_only


def own_work(net: torch.nn.Module, out_channels: int, run: Callable[[], object]) -> float:
    """Seconds of ``run`` with the network's forward swapped for a free one (zeros of
    ``out_channels`` channels): everything the run does around the model."""

    def free(x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor]:
        return (torch.zeros((x.shape[0], out_channels, *x.shape[2:]), dtype=x.dtype),)

    net.forward = free
    try:
        return timed(run)
    finally:
        del net.forward


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def timed(fn: Callable[[], object]) -> float:
    """Seconds of ``fn()`` on :data:`clock` (``--clock``)."""
    start = clock()
    fn()
    return clock() - start


def interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each case per round, ``repeats`` rounds after a warm-up, the order of the
    cases reversed every other round."""
    for fn in cases.values():  # warm-up
        fn()
    runs: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(timed(cases[name]))
    return runs


def paired_overhead(
    runs: dict[str, list[float]], run: str, baseline: tuple[str, ...]
) -> dict[str, Any]:
    """The overhead of ``run`` over the sum of the ``baseline`` cases, in percent, per round
    (cases timed next to each other), as median and spread; and from the best times."""
    base = [sum(parts) for parts in zip(*(runs[b] for b in baseline), strict=True)]
    pct = [100 * (full / ref - 1) for full, ref in zip(runs[run], base, strict=True)]
    best = 100 * (min(runs[run]) / sum(min(runs[b]) for b in baseline) - 1)
    return {
        "overhead_pct": statistics.median(pct),
        "overhead_min_pct": min(pct),
        "overhead_max_pct": max(pct),
        "overhead_best_pct": best,
        "overhead_per_round_pct": pct,
    }


def own_work_pct(seconds: list[float], forward_s: float) -> dict[str, Any]:
    """The zero-cost runs' seconds as a share of the median forward-only time."""
    return {
        "own_work_s": statistics.median(seconds),
        "own_work_pct": 100 * statistics.median(seconds) / forward_s,
        "own_work_min_pct": 100 * min(seconds) / forward_s,
        "own_work_runs_s": seconds,
    }


# ---------------------------------------------------------------------------------------------
# (a) sample on a class-conditional UNet


def bench_sample(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    n, steps = args.n_sample, args.steps
    plain = load_checkpoint(folder, class_label=LABELS)
    guided = load_checkpoint(folder, class_label=LABELS, guidance_scale=3.0)
    models = {"plain": plain, "guided s=3": guided}
    unets = {name: m.denoiser.unet for name, m in models.items()}  # type: ignore[attr-defined]
    unet = unets["plain"]
    out: dict[str, Any] = {
        "model": f"UNet2DModel {list(args.channels)}, 3x32x32, {CLASSES} classes + null",
        "parameters": parameters(unet),
        "n": n,
        "steps": steps,
        "sampler": "ddpm",
        "class_label": LABELS,
    }
    cases: dict[str, Callable[[], object]] = {}
    calls: dict[str, list[Call]] = {}
    for name, model in (("plain", plain), ("guided s=3", guided)):

        def run(model: LoadedModel = model) -> object:
            return api.sample(model, n=n, steps=steps, seed=0)

        calls[name] = recorded_calls(unets[name], run)
        cases[f"sample {name}"] = run
        cases[f"forward only {name}"] = replay(unets[name], calls[name], model.data_shape)
    runs = interleaved(cases, args.repeats)
    for name in models:
        fwd = statistics.median(runs[f"forward only {name}"])
        own = [own_work(unets[name], 3, cases[f"sample {name}"]) for _ in range(args.repeats)]
        out[name] = {
            "model_calls": len(calls[name]),
            "call_batches": sorted({b for b, _, _ in calls[name]}),
            "forward_only_s": fwd,
            "sample_s": statistics.median(runs[f"sample {name}"]),
            **paired_overhead(runs, f"sample {name}", (f"forward only {name}",)),
            **own_work_pct(own, fwd),
            "runs": {
                "forward_only": runs[f"forward only {name}"],
                "sample": runs[f"sample {name}"],
            },
        }
    return out


# ---------------------------------------------------------------------------------------------
# (b) reconstruct on a DiT pipeline


def images(n: int, side: int = 32) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand((n, 3, side, side), generator=gen) * 2 - 1


def spread(T: int, k: int) -> list[int]:
    return [round(i * (T - 1) / max(1, k - 1)) for i in range(k)]


def bench_reconstruct(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    model = load_checkpoint(folder, class_label=LABELS)
    latent = model.latent
    if latent is None:
        raise SystemExit(f"{folder}: not a latent model")
    net = model.denoiser.unet  # type: ignore[attr-defined]
    n, k = args.n_rec, args.k_rec
    ts = spread(model.schedule.num_steps, k)
    dims = DIT_SIZES[args.dit_size]
    x = images(n, dims["image"])

    def run() -> object:
        return api.reconstruct(model, x, t=ts, seed=0)

    encodes: list[int] = []
    encode = latent.vae.encode

    def counting(part: Tensor) -> Any:
        encodes.append(int(part.shape[0]))
        return encode(part)

    latent.vae.encode = counting
    calls = recorded_calls(net, run)
    latent.vae.encode = encode
    cases: dict[str, Callable[[], object]] = {
        "reconstruct": run,
        "forward only": replay(net, calls, model.data_shape),
        "vae encode": lambda: latent.encode(x),
    }
    runs = interleaved(cases, 2 * args.repeats)  # short runs: twice the rounds
    median = {name: statistics.median(ts) for name, ts in runs.items()}
    latents = latent.encode(x)  # the zero-cost run: its own work, without the VAE
    own = [
        own_work(net, 8, lambda: api.reconstruct(model, latents, t=ts, seed=0))
        for _ in range(2 * args.repeats)
    ]
    return {
        "model": f"DiTTransformer2DModel {dims['heads']} heads x {dims['head_dim']}, "
        f"{dims['layers']} layers, patch 2, on 4x{dims['latent']}x{dims['latent']} latents; "
        f"AutoencoderKL {list(dims['vae'])} 3x{dims['image']}x{dims['image']}",
        "parameters": {"dit": parameters(net), "vae": parameters(latent.vae)},
        "n_images": n,
        "timesteps": k,
        "pairs": n * k,
        "class_label": LABELS,
        "model_calls": len(calls),
        "call_batches": sorted({b for b, _, _ in calls}),
        "vae_encode_calls": len(encodes),
        "vae_encode_rows": sum(encodes),
        "forward_only_s": median["forward only"],
        "vae_encode_s": median["vae encode"],
        "reconstruct_s": median["reconstruct"],
        **paired_overhead(runs, "reconstruct", ("forward only", "vae encode")),
        "overhead_vs_denoiser_only_pct": paired_overhead(runs, "reconstruct", ("forward only",))[
            "overhead_pct"
        ],
        **own_work_pct(own, median["forward only"]),
        "runs": runs,
    }


KwCall = dict[str, Any]
"""One keyword-only forward pass (SD3's transformer), its tensors cloned."""


def recorded_kw_calls(net: torch.nn.Module, run: Callable[[], object]) -> list[KwCall]:
    calls: list[KwCall] = []

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append({k: v.clone() if isinstance(v, Tensor) else v for k, v in kwargs.items()})

    _while_hooked(net, hook, run)
    return calls


TEXT_ENCODERS = ("CLIPTextModelWithProjection", "T5EncoderModel")


def counting_text_encoders(counts: list[str]) -> Any:
    """A global forward pre-hook that appends the class name of every text-encoder call to
    ``counts`` (its handle)."""

    def hook(module: torch.nn.Module, _: Any) -> None:
        if type(module).__name__ in TEXT_ENCODERS:
            counts.append(type(module).__name__)

    return torch.nn.modules.module.register_module_forward_pre_hook(hook)


def bench_text_flow(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    model = load_checkpoint(folder, prompt="a cat on a mat", guidance_scale=3.0)
    latent, text = model.latent, model.conditioning
    if latent is None or text is None:
        raise SystemExit(f"{folder}: not a text-conditioned latent model")
    net = model.denoiser.net  # type: ignore[attr-defined]
    n, k = args.n_text, args.k_text
    ts = spread(model.schedule.num_steps, k)
    x = images(n, 64)  # the tiny VAE halves: 4x32x32 latents

    def run() -> object:
        return api.reconstruct(model, x, t=ts, seed=0)

    text_calls: list[str] = []
    handle = counting_text_encoders(text_calls)
    try:
        calls = recorded_kw_calls(net, run)
        first_run_text_calls = len(text_calls)
        run()
        later_run_text_calls = len(text_calls) - first_run_text_calls
    finally:
        handle.remove()

    def forward_only() -> None:
        with torch.inference_mode():
            for kw in calls:
                net(**kw)

    cases: dict[str, Callable[[], object]] = {
        "reconstruct": run,
        "forward only": forward_only,
        "vae encode": lambda: latent.encode(x),
    }
    runs = interleaved(cases, args.repeats)
    median = {name: statistics.median(v) for name, v in runs.items()}
    latents = latent.encode(x)

    def free(*_: Any, **kw: Any) -> tuple[Tensor]:
        return (torch.zeros_like(kw["hidden_states"]),)

    own = []
    for _ in range(2 * args.repeats):
        net.forward = free
        try:
            own.append(timed(lambda: api.reconstruct(model, latents, t=ts, seed=0)))
        finally:
            del net.forward
    return {
        "model": "SD3Transformer2DModel 6 heads x 64, 12 layers, patch 2, on 4x32x32 latents; "
        "tiny CLIP-L, CLIP-G, T5 (256 tokens); AutoencoderKL [8, 16] 3x64x64",
        "parameters": {"transformer": parameters(net), "vae": parameters(latent.vae)},
        "n_images": n,
        "timesteps": k,
        "guidance_scale": 3.0,
        "text_encoder_calls_first_run": first_run_text_calls,
        "text_encoder_calls_later_runs": later_run_text_calls,
        "model_calls": len(calls),
        "call_batches": sorted({int(kw["hidden_states"].shape[0]) for kw in calls}),
        "tokens_per_call": int(calls[0]["encoder_hidden_states"].shape[1]),
        "forward_only_s": median["forward only"],
        "vae_encode_s": median["vae encode"],
        "reconstruct_s": median["reconstruct"],
        **paired_overhead(runs, "reconstruct", ("forward only", "vae encode")),
        **own_work_pct(own, median["forward only"]),
        "runs": runs,
    }


def spread_text(r: dict[str, Any]) -> str:
    """``+1.2% (-0.5 .. +3.0, best +1.0)``: median, spread and best-time overhead."""
    return (
        f"{r['overhead_pct']:+.1f}% (rounds {r['overhead_min_pct']:+.1f} .. "
        f"{r['overhead_max_pct']:+.1f}, best times {r['overhead_best_pct']:+.1f})"
    )


def peak_rss_bytes() -> int:
    """This process's own peak RSS (``VmHWM``; ``ru_maxrss`` would carry the parent's peak over
    fork and exec, and the parent holds both models)."""
    with open("/proc/self/status") as status:
        line = next(s for s in status if s.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_case(folder: Path, n: int, k: int, args_size: str = "tiny") -> dict[str, Any]:
    """Peak RSS growth of one reconstruct of n images x k timesteps (run in a fresh process)."""
    model = load_checkpoint(folder, class_label=LABELS)
    x = images(n, DIT_SIZES[args_size]["image"])
    ts = spread(model.schedule.num_steps, k)
    api.reconstruct(model, x[:1], t=[0], seed=0)  # warm-up: lazy init
    before = rss_bytes()
    start = time.perf_counter()
    api.reconstruct(model, x, t=ts, seed=0)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes() - before
    return {
        "n_images": n,
        "timesteps": k,
        "pairs": n * k,
        "peak_extra_mib": max(0, peak) / 2**20,
        "rss_before_mib": before / 2**20,
        "seconds": seconds,
    }


def bench_memory(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    rows = []
    for n, k in args.memory_sizes:
        child = json.dumps([str(folder), n, k, args.dit_size])
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--_child", child]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"  memory  {n:3d} images x {k:4d} t ({n * k:6d} pairs): peak +"
            f"{row['peak_extra_mib']:6.1f} MiB over {row['rss_before_mib']:.0f} MiB "
            f"({row['seconds']:.1f} s)",
            flush=True,
        )
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None)
    add_output_options(parser, "conditional.json")
    parser.add_argument("--note", default=None, help="conditions of the run, kept in the JSON")
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default="cpu", help="process CPU time or wall clock"
    )
    parser.add_argument(
        "--dit-size", choices=list(DIT_SIZES), default="tiny",
        help="s2: only the DiT reconstruct, at DiT-S/2's size (8 images x 4 t; minutes)",
    )  # fmt: skip
    parser.add_argument(
        "--text", action="store_true",
        help="only (c): reconstruct with a prompt and CFG on an SD3 transformer of DiT-S/2's size",
    )  # fmt: skip
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = output_path(args, "conditional.json")
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    if args._child:
        folder, n, k, args.dit_size = json.loads(args._child)
        print(json.dumps(memory_case(Path(folder), n, k, args.dit_size)))
        return
    quick = args.quick
    args.channels = (16, 32) if quick else (32, 64)
    args.n_sample, args.steps = (4, 4) if quick else (8, 20)
    args.n_rec, args.k_rec = (4, 4) if quick else (32, 32)
    args.memory_sizes = [(4, 8), (16, 32)] if quick else [(8, 32), (64, 256)]
    args.repeats = args.repeats or (2 if quick else 7)
    big = args.dit_size != "tiny"
    if big:
        args.n_rec, args.k_rec, args.memory_sizes = 8, 4, []
        args.repeats = min(args.repeats, 2)
    args.n_text, args.k_text = (2, 2) if quick else (4, 4)
    if args.text:
        args.repeats = min(args.repeats, 3)
    load_before = os.getloadavg()
    print(
        f"conditional/latent benchmark, cpu x{os.cpu_count()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), load average {load_before[0]:.2f}",
        flush=True,
    )
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    start = time.perf_counter()
    if args.text:
        text_main(args, load_before, start)
        return
    with tempfile.TemporaryDirectory() as tmp:
        dit_dir = build_dit_folder(Path(tmp) / "dit", args.dit_size)
        s = {} if big else bench_sample(args, build_unet_folder(Path(tmp) / "cc", args.channels))
        if not big:
            print(
                f"(a) {s['model']} ({s['parameters']} params), ddpm sample n={s['n']}, "
                f"{s['steps']} steps, labels {LABELS}",
                flush=True,
            )
            for name in ("plain", "guided s=3"):
                r = s[name]
                print(
                    f"  {name:10s}: {r['model_calls']:3d} model calls of batch "
                    f"{r['call_batches']}; forward only {r['forward_only_s']:.3f} s, "
                    f"sample {r['sample_s']:.3f} s, "
                    f"overhead {spread_text(r)}; own work {r['own_work_pct']:.2f}%",
                    flush=True,
                )
        r = bench_reconstruct(args, dit_dir)
        print(
            f"(b) DiT {r['parameters']['dit']} params + VAE {r['parameters']['vae']}: reconstruct "
            f"{r['n_images']} images x {r['timesteps']} t",
            flush=True,
        )
        print(
            f"  {r['model_calls']} model calls of batch {r['call_batches']}; VAE encode calls "
            f"{r['vae_encode_calls']} ({r['vae_encode_rows']} images); forward only "
            f"{r['forward_only_s']:.3f} s + encode {r['vae_encode_s']:.3f} s, reconstruct "
            f"{r['reconstruct_s']:.3f} s, overhead {spread_text(r)}; own work "
            f"{r['own_work_pct']:.2f}%",
            flush=True,
        )
        memory = bench_memory(args, dit_dir)
    entry: dict[str, Any] = {
        **run_facts(args, load_before, start),
        "sample_class_conditional_unet": s,
        "reconstruct_dit": r,
        "memory_dit_reconstruct": memory,
    }
    key = f"cpu-threads{args.threads}" + ("-quick" if quick else "") + ("-dit-s2" if big else "")
    write_entry(args, key, entry)


def run_facts(args: argparse.Namespace, load_before: tuple[float, ...], start: float) -> dict:
    """What every entry records about the run: machine, versions, timing, command, load."""
    return {
        "device": platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "torch_threads": args.threads,
        "repeats": args.repeats,
        "timing": "median and spread of the overhead per interleaved round (times: medians)",
        "clock": "process CPU time" if args.clock == "cpu" else "wall clock",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "seconds_total": time.perf_counter() - start,
        "overhead_target_pct": 5.0,
        **({"note": args.note} if args.note else {}),
    }


def text_main(args: argparse.Namespace, load_before: tuple[float, ...], start: float) -> None:
    """(c) alone: the text-conditioned SD3 transformer at DiT-S/2's size."""
    with tempfile.TemporaryDirectory() as tmp:
        r = bench_text_flow(args, build_sd3_folder(Path(tmp) / "sd3"))
    print(
        f"(c) SD3 transformer {r['parameters']['transformer']} params: reconstruct "
        f"{r['n_images']} images x {r['timesteps']} t, prompt, CFG 3; text encoder calls "
        f"{r['text_encoder_calls_first_run']} (first run), {r['text_encoder_calls_later_runs']} "
        f"(later); {r['model_calls']} model calls of batch {r['call_batches']} "
        f"({r['tokens_per_call']} text tokens); forward only {r['forward_only_s']:.3f} s + encode "
        f"{r['vae_encode_s']:.3f} s, reconstruct {r['reconstruct_s']:.3f} s, overhead "
        f"{spread_text(r)}; own work {r['own_work_pct']:.2f}%",
        flush=True,
    )
    key = f"cpu-threads{args.threads}" + ("-quick" if args.quick else "") + "-sd3-s2-text"
    write_entry(args, key, {**run_facts(args, load_before, start), "reconstruct_sd3_text": r})


def write_entry(args: argparse.Namespace, key: str, entry: dict[str, Any]) -> None:
    """``entry`` under ``key`` in the results file (other entries kept)."""
    results: dict[str, Any] = {}
    if args.out.exists():
        results = json.loads(args.out.read_text())
    results[key] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({entry['seconds_total']:.0f} s)")


if __name__ == "__main__":
    main()
