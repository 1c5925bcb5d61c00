"""Networks are built without random initial weights and take the saved tensors as their own
(``checkpoints.loaded.build_loaded``): one copy of the weights at the peak of a load, not two
(benchmarks/bench_load_memory.py measures it). Here: no parameter, buffer or tensor attribute is
left on the meta device; every one equals what diffusers' and transformers' own loaders give
(non-persistent buffers such as CLIP's ``position_ids`` included); outputs equal the pipelines'
own denoiser calls; the fallbacks (a constructor that needs real parameters, a buffer derived
from a parameter) and the refusals (keys, shapes, a tensor nothing can compute)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ddpmcli.checkpoints import loaded
from ddpmcli.errors import CheckpointError

# ---------------------------------------------------------------------------------------------
# build_loaded on small modules of our own


class _Net(nn.Module):
    """A linear layer, a tied copy of it, a non-persistent buffer computed from nothing, and a
    record of the device its parameters had while the constructor ran."""

    devices: list[str] = []

    def __init__(self, derived: bool = False, needs_values: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.tied = nn.Linear(3, 2, bias=False)
        self.tied.weight = self.lin.weight
        self.register_buffer("steps", torch.arange(4.0), persistent=False)
        _Net.devices.append(self.lin.weight.device.type)
        if derived:  # a buffer no file holds, computed from a parameter
            self.register_buffer("doubled", self.lin.weight * 2, persistent=False)
        if needs_values:  # a constructor that reads its parameters' values
            float(self.lin.weight.detach().sum())

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + self.tied(x) + self.steps[:2]


def _state(dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 3, generator=gen).to(dtype)
    return {"lin.weight": weight, "lin.bias": torch.randn(2, generator=gen).to(dtype),
            "tied.weight": weight}  # fmt: skip


def _build(state: dict[str, Tensor], **kwargs: Any) -> nn.Module:
    return loaded.build_loaded(
        lambda: _Net(**kwargs), lambda _, __: state, "ckpt", bad_config="ckpt: bad config"
    )


def test_built_on_meta_then_given_the_weights() -> None:
    _Net.devices.clear()
    state = _state()
    net = _build(state)
    assert _Net.devices == ["meta"]  # no random initial weights were made
    assert loaded.left_on_meta(net) == []
    assert net.lin.weight.data_ptr() == state["lin.weight"].data_ptr()  # taken, not copied
    assert net.tied.weight.data_ptr() == net.lin.weight.data_ptr()
    torch.testing.assert_close(net.steps, torch.arange(4.0))  # computed by the constructor
    x = torch.randn(5, 3)
    want = 2 * (x @ state["lin.weight"].T) + state["lin.bias"] + torch.arange(2.0)
    torch.testing.assert_close(net(x), want)


def test_one_dtype_kept_mixed_dtypes_cast_to_the_modules_tied_values_cast_once() -> None:
    half = _build(_state(torch.float16))
    assert half.lin.weight.dtype == torch.float16 and half.steps.dtype == torch.float16
    mixed = _state(torch.float16)
    mixed["lin.bias"] = mixed["lin.bias"].float()
    net = _build(mixed)
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert net.tied.weight.data_ptr() == net.lin.weight.data_ptr()
    torch.testing.assert_close(net.lin.weight, mixed["lin.weight"].float(), rtol=0, atol=0)


def test_weights_to_be_cast_are_read_again_each_in_memory_of_its_own() -> None:
    calls: list[bool] = []

    def read(module: nn.Module, cast: loaded.Cast | None) -> dict[str, Tensor]:
        calls.append(cast is not None)
        return mixed if cast is None else {k: cast(k, v) for k, v in mixed.items()}

    mixed = _state(torch.float16)
    mixed["lin.bias"] = mixed["lin.bias"].float()  # mixed dtypes: the module stays float32
    loaded.build_loaded(_Net, read, "ckpt", bad_config="bad")
    assert calls == [False, True]  # views of a mapped file would all stay until the last cast
    calls.clear()
    mixed = _state(torch.float16)  # one dtype: kept, nothing cast, the file's views taken
    loaded.build_loaded(_Net, read, "ckpt", bad_config="bad")
    assert calls == [False]


def test_a_buffer_derived_from_a_parameter_is_recomputed_by_a_real_build() -> None:
    _Net.devices.clear()
    state = _state()
    net = _build(state, derived=True)
    assert _Net.devices == ["meta", "cpu"]
    assert loaded.left_on_meta(net) == []
    torch.testing.assert_close(net.lin.weight, state["lin.weight"], rtol=0, atol=0)


def test_a_constructor_that_reads_its_parameters_is_run_for_real() -> None:
    _Net.devices.clear()
    net = _build(_state(), needs_values=True)
    assert _Net.devices == ["meta", "cpu"] and loaded.left_on_meta(net) == []


def test_keys_shapes_and_bad_configs_are_refused_as_before() -> None:
    state = _state()
    with pytest.raises(CheckpointError, match=r"ckpt: .*1 missing \(e.g. 'lin.bias'\)"):
        _build({k: v for k, v in state.items() if k != "lin.bias"})
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e.g. 'extra'\)"):
        _build({**state, "extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"'lin.bias' has shape \[3\], the model wants \[2\]"):
        _build({**state, "lin.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"'lin.bias' has shape int, the model wants \[2\]"):
        _build({**state, "lin.bias": 3})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match=r"^ckpt: bad config \(no\)$"):
        loaded.build_loaded(_raises, lambda _, __: state, "ckpt", bad_config="ckpt: bad config")


def _raises() -> nn.Module:
    raise ValueError("no")


class _MetaOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("ghost", torch.empty(2, device="meta"), persistent=False)


def test_a_tensor_nothing_computes_is_refused() -> None:
    state = {"lin.weight": torch.zeros(2, 2), "lin.bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"'ghost' is on the meta device after loading"):
        loaded.build_loaded(_MetaOnly, lambda _, __: state, "ckpt", bad_config="bad")


# ---------------------------------------------------------------------------------------------
# the pipelines' networks and text encoders

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import pipeline_folders as pf  # noqa: E402 (tests/ is on sys.path)


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[nn.Module]]:
    """Every module the loaders build, each of which must come from the meta build (the real
    build, a fallback, fails the test)."""
    from ddpmcli.checkpoints import diffusers as ddpm_diffusers
    from ddpmcli.checkpoints import text_encoders

    modules: list[nn.Module] = []

    def spy(*args: Any, **kwargs: Any) -> nn.Module:
        module = loaded.build_loaded(*args, **kwargs)
        modules.append(module)
        return module

    def no_real_build(*args: Any, **kwargs: Any) -> nn.Module:
        raise AssertionError("a module was built with random initial weights")

    monkeypatch.setattr(ddpm_diffusers, "build_loaded", spy)
    monkeypatch.setattr(text_encoders, "build_loaded", spy)
    monkeypatch.setattr(loaded, "_load_real", no_real_build)
    torch.set_num_threads(1)
    yield modules


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


def _matches(mine: nn.Module, theirs: nn.Module) -> bool:
    a, b = _tensors(mine), _tensors(theirs)
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


@pytest.mark.parametrize("family", ["flux-dev", "sd3", "sdxl"])
def test_pipeline_modules_equal_the_pipelines_own(
    built: list[nn.Module], tmp_path: Path, family: str
) -> None:
    from ddpmcli.checkpoints import load_checkpoint

    make = {"flux-dev": pf.flux_folder, "sd3": pf.sd3_folder, "sdxl": pf.sdxl_folder}[family]
    folder = make(tmp_path / family)
    model = load_checkpoint(folder, prompt="a cat", guidance_scale=3.0)
    cls = {"flux-dev": diffusers.FluxPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
           "sdxl": diffusers.StableDiffusionXLPipeline}[family]  # fmt: skip
    pipe = cls.from_pretrained(folder)
    theirs = [c for c in pipe.components.values() if isinstance(c, nn.Module)]
    # the network, the VAE and every text encoder: built on meta, all data, as diffusers loads
    assert len(built) == len(theirs) == {"flux-dev": 4, "sd3": 5, "sdxl": 4}[family]
    for module in built:
        assert loaded.left_on_meta(module) == []
        assert any(_matches(module, other) for other in theirs), type(module).__name__
    x = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(3))
    if family == "sdxl":
        import test_sdxl

        t = torch.tensor([3, 17])
        want = test_sdxl._pipeline_output(pipe, x, t, "a cat", 3.0, False)
    else:
        import test_sd3_flux

        t = torch.tensor([250.0, 875.0])
        want = test_sd3_flux._pipeline_output(family, pipe, x, t, 3.0)
        t = t.double()
    torch.testing.assert_close(model.predict(x, t)[0], want, rtol=1e-5, atol=1e-6)
