"""Config fields of SD3/Flux folders that the network would only trip on inside its first call
are checked at load, one line naming the file and the field (hostile round 4): T5's
``relative_attention_max_distance`` (0 or below: "math domain error" at step 0), a layer norm's
epsilon (NaN loaded and the first step gave NaN), Flux's ``axes_dims_rope`` (a split that is not
the head dimension: reported as a wrong data shape)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.diffusers, pytest.mark.usefixtures("one_thread")]

import pipeline_folders as pf  # noqa: E402 (tests/ is on sys.path)

from ddpmcli.checkpoints import load_checkpoint  # noqa: E402
from ddpmcli.errors import CheckpointError  # noqa: E402


@pytest.fixture
def flux(flow_folders: dict[str, Path]) -> Path:
    return flow_folders["flux-dev"]  # read-only: _edited copies it


def _edited(flux: Path, tmp_path: Path, member: str, field: str, value: object) -> Path:
    root = tmp_path / "edited"
    shutil.copytree(flux, root)
    path = root / member / "config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    return root


@pytest.mark.parametrize(
    ("member", "field", "value", "words"),
    [
        ("text_encoder_2", "relative_attention_max_distance", -5,
         "relative_attention_max_distance must be an integer in 1..1048576, got -5"),
        ("text_encoder_2", "layer_norm_epsilon", float("nan"),
         "layer_norm_epsilon must be a number in (0, 1), got nan"),
        ("text_encoder", "layer_norm_eps", 0, "layer_norm_eps must be a number in (0, 1), got 0"),
        ("transformer", "axes_dims_rope", [1, 1, 1],
         "axes_dims_rope must be three positive even sizes adding up to attention_head_dim 8, "
         "got [1, 1, 1]"),
        ("transformer", "axes_dims_rope", [2, 2, 2], "adding up to attention_head_dim 8"),
        ("transformer", "guidance_embeds", "yes",
         "guidance_embeds must be true or false, got 'yes'"),
    ],
)  # fmt: skip
def test_a_bad_field_is_one_line_at_load(flux, tmp_path, member, field, value, words) -> None:
    root = _edited(flux, tmp_path, member, field, value)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(root, prompt="a cat")
    line = str(caught.value)
    assert "\n" not in line and f"{member}/config.json" in line and words in line, line


def test_the_saved_fields_pass(flux) -> None:
    load_checkpoint(flux, prompt="a cat")  # diffusers' and transformers' own defaults


def test_a_listed_t5_that_is_missing_is_an_error(tmp_path: Path, flow_folders) -> None:
    """model_index.json lists text_encoder_3 but the folder lost it: diffusers' from_pretrained
    fails; ddpm loaded it as 'CLIP-L, CLIP-G (no T5)' without a word. Saved without T5 (the
    index says [null, null]) it still loads."""
    sd3 = pf.sd3_folder(tmp_path / "sd3")
    shutil.rmtree(sd3 / "text_encoder_3")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(sd3, prompt="a cat")
    assert "model_index.json lists text_encoder_3, but text_encoder_3/config.json is missing" in (
        str(caught.value)
    )
    without = flow_folders["sd3-no-t5"]
    index = json.loads((without / "model_index.json").read_text())
    assert index.get("text_encoder_3") in (None, [None, None])
    load_checkpoint(without, prompt="a cat")
