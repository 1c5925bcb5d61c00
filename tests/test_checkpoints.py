"""Every checkpoint format round-trips to the same predictions; every bad file is one clear line."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from ddpmcli import checkpoints, core, data, models
from ddpmcli.errors import CheckpointError

SCHEDULE = core.make_schedule("cosine", 50)


def _model(
    shape: tuple[int, ...] = (2,), learned: bool = False
) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    arch = "mlp" if len(shape) == 1 else "unet"
    hp = models.default_hparams(arch, shape, learned_variance=learned)
    hp.update(
        {"hidden": 16, "num_blocks": 1, "time_dim": 8}
        if arch == "mlp"
        else {"base_channels": 8, "time_dim": 16, "groups": 4}
    )
    torch.manual_seed(0)
    return models.build_model(arch, hp).eval(), arch, hp


def _native(
    path: Path, shape: tuple[int, ...] = (2,), learned: bool = False, **kw: Any
) -> torch.nn.Module:
    model, arch, hp = _model(shape, learned)
    checkpoints.save_native_checkpoint(
        path,
        model,
        architecture=arch,
        hparams=hp,
        schedule=SCHEDULE,
        prediction_type="v",
        data_shape=shape,
        learned_variance=learned,
        **kw,
    )
    return model


def _inputs(shape: tuple[int, ...], n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn((n, *shape), generator=g), torch.randint(0, 50, (n,), generator=g)


def _same_predictions(loaded: checkpoints.LoadedModel, model: torch.nn.Module) -> None:
    x, t = _inputs(loaded.data_shape)
    with torch.inference_mode():
        pred, var = loaded.predict(x, t)
        ref = model(x, t)
    got = pred if var is None else torch.cat([pred, var], dim=1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)])
def test_native_round_trip(tmp_path: Path, shape: tuple[int, ...], learned: bool) -> None:
    refs = torch.randn(4, *shape)
    model = _native(
        tmp_path / "c.pt", shape, learned, reference_samples=refs, training={"steps": 3}
    )
    loaded = checkpoints.load_checkpoint(tmp_path / "c.pt")
    assert loaded.info["format"] == "native"
    assert loaded.info["parameters"] == models.count_parameters(model)
    assert loaded.info["training"] == {"steps": 3}
    assert loaded.prediction_type == "v_prediction" and loaded.learned_variance is learned
    assert loaded.data_shape == shape and loaded.data_range == (-1.0, 1.0)
    torch.testing.assert_close(loaded.schedule.alpha_bar, SCHEDULE.alpha_bar, rtol=0, atol=0)
    assert loaded.reference_samples is not None
    torch.testing.assert_close(loaded.reference_samples, refs)
    _same_predictions(loaded, model)
    # the file is plain data: torch's safe unpickler reads it without any allow-listing
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["format"] == "ddpmcli" and raw["version"] == checkpoints.FORMAT_VERSION


def test_native_explicit_betas_and_to_dtype(tmp_path: Path) -> None:
    model, arch, hp = _model()
    betas = torch.linspace(1e-4, 0.05, 20, dtype=torch.float64)
    payload = checkpoints.checkpoint_metadata(SCHEDULE, "eps", (2,))
    payload.update(
        schedule={"betas": betas}, architecture=arch, hparams=hp, state_dict=model.state_dict()
    )
    torch.save(payload, tmp_path / "b.pt")
    loaded = checkpoints.load_checkpoint(tmp_path / "b.pt", dtype=torch.float64)
    torch.testing.assert_close(loaded.schedule.beta, betas)
    x, t = _inputs((2,))
    assert loaded.predict(x.double(), t)[0].dtype == torch.float64


@pytest.mark.parametrize("learned", [False, True])
def test_torchscript_with_extra_file(tmp_path: Path, learned: bool) -> None:
    shape = (1, 8, 8)
    model, _, _ = _model(shape, learned)
    meta = checkpoints.checkpoint_metadata(SCHEDULE, "epsilon", shape, learned_variance=learned)
    checkpoints.save_torchscript(model, tmp_path / "s.pt", meta)
    loaded = checkpoints.load_checkpoint(tmp_path / "s.pt", trust_program=True)
    assert loaded.info["format"] == "torchscript"
    assert loaded.schedule.num_steps == 50 and loaded.learned_variance is learned
    _same_predictions(loaded, model)


def test_torchscript_metadata_from_sidecar_and_flags(tmp_path: Path) -> None:
    model, _, _ = _model()
    checkpoints.save_torchscript(model, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="pass kind .*prediction_type, data_shape") as e:
        checkpoints.load_checkpoint(tmp_path / "s.pt", trust_program=True)
    shown = e.value.render(lambda p: "--" + p.replace("_", "-"))  # as the CLI shows it
    assert "no kind, prediction-type, data-shape in the checkpoint's metadata; " in shown
    assert "pass --kind (and --timesteps), --prediction-type, --data-shape (or add" in shown
    loaded = checkpoints.load_checkpoint(
        tmp_path / "s.pt",
        kind="linear",
        timesteps=50,
        prediction_type="x0",
        data_shape=(2,),
        trust_program=True,
    )
    assert loaded.prediction_type == "sample" and loaded.schedule.name.startswith("linear")
    _same_predictions(loaded, model)
    meta = checkpoints.checkpoint_metadata(SCHEDULE, "v", (2,))
    (tmp_path / "s.pt.ddpm.json").write_text(json.dumps(meta))
    assert (
        checkpoints.load_checkpoint(tmp_path / "s.pt", trust_program=True).prediction_type
        == "v_prediction"
    )


@pytest.mark.parametrize("dynamic", [True, False])
def test_export_program(tmp_path: Path, dynamic: bool) -> None:
    model, _, _ = _model((2,))
    meta = checkpoints.checkpoint_metadata(SCHEDULE, "epsilon", (2,))
    example = _inputs((2,), n=2)
    checkpoints.save_exported_program(
        model, tmp_path / "e.pt2", example, meta, dynamic_batch=dynamic
    )
    loaded = checkpoints.load_checkpoint(tmp_path / "e.pt2")
    assert loaded.info["format"] == "export"
    _same_predictions(loaded, model)  # batch 5: chunked and padded when the batch is static


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "ddpmcli", "payload": Evil()}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"x": Evil()}, f, protocol=2)
    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(CheckpointError) as info:
            checkpoints.load_checkpoint(tmp_path / name)
        assert "\n" not in str(info.value)
    assert "refused to load" in str(
        pytest.raises(CheckpointError, checkpoints.load_checkpoint, tmp_path / "evil.pt").value
    )
    assert not marker.exists()


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    _native(tmp / "good.pt")
    blob = (tmp / "good.pt").read_bytes()
    (tmp / "trunc.pt").write_bytes(blob[: len(blob) // 2])
    (tmp / "rand.pt").write_bytes(bytes(reversed(range(256))) * 8)
    (tmp / "empty.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, tmp / "plain.pt")
    torch.save([1, 2, 3], tmp / "list.pt")
    good = torch.load(tmp / "good.pt", weights_only=True)
    torch.save({**good, "state_dict": {"w": torch.zeros(1)}}, tmp / "keys.pt")
    sd = dict(good["state_dict"])
    sd["inp.weight"] = torch.zeros(16, 3)
    torch.save({**good, "state_dict": sd}, tmp / "shapes.pt")
    torch.save({**good, "data_shape": [3]}, tmp / "datashape.pt")
    torch.save({**good, "version": 99}, tmp / "version.pt")
    torch.save({**good, "prediction_type": "score"}, tmp / "pred.pt")
    return {
        "truncated": (tmp / "trunc.pt", "truncated or corrupt"),
        "random": (tmp / "rand.pt", "not a torch checkpoint"),
        "empty": (tmp / "empty.pt", "empty"),
        "wrong format dict": (tmp / "plain.pt", "not a ddpmcli checkpoint"),
        "not a dict": (tmp / "list.pt", "not a ddpmcli checkpoint"),
        "mismatched keys": (tmp / "keys.pt", "state dict does not match"),
        "mismatched shapes": (tmp / "shapes.pt", "'inp.weight' has shape"),
        "wrong data shape": (
            tmp / "datashape.pt",
            "data shape [3] does not fit the mlp network (data_dim=2)",
        ),
        "future version": (tmp / "version.pt", "version 99"),
        "bad prediction type": (tmp / "pred.pt", "score"),
        "missing": (tmp / "nope.pt", "not found"),
    }


def test_bad_checkpoints_one_line(tmp_path: Path) -> None:
    for label, (path, message) in _bad_files(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            checkpoints.load_checkpoint(path)
        text = str(info.value)
        assert message in text, (label, text)
        assert "\n" not in text and len(text) < 400, (label, text)


def test_corrupt_torchscript_zip(tmp_path: Path) -> None:
    model, _, _ = _model()
    checkpoints.save_torchscript(model, tmp_path / "s.pt", {})
    with zipfile.ZipFile(tmp_path / "s.pt") as zf, zipfile.ZipFile(tmp_path / "bad.pt", "w") as out:
        for name in zf.namelist():
            out.writestr(name, b"junk" if name.endswith("data.pkl") else zf.read(name))
    with pytest.raises(CheckpointError, match="corrupt TorchScript"):
        checkpoints.load_checkpoint(
            tmp_path / "bad.pt",
            kind="linear",
            prediction_type="eps",
            data_shape=(2,),
            trust_program=True,
        )


def test_learned_variance_hint(tmp_path: Path) -> None:
    model, _, _ = _model((2,), learned=True)
    checkpoints.save_torchscript(
        model, tmp_path / "s.pt", checkpoints.checkpoint_metadata(SCHEDULE, "eps", (2,))
    )
    with pytest.raises(CheckpointError, match="pass learned_variance") as caught:
        checkpoints.load_checkpoint(tmp_path / "s.pt", trust_program=True)
    # the library names the parameter; the CLI's error boundary shows the flag
    assert caught.value.render(lambda p: "--" + p.replace("_", "-")).endswith(
        "(twice the channels: pass --learned-variance)"
    )


# ---------------------------------------------------------------------------------------------
# diffusers


def _diffusers_unet(learned: bool = False) -> Any:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=2 if learned else 1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


@pytest.mark.diffusers
@pytest.mark.parametrize("layout", ["pipeline", "bare", "bin"])
def test_diffusers_folder(tmp_path: Path, layout: str) -> None:
    unet = _diffusers_unet(learned=layout == "bare")
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=50, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    if layout == "bare":
        unet.save_pretrained(tmp_path)
        loaded = checkpoints.load_checkpoint(
            tmp_path, kind="linear", timesteps=50, prediction_type="eps"
        )
        assert loaded.learned_variance and loaded.prediction_type == "epsilon"
    else:
        unet.save_pretrained(tmp_path / "unet", safe_serialization=layout == "pipeline")
        scheduler.save_config(tmp_path / "scheduler")
        loaded = checkpoints.load_checkpoint(tmp_path)
        assert loaded.prediction_type == "v_prediction"
        torch.testing.assert_close(
            loaded.schedule.alpha_bar, scheduler.alphas_cumprod.double(), rtol=1e-5, atol=1e-6
        )
    assert loaded.info["format"] == "diffusers" and loaded.data_shape == (1, 8, 8)
    x, t = _inputs((1, 8, 8))
    with torch.inference_mode():
        pred, var = loaded.predict(x, t)
        ref = unet(x, t).sample
    torch.testing.assert_close(pred if var is None else torch.cat([pred, var], 1), ref)


@pytest.mark.diffusers
def test_diffusers_folder_errors(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers folder"):
        checkpoints.load_checkpoint(tmp_path / "empty")
    unet = _diffusers_unet()
    unet.save_pretrained(tmp_path / "u")
    with pytest.raises(CheckpointError, match="pass kind"):
        checkpoints.load_checkpoint(tmp_path / "u")
    weights = tmp_path / "u" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        checkpoints.load_checkpoint(tmp_path / "u", kind="linear", prediction_type="eps")


def test_missing_diffusers_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(CheckpointError, match=r"pip install 'ddpmcli\[diffusers\]'"):
        checkpoints.load_checkpoint(tmp_path)


def test_builtin_reference_samples_fit(tmp_path: Path) -> None:
    refs = data.builtin_dataset("moons", 6, 0)
    _native(tmp_path / "c.pt", reference_samples=refs)
    loaded = checkpoints.load_checkpoint(tmp_path / "c.pt")
    assert loaded.reference_samples is not None and loaded.reference_samples.shape == (6, 2)


def test_learned_variance_inferred_without_metadata(tmp_path: Path) -> None:
    model, _, _ = _model((2,), learned=True)
    checkpoints.save_torchscript(model, tmp_path / "s.pt")
    loaded = checkpoints.load_checkpoint(
        tmp_path / "s.pt",
        kind="linear",
        timesteps=50,
        prediction_type="eps",
        data_shape=(2,),
        trust_program=True,
    )
    assert loaded.learned_variance
    _same_predictions(loaded, model)
