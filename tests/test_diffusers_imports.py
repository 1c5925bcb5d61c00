"""Loading a diffusers folder imports no more of diffusers (or transformers) than its model
classes need (issue 9).

The floor, measured in a fresh interpreter for diffusers 0.42 (what diffusers itself imports for
the classes a folder needs, however they are named: ``diffusers.UNet2DModel`` and
``from diffusers.models.unets.unet_2d import UNet2DModel`` import the same ~205 modules):

- ``diffusers`` is a lazy module, but its ``models.unets`` and ``models.transformers`` packages
  import every model of their family eagerly, and ``unet_2d_blocks`` reaches into
  ``models.transformers``: one ``UNet2DModel`` brings all UNets and all transformer models (not the
  autoencoders, controlnets or any pipeline); ``AutoencoderKL`` adds ``models.autoencoders``.
- ``diffusers.models.modeling_utils`` imports ``diffusers.quantizers``, whose
  ``pipe_quant_config`` imports ``transformers.utils.quantization_config`` whenever transformers
  is installed: ~140 transformers modules come with any diffusers model, text encoder or not.
  Nothing short of hiding transformers from diffusers avoids that (it would break diffusers'
  own use of it in the same process), so it is part of the floor.

So importing from the precise submodules gains nothing, and ``ddpmcli.checkpoints.diffusers``
takes the classes from the lazy top-level module. These tests load a tiny unconditional
``UNet2DModel`` folder, a class-conditional one, a DiT pipeline (with its VAE) and a Stable
Diffusion-style pipeline (with its CLIP text encoder and tokenizer), an SDXL-style one (two CLIP
encoders), an SD3 one (CLIP-L, CLIP-G, T5) and a Flux one (CLIP, T5) in fresh interpreters and
check that the modules of diffusers, transformers and their helpers loaded afterwards are a subset
of that floor (the same classes imported by name, nothing else): no pipeline, no scheduler class
beyond the floor, no other model family, transformers' CLIP only for the text pipelines and T5
only for SD3 and Flux.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.diffusers, pytest.mark.usefixtures("one_thread")]

FAMILIES = ("diffusers", "transformers", "tokenizers", "accelerate", "peft", "huggingface_hub")
SNAPSHOT = (
    "import json, sys\n"
    f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FAMILIES!r})))\n"
)

UNET = "import diffusers\ndiffusers.UNet2DModel\n"
FLOORS = {
    "unet": UNET,
    "class-conditional unet": UNET,
    "dit": "import diffusers\ndiffusers.DiTTransformer2DModel\ndiffusers.AutoencoderKL\n",
    "sd": (
        "import diffusers, transformers\ndiffusers.UNet2DConditionModel\n"
        "diffusers.AutoencoderKL\ntransformers.CLIPTextModel\ntransformers.CLIPTextConfig\n"
        "transformers.CLIPTokenizer\n"
    ),
    "sdxl": (
        "import diffusers, transformers\ndiffusers.UNet2DConditionModel\n"
        "diffusers.AutoencoderKL\ntransformers.CLIPTextModel\n"
        "transformers.CLIPTextModelWithProjection\ntransformers.CLIPTextConfig\n"
        "transformers.CLIPTokenizer\n"
    ),
    "sd3": (
        "import diffusers, transformers\ndiffusers.SD3Transformer2DModel\n"
        "diffusers.AutoencoderKL\ntransformers.CLIPTextModelWithProjection\n"
        "transformers.CLIPTextConfig\ntransformers.CLIPTokenizer\ntransformers.T5EncoderModel\n"
        "transformers.T5Config\ntransformers.T5Tokenizer\n"
    ),
    "flux": (
        "import diffusers, transformers\ndiffusers.FluxTransformer2DModel\n"
        "diffusers.AutoencoderKL\ntransformers.CLIPTextModel\ntransformers.CLIPTextConfig\n"
        "transformers.CLIPTokenizer\ntransformers.T5EncoderModel\ntransformers.T5Config\n"
        "transformers.T5Tokenizer\n"
    ),
}
OPTIONS = {"unet": "", "class-conditional unet": ", class_label='1'", "dit": ", class_label='2'"}


def _modules(code: str) -> set[str]:
    """The modules of :data:`FAMILIES` loaded after ``code`` runs in a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code + SNAPSHOT], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _plain_unet_folder(root: Path) -> Path:
    """unet/ (an unconditional UNet2DModel, 3x8x8) and scheduler/."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
    )  # fmt: skip
    unet.save_pretrained(root / "unet", safe_serialization=True)
    diffusers.DDPMScheduler(num_train_timesteps=20).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[set[str], set[str]]]:
    """``{case: (floor, ours)}``: the modules after importing the classes a folder needs, and
    after ``load_checkpoint`` of the folder; 12 fresh interpreters, two at a time."""
    import pipeline_folders as pf  # the SDXL/SD3/Flux builders (tests/ is on sys.path)
    import test_conditional as tc  # the conditional suite's builders

    root = tmp_path_factory.mktemp("imports")
    folders = {
        "unet": _plain_unet_folder(root / "unet"),
        "class-conditional unet": tc._unet_folder(root / "cc"),
        "dit": tc.dit_folder(root / "dit"),
        "sd": tc.sd_folder(tmp_path_factory.mktemp("sd")),  # writes into an existing root
        "sdxl": pf.sdxl_folder(tmp_path_factory.mktemp("sdxl")),
        "sd3": pf.sd3_folder(tmp_path_factory.mktemp("sd3")),
        "flux": pf.flux_folder(tmp_path_factory.mktemp("flux")),
    }
    calls = {
        case: f"load_checkpoint({str(folder)!r}{OPTIONS.get(case, '')})\n"
        for case, folder in folders.items()
    }
    # both UNets in one interpreter: their union within the floor is each within it
    both = calls["unet"] + calls["class-conditional unet"]
    calls["unet"] = calls["class-conditional unet"] = both
    loads = {
        case: f"from ddpmcli.checkpoints import load_checkpoint\n{call}"
        for case, call in calls.items()
    }
    codes = sorted(set(FLOORS.values()) | set(loads.values()))
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = dict(zip(codes, pool.map(_modules, codes), strict=True))
    return {case: (found[FLOORS[case]], found[loads[case]]) for case in folders}


@pytest.mark.parametrize("case", list(FLOORS))
def test_loading_imports_nothing_beyond_the_floor(
    snapshots: dict[str, tuple[set[str], set[str]]], case: str
) -> None:
    floor, ours = snapshots[case]
    assert "diffusers.models.modeling_utils" in ours  # the snapshot sees the imports at all
    assert sorted(ours - floor) == []
    assert [m for m in ours if m.startswith("diffusers.pipelines")] == []
    assert [m for m in ours if m.startswith("diffusers.models.controlnets")] == []
    assert [m for m in ours if m.startswith("diffusers.schedulers.scheduling_ddpm")] == []
    has_vae = case != "unet" and case != "class-conditional unet"
    assert any(m.startswith("diffusers.models.autoencoders") for m in ours) == has_vae
    text = case in ("sd", "sdxl", "sd3", "flux")
    assert ("transformers.models.clip.modeling_clip" in ours) == text
    assert ("transformers.models.t5.modeling_t5" in ours) == (case in ("sd3", "flux"))


def test_a_placed_model_is_not_walked_again(tmp_path: Path) -> None:
    """Moving a loaded model where it already is skips torch's walk over its submodules (the
    sweep moves its model once per call); a real move still happens."""
    from ddpmcli.checkpoints import load_checkpoint

    model = load_checkpoint(_plain_unet_folder(tmp_path))
    net = model.denoiser.unet  # type: ignore[attr-defined]
    walks: list[object] = []
    apply = net._apply

    def counting(fn: object, *args: object, **kwargs: object) -> object:
        walks.append(fn)
        return apply(fn, *args, **kwargs)

    net._apply = counting
    moved = model.to("cpu", torch.float32)
    assert walks == [] and moved.denoiser.unet is net  # type: ignore[attr-defined]
    moved = model.to("cpu", torch.float64)
    assert len(walks) == 1
    assert next(moved.denoiser.unet.parameters()).dtype == torch.float64  # type: ignore[attr-defined]
