"""The T5 token count of SD3 and Flux prompt encodings (diffusers' ``max_sequence_length``).

Default as the pipelines' (``StableDiffusion3Pipeline`` 256, ``FluxPipeline`` 512); a given one
(``max_sequence_length=``, ``--max-sequence-length``) gives exactly the pipeline's own prompt
embeddings for that value; past 512 it is refused before any encoder runs (the tokenizer's
``model_max_length`` is no bound: the pipelines ignore it); a model without T5 refuses it.
Tiny folders saved by diffusers' pipelines.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddpmcli.checkpoints import load_checkpoint

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.diffusers, pytest.mark.usefixtures("one_thread")]

import pipeline_folders as pf  # noqa: E402 (tests/ is on sys.path)

PROMPT = "a cat on a mat"


@pytest.fixture
def folders(flow_folders: dict[str, Path]) -> dict[str, Path]:
    return {**flow_folders, "flux": flow_folders["flux-dev"]}  # conftest.flow_folders


def _ours(folder: Path, length: int | None) -> dict[str, torch.Tensor]:
    extra = {} if length is None else {"max_sequence_length": length}
    model = load_checkpoint(folder, prompt=PROMPT, **extra)
    states = model.conditioning.states(PROMPT, torch.zeros(1))
    return dict(states)


@pytest.mark.parametrize("case", ["sd3", "sd3-no-t5", "flux"])
def test_embeddings_equal_the_pipelines_at_a_non_default_length(folders, case) -> None:
    length = 7
    if case == "flux":
        pipe = diffusers.FluxPipeline.from_pretrained(folders[case])
        pe, ppe, _ = pipe.encode_prompt(PROMPT, None, device="cpu", max_sequence_length=length)
    else:
        extra = {"text_encoder_3": None, "tokenizer_3": None} if case == "sd3-no-t5" else {}
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folders[case], **extra)
        pe, _, ppe, _ = pipe.encode_prompt(
            PROMPT, None, None, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=length,
        )  # fmt: skip
    ours = _ours(folders[case], length)
    torch.testing.assert_close(ours["states"], pe.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours["pooled"], ppe.float(), rtol=1e-6, atol=1e-6)
    default = _ours(folders[case], None)["states"].shape[1]  # 256 SD3, 512 Flux more tokens
    extra_tokens = {"flux": 512, "sd3": 256, "sd3-no-t5": 256}[case]
    assert default - ours["states"].shape[1] == extra_tokens - length


def test_limits_and_models_without_t5(cli, folders, tmp_path) -> None:
    sd3 = str(folders["sd3"])
    past = cli("info", sd3, "--max-sequence-length", "513", "-f", "json")
    assert past.exit_code == 2 and past.stdout == ""
    assert past.stderr == (
        "Error: --max-sequence-length 513: the T5 prompt encoding reads 1 to 512 tokens "
        "(diffusers' pipelines allow at most 512)\n"
    )
    assert cli("info", sd3, "--max-sequence-length", "0").exit_code == 2
    ok = cli("info", sd3, "--max-sequence-length", "64", "-f", "json")
    assert ok.exit_code == 0, ok.stderr
    # the tokenizer's own model_max_length is no bound (the pipelines pass max_length
    # themselves): a folder whose tokenizer says 12 reads its default 512 and takes 13 too
    flux = pf.flux_folder(tmp_path / "flux")
    config = flux / "tokenizer_2" / "tokenizer_config.json"
    values = json.loads(config.read_text())
    config.write_text(json.dumps({**values, "model_max_length": 12}))
    for extra in ([], ["--max-sequence-length", "13"]):
        taken = cli("info", str(flux), *extra)
        assert taken.exit_code == 0, taken.stderr
    # a model that reads no T5 (here: the SD3 folder is fine; an unconditional native one not)
    from ddpmcli import core, models
    from ddpmcli.checkpoints import save_native_checkpoint

    net = models.build_model("mlp", models.default_hparams("mlp", (2,)))
    native = save_native_checkpoint(
        tmp_path / "m.pt", net, architecture="mlp", hparams=models.default_hparams("mlp", (2,)),
        schedule=core.make_schedule("linear", 10), prediction_type="epsilon", data_shape=(2,),
    )  # fmt: skip
    refused = cli("info", str(native), "--max-sequence-length", "64")
    assert refused.exit_code == 1
    assert "--max-sequence-length given, but the model reads no T5" in refused.stderr
