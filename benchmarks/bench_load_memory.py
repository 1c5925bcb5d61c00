"""Peak memory of loading a big pipeline folder, against the bytes of its weights on disk.

A loader that builds a network with random initial weights and then loads the saved weights into
it holds two copies of the weights at its peak (and spends the time to initialise the first);
one that builds the network without storage (parameters on the meta device) and takes the saved
tensors as its own holds one. This measures which one ddpm does, on a Flux-style pipeline folder
built with diffusers' and transformers' own classes and saved with their own ``save_pretrained``:

- ``text_encoder_2/``: a ``T5EncoderModel`` of ~187M parameters (d_model 1024, 12 layers, 16
  heads x 64, gated d_ff 2816, T5's 32128-token vocabulary), stored in bfloat16 as Flux's T5 is
  (ddpm keeps bfloat16); ``t5_fp16/``: the same T5 saved in float16, as SD3's
  ``text_encoder_3`` ships (ddpm upcasts it to float32: twice its bytes on disk at best);
- ``transformer/``: a ``FluxTransformer2DModel`` of ~160M parameters (768 wide, 4 double and 8
  single blocks, joint attention 1024 wide, guidance embedding), stored in float32;
- tiny CLIP, VAE, tokenizers and the scheduler (tests/pipeline_folders.py's), a few MB.

Cases, each in a fresh interpreter (its peak RSS, ``VmHWM``, its own), after importing torch,
ddpmcli's loaders and the model classes (the baseline, ``VmHWM`` before the load):
``t5`` (``text_encoders.t5_text_encoder``), ``t5-fp16`` (the same on ``t5_fp16/``),
``transformer`` (the transformer, as the folder loader
builds it) and ``pipeline`` (``load_checkpoint(folder, inspect_only=True)``: everything ddpm
loads for ``ddpm info``, the VAE and both text encoders included). Reported per case: the
weights' bytes on disk, the baseline, the peak, ``(peak - baseline) / weights`` (1.0 is one copy
of the weights; 2.0 two), the RSS once loaded and the load's wall time (median, min and max over
``--repeats``). The peak is read after every parameter and buffer of every live module has been
read once (as a first forward pass reads them): safetensors maps its file, and a weight kept as
a view of that map counts in RSS (as file pages) only once read.

Usage: python benchmarks/bench_load_memory.py [--repeats 3] [--folder DIR] [--cases t5,...]
    [--before REF]
  -> benchmarks/out/load_memory.json (--record: benchmarks/results/load_memory.json)
``--before REF`` runs every case also with the ddpmcli of git ``REF`` (``git archive`` into a
scratch folder, put first on ``PYTHONPATH``), interleaved with this checkout's: the recorded
figures compare the loader before this change (``--before f5b0997``) with it. ``--folder DIR``
keeps the built folder there (reused when it exists).
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

from _results import add_output_options, output_path  # noqa: E402  (benchmarks/)

ROOT = Path(__file__).resolve().parent.parent
NAME = "load_memory.json"
CASES = ("t5", "t5-fp16", "transformer", "pipeline")
WEIGHTS = {
    "t5": ("text_encoder_2",),
    "t5-fp16": ("t5_fp16",),
    "transformer": ("transformer",),
    "pipeline": ("transformer", "text_encoder", "text_encoder_2", "vae"),
}


def build_folder(root: Path) -> Path:
    """The Flux-style pipeline folder described above, saved by ``FluxPipeline``."""
    import diffusers
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    import pipeline_folders as pf

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.no_grad():
        net = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=4, num_single_layers=8,
            attention_head_dim=64, num_attention_heads=12, joint_attention_dim=1024,
            pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(8, 28, 28),
        )  # fmt: skip
        t5 = transformers.T5EncoderModel(
            transformers.T5Config(
                vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=12, num_heads=16,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                is_encoder_decoder=False, decoder_start_token_id=0, pad_token_id=0,
                eos_token_id=1,
            )
        ).to(torch.bfloat16)  # fmt: skip
    clip_tok = transformers.CLIPTokenizer.from_pretrained(pf.write_clip_tokenizer(root / "_clip"))
    t5_tok = transformers.T5Tokenizer.from_pretrained(pf.write_t5_tokenizer(root / "_t5"))
    pipe = diffusers.FluxPipeline(
        transformer=net, text_encoder=transformers.CLIPTextModel(pf.clip_config()),
        tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
        vae=pf.tiny_vae(4, scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    )  # fmt: skip
    pipe.save_pretrained(root, safe_serialization=True)
    pf._clean(root)
    (root / "built").write_text("ok\n")
    return root


def build_t5_fp16(root: Path) -> None:
    """``t5_fp16/``: the folder's T5 saved in float16 (as SD3's ``text_encoder_3`` ships),
    which ddpm upcasts to float32 (T5 overflows in float16): twice the bytes on disk."""
    import torch
    import transformers

    t5 = transformers.T5EncoderModel.from_pretrained(root / "text_encoder_2")
    t5.to(torch.float16).save_pretrained(root / "t5_fp16")


def weight_bytes(folder: Path, case: str) -> int:
    return sum(
        f.stat().st_size for sub in WEIGHTS[case] for f in (folder / sub).glob("*.safetensors")
    )


def status_mb(field: str) -> float:
    """``field`` of /proc/self/status (``VmHWM``: this process's peak RSS since exec; not
    ``ru_maxrss``, which Linux carries over from the parent), in MiB."""
    with open("/proc/self/status") as status:
        line = next(s for s in status if s.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def run_case(case: str, folder: Path) -> dict[str, Any]:
    """One case, in this (fresh) interpreter."""
    import diffusers
    import transformers

    from ddpmcli.checkpoints import diffusers as ddpm_diffusers
    from ddpmcli.checkpoints import load_checkpoint, text_encoders

    for name in ("FluxTransformer2DModel", "AutoencoderKL"):
        getattr(diffusers, name)  # the model classes' modules, imported before the baseline
    for name in ("T5EncoderModel", "CLIPTextModel", "T5TokenizerFast", "CLIPTokenizerFast"):
        getattr(transformers, name)
    baseline = status_mb("VmHWM")
    began = time.perf_counter()
    if case in ("t5", "t5-fp16"):
        enc_dir = folder / ("text_encoder_2" if case == "t5" else "t5_fp16")
        kept: Any = text_encoders.t5_text_encoder(enc_dir, str(folder))
    elif case == "transformer":
        net_dir = folder / "transformer"
        config = json.loads((net_dir / "config.json").read_text())
        kept = ddpm_diffusers._build(
            diffusers, "FluxTransformer2DModel", config, net_dir, str(folder)
        )
    else:
        kept = load_checkpoint(folder, inspect_only=True)
    seconds = time.perf_counter() - began
    loaded = status_mb("VmHWM")
    touched = touch_all()
    row = {
        "case": case, "seconds": seconds, "baseline_mb": baseline, "loaded_mb": loaded,
        "peak_mb": status_mb("VmHWM"), "rss_mb": status_mb("VmRSS"), "tensors": touched,
    }  # fmt: skip
    del kept
    return row


def touch_all() -> int:
    """Read every parameter and buffer of every live module once, as a first forward pass
    would: a weight that safetensors maps is in RSS only once read. Returns the tensors read."""
    import gc

    import torch

    seen = 0
    with torch.no_grad():
        for obj in gc.get_objects():
            if isinstance(obj, torch.nn.Module):
                for t in [*obj._parameters.values(), *obj._buffers.values()]:
                    if t is not None and t.device.type != "meta" and t.numel():
                        t.sum()
                        seen += 1
    return seen


def child(case: str, folder: Path, version: str, source: Path) -> dict[str, Any]:
    """One case in a fresh interpreter that imports ddpmcli from ``source``."""
    cmd = [sys.executable, __file__, "--case", case, "--folder", str(folder)]
    env = {**os.environ, "PYTHONPATH": str(source)}
    run = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    got: dict[str, Any] = {"version": version, **json.loads(run.stdout)}
    print(json.dumps(got), file=sys.stderr, flush=True)
    return got


def sources(before: str | None, scratch: Path) -> list[tuple[str, Path]]:
    """``(version, source tree)`` pairs: ``git archive`` of ``before`` first when given, then
    this checkout."""
    here = [("this tree", ROOT)]
    if before is None:
        return here
    out = scratch / "before"
    out.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", before], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return [(f"before ({before})", out), *here]


def summary(version: str, case: str, runs: list[dict[str, Any]], weights: int) -> dict[str, Any]:
    mb = weights / 1024**2
    costs = [r["peak_mb"] - r["baseline_mb"] for r in runs]
    row: dict[str, Any] = {
        "version": version, "case": case, "runs": len(runs), "weights_mb": round(mb, 1)
    }  # fmt: skip
    for key, values in (
        ("baseline_mb", [r["baseline_mb"] for r in runs]),
        ("loaded_mb", [r["loaded_mb"] for r in runs]),
        ("peak_mb", [r["peak_mb"] for r in runs]),
        ("rss_mb", [r["rss_mb"] for r in runs]),
        ("load_cost_mb", costs),
        ("cost_over_weights", [c / mb for c in costs]),
        ("seconds", [r["seconds"] for r in runs]),
    ):
        row[key] = {
            "median": round(statistics.median(values), 3),
            "min": round(min(values), 3),
            "max": round(max(values), 3),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None, help="keep/reuse the folder here")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="", help="a note stored with the figures")
    parser.add_argument(
        "--before", metavar="REF", help="also run the ddpmcli of git REF (git archive), interleaved"
    )
    add_output_options(parser, NAME)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.folder)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or Path(scratch) / "flux"
        if not (folder / "built").is_file():
            began = time.perf_counter()
            build_folder(folder)
            print(f"built {folder} in {time.perf_counter() - began:.0f} s", file=sys.stderr)
        if not (folder / "t5_fp16" / "config.json").is_file():
            build_t5_fp16(folder)
        cases = args.cases.split(",")
        versions = sources(args.before, Path(scratch))
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {
            (v, c): [] for v, _ in versions for c in cases
        }
        load_before = os.getloadavg()
        for r in range(args.repeats):  # interleaved, the order rotated by r
            for case in cases[r % len(cases) :] + cases[: r % len(cases)]:
                for version, source in versions[r % 2 :] + versions[: r % 2]:
                    runs[version, case].append(child(case, folder, version, source))
        rows = [summary(v, c, runs[v, c], weight_bytes(folder, c)) for (v, c) in runs]
    git = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "benchmark": "load_memory", "label": args.label, "git_head": git,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "rows": rows,
    }  # fmt: skip
    out = output_path(args, NAME)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(
            f"{row['version']:20s} {row['case']:12s} weights {row['weights_mb']:8.1f} MB  baseline "
            f"{row['baseline_mb']['median']:7.1f}  peak {row['peak_mb']['median']:7.1f}  "
            f"cost/weights {row['cost_over_weights']['median']:.2f} "
            f"({row['cost_over_weights']['min']:.2f}-{row['cost_over_weights']['max']:.2f})  "
            f"{row['seconds']['median']:.2f} s"
        )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
