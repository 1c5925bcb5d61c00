"""The built-in networks: shapes, learned-variance channels, TorchScript and torch.export."""

from __future__ import annotations

import warnings

import pytest
import torch

from ddpmcli import models
from ddpmcli.errors import CheckpointError

CASES = [("mlp", (2,)), ("mlp", (5,)), ("unet", (1, 8, 8)), ("unet", (3, 7, 6))]


def _small(arch: str, shape: tuple[int, ...], learned: bool) -> torch.nn.Module:
    hp = models.default_hparams(arch, shape, learned_variance=learned)
    hp.update(
        {"hidden": 16, "num_blocks": 1, "time_dim": 8}
        if arch == "mlp"
        else {"base_channels": 8, "time_dim": 16, "groups": 4}
    )
    torch.manual_seed(0)
    return models.build_model(arch, hp).eval()


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize(("arch", "shape"), CASES)
def test_output_shape(arch: str, shape: tuple[int, ...], learned: bool) -> None:
    model = _small(arch, shape, learned)
    x = torch.randn(3, *shape)
    out = model(x, torch.tensor([0, 10, 999]))
    want = list(x.shape)
    want[1] *= 2 if learned else 1
    assert list(out.shape) == want
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("arch", "shape"), [CASES[0], CASES[2]])
def test_torchscript_and_export_match_eager(arch: str, shape: tuple[int, ...]) -> None:
    model = _small(arch, shape, learned=False)
    x, t = torch.randn(4, *shape), torch.tensor([0, 1, 500, 999])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (x, t), dynamic_shapes=({0: batch}, {0: batch}))
    x2, t2 = torch.randn(6, *shape), torch.randint(0, 1000, (6,))
    with torch.no_grad():
        ref = model(x2, t2)
        torch.testing.assert_close(scripted(x2, t2), ref)
        torch.testing.assert_close(program.module()(x2, t2), ref)


def test_time_embedding_float32_under_bfloat16() -> None:
    model = _small("mlp", (2,), False).to(torch.bfloat16)
    out = model(torch.randn(2, 2, dtype=torch.bfloat16), torch.tensor([999, 998]))
    assert out.dtype == torch.bfloat16
    emb = models.timestep_embedding(torch.tensor([999, 998]), 8)
    assert emb.dtype == torch.float32 and not torch.equal(emb[0], emb[1])


def test_registry_errors() -> None:
    with pytest.raises(CheckpointError, match="unknown architecture 'resnet'"):
        models.build_model("resnet", {})
    with pytest.raises(CheckpointError, match="bad hyper-parameters"):
        models.build_model("mlp", {"nope": 1})
    with pytest.raises(CheckpointError, match="needs an image shape"):
        models.default_hparams("unet", (2,))
