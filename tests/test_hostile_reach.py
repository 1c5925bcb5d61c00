"""A hostile or careless user of issue 9's reach (latent data, references, class-conditional
models and wrap's keywords): each bad input gets one ``Error:`` line and exit 1 or 2 from the
CLI, and a :mod:`ddpmcli.errors` exception naming the parameter from the API; nothing is
written. The tiny DiT pipeline (3x8x8 images, 4x4x4 latents, 5 classes and a null label) and the
data file are test_conditional's fixtures."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from typer.testing import Result

import ddpmcli
from ddpmcli.errors import CheckpointError, DataError, ParameterError

pytest.importorskip("diffusers")
import test_conditional  # noqa: E402  (its tiny pipelines, as fixtures here too)

dit, data_file = test_conditional.dit, test_conditional.data_file

pytestmark = [pytest.mark.diffusers, pytest.mark.usefixtures("one_thread")]

NEITHER = "; the model wants images [3, 8, 8] (encoded by its VAE) or latents [4, 4, 4]"


def _one_line(result: Result, code: int, line: str) -> None:
    """Exit ``code``, nothing on stdout, and exactly ``Error: line`` on stderr."""
    assert (result.exit_code, result.stdout) == (code, ""), result.stderr
    assert result.stderr == f"Error: {line}\n"


@pytest.fixture(scope="module")
def arrays(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Array files a careless user hands a latent model."""
    root = tmp_path_factory.mktemp("hostile_reach")
    gen = torch.Generator().manual_seed(3)
    nan_latents = torch.randn((3, 4, 4, 4), generator=gen)
    nan_latents[1, 2, 0, 0] = float("nan")
    made = {
        "three_channel_latents": torch.randn((3, 3, 4, 4), generator=gen),
        "big_images": torch.rand((3, 3, 16, 16), generator=gen) * 2 - 1,
        "vectors": torch.randn((3, 2), generator=gen),
        "nan_latents": nan_latents,
        "no_latents": torch.zeros((0, 4, 4, 4)),
    }
    out = {}
    for name, value in made.items():
        out[name] = root / f"{name}.npy"
        np.save(out[name], value.numpy())
    return out


# -- latent data of the wrong shape, NaN, none --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape"),
    [("three_channel_latents", "[3, 4, 4]"), ("big_images", "[3, 16, 16]"), ("vectors", "[2]")],
)
@pytest.mark.parametrize("command", ["reconstruct", "sample"])
def test_latent_model_data_of_neither_shape_names_both(
    cli: Callable[..., Result], dit: Path, arrays: dict[str, Path], name: str, shape: str,
    command: str,
) -> None:  # fmt: skip
    """The error used to name the image shape only, as if latents were not accepted."""
    path = arrays[name]
    if command == "reconstruct":
        args = ["--data", str(path)]
    else:
        # trailing: the folder's leading spacing would add its one Warning line (issue 20)
        args = ["--references", str(path), "--steps", "2", "-n", "2", "--spacing", "trailing"]
    result = cli(command, str(dit), *args, "--class-label", "0", "-q")
    _one_line(result, 1, f"{path}: samples have shape {shape}{NEITHER}")


def test_latent_shaped_data_with_nan_is_refused_as_nan(
    cli: Callable[..., Result], dit: Path, arrays: dict[str, Path], tmp_path: Path
) -> None:
    """Latent-shaped data holding a NaN was refused as 'the model wants (3, 8, 8)'."""
    path = arrays["nan_latents"]
    line = f"{path}: 1 value(s) are NaN or infinite"
    _one_line(
        cli("reconstruct", str(dit), "--data", str(path), "--class-label", "0", "-q"), 1, line
    )
    save = tmp_path / "samples.npz"
    sample = cli("sample", str(dit), "--references", str(path), "--class-label", "0", "-q",
                 "--steps", "2", "-n", "2", "--spacing", "trailing",
                 "--save", str(save))  # fmt: skip
    _one_line(sample, 1, line)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial file
    empty = arrays["no_latents"]
    _one_line(
        cli("nll", str(dit), "--data", str(empty), "--class-label", "0", "-q"),
        1,
        f"{empty}: the array holds no samples",
    )


# -- the API's tensors: checked before the VAE runs, named -----------------------------------


class _CountingVae:
    def __init__(self, model: Any) -> None:
        self.calls = 0
        vae = model.latent.vae
        inner = vae.encode

        def encode(x: Tensor) -> Any:
            self.calls += 1
            return inner(x)

        vae.encode = encode


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: torch.zeros((0, 3, 8, 8)), DataError,
         "x0 of shape [0, 3, 8, 8] is not a batch of samples"),
        (lambda: torch.zeros(5), DataError, "x0 of shape [5] is not a batch of samples"),
        (lambda: torch.full((2, 3, 8, 8), float("inf")), DataError,
         "x0: 384 value(s) are NaN or Inf"),
        (lambda: torch.zeros((2, 3, 4, 4)), DataError, f"x0 samples have shape [3, 4, 4]{NEITHER}"),
        (lambda: [["a"]], DataError,
         "x0: not an array of numbers (ValueError: too many dimensions 'str')"),
        (lambda: torch.zeros((2, 3, 8, 8), dtype=torch.complex64), DataError,
         "x0 holds complex64 values, not real numbers"),
    ],
)  # fmt: skip
def test_api_reconstruct_checks_a_latent_models_tensor_first(
    dit: Path, make: Callable[[], Any], error: type[Exception], message: str
) -> None:
    """Empty data raised torch.cat's ValueError from inside the VAE; NaN images were encoded
    before the count (of latent values) was reported."""
    model = ddpmcli.load(dit, class_label="0")
    vae = _CountingVae(model)
    with pytest.raises(error) as info:
        ddpmcli.reconstruct(model, make(), t=[0, 10])
    assert str(info.value) == message
    assert vae.calls == 0


@pytest.mark.parametrize("n", [0, -1])
def test_api_n_below_one_is_refused_not_sliced(dit: Path, n: int) -> None:
    """``x0[:-1]`` silently dropped the last sample, ``x0[:0]`` crashed in the VAE."""
    model = ddpmcli.load(dit, class_label="0")
    with pytest.raises(ParameterError, match=rf"^n must be at least 1, got {n}$"):
        ddpmcli.reconstruct(model, torch.zeros((3, 3, 8, 8)), t=[0], n=n)


def test_api_sample_references_are_checked_on_every_model(dit: Path) -> None:
    """A NaN, empty or wrong-shaped references tensor gave xt_std_expected NaN (or compared
    samples with vectors of another size) without a word."""
    model = ddpmcli.load(dit, class_label="0")
    with pytest.raises(DataError, match=r"^references: 128 value\(s\) are NaN or Inf$"):
        ddpmcli.sample(model, n=2, steps=2, references=torch.full((2, 4, 4, 4), float("nan")))
    plain = _plain()
    cases = [
        (torch.tensor([[float("nan"), 0.0]]), "references: 1 value(s) are NaN or Inf"),
        (torch.zeros((0, 2)), "references of shape [0, 2] is not a batch of samples"),
        (torch.zeros((3, 5)), "references samples have shape [5], the model wants [2]"),
    ]
    for refs, message in cases:
        with pytest.raises(DataError) as info:
            ddpmcli.sample(plain, n=2, steps=2, references=refs)
        assert str(info.value) == message


def test_api_uint8_tensor_is_mapped_as_a_data_file_is(tmp_path: Path) -> None:
    """8-bit data: the file loader maps [0, 255] to the model's range; the API took the raw
    integers as values in it."""
    gen = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (4, 2), generator=gen, dtype=torch.uint8)
    path = tmp_path / "u8.npy"
    np.save(path, pixels.numpy())
    model = _plain()
    from_tensor = ddpmcli.reconstruct(model, pixels, t=[0, 10], clip=False)
    from_file = ddpmcli.reconstruct(model, str(path), t=[0, 10], clip=False)
    floats = ddpmcli.reconstruct(model, pixels.double() / 255 * 2 - 1, t=[0, 10], clip=False)
    assert from_tensor.rows == from_file.rows == floats.rows


# -- class-conditional wrap: counts, null label, guidance, label seed ----------------------------


class _Labelled(nn.Module):
    """2-D vectors, labels 0..4 (row 4: the null label) added through an embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(5, 2)
        self.lin = nn.Linear(2, 2)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.lin(x) + (0 if labels is None else self.embed(labels))


class _Plain(nn.Module):
    """An unconditional denoiser of 2-D vectors."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2, 2)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.lin(x)


def _plain() -> Any:
    return ddpmcli.wrap(_Plain(), schedule=ddpmcli.schedule("linear", 20), data_shape=(2,))


def _wrap(**keywords: Any) -> Any:
    sched = ddpmcli.schedule("linear", 20)
    return ddpmcli.wrap(_Labelled(), schedule=sched, data_shape=(2,), **keywords)


NULL_RULE = "null_label must be an integer outside the classes 0..3 (usually 4, the label "
NULL_RULE += "table's extra row; at most 1048576), got "


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"num_classes": 10**12, "class_label": "random"},
         "num_classes must be a positive integer (at most 1048576), got 1000000000000"),
        ({"num_classes": 4.0, "class_label": "1"},
         "num_classes must be a positive integer (at most 1048576), got 4.0"),
        ({"num_classes": 4, "null_label": -1}, NULL_RULE + "-1"),
        ({"num_classes": 4, "null_label": 10**30}, NULL_RULE + str(10**30)),
        ({"num_classes": 4, "null_label": True}, NULL_RULE + "True"),
        ({"num_classes": 4, "null_label": 4.0}, NULL_RULE + "4.0"),
        ({"num_classes": 4, "null_label": "4"}, NULL_RULE + "'4'"),
        ({"num_classes": 4, "null_label": 4, "class_label": "1", "guidance_scale": "2"},
         "guidance_scale must be a number, got '2'"),
        ({"num_classes": 4, "null_label": 4, "class_label": "1", "guidance_scale": True},
         "guidance_scale must be a number, got True"),
        ({"num_classes": 4, "null_label": 4, "class_label": "1", "guidance_scale": float("nan")},
         "guidance_scale must be finite, got nan"),
        ({"num_classes": 4, "null_label": 4, "class_label": "random", "label_seed": "7"},
         "label_seed must be an integer, got '7'"),
        ({"num_classes": 4, "null_label": 4, "class_label": "random", "label_seed": 1.5},
         "label_seed must be an integer, got 1.5"),
        ({"num_classes": 4, "null_label": 4, "class_label": 4},
         "class_label 4 is out of range: the model has 4 classes (0..3)"),
    ],
)  # fmt: skip
def test_wrap_refuses_bad_class_keywords_naming_them(
    keywords: dict[str, Any], message: str
) -> None:
    """A negative or huge null label was blamed on data_shape ('the model fails on inputs of
    data shape [2]'), and a string guidance scale or label seed raised a bare ValueError or
    TypeError."""
    with pytest.raises(ParameterError) as info:
        _wrap(**keywords)
    assert str(info.value) == message


def test_wrap_takes_numpy_integers_and_guidance_zero_is_the_null_label() -> None:
    model = _wrap(num_classes=np.int64(4), null_label=np.int64(4), class_label=np.int64(2))
    assert (model.info["num_classes"], model.info["null_label"]) == (4, 4)
    assert type(model.info["null_label"]) is int
    x, t = torch.randn(3, 2), torch.tensor([0, 5, 19])
    null = _wrap(num_classes=4, null_label=4, class_label="null").predict(x, t)[0]
    zero = _wrap(num_classes=4, null_label=4, class_label=2, guidance_scale=0.0).predict(x, t)[0]
    cond = model.predict(x, t)[0]
    torch.testing.assert_close(zero, null)  # s = 0: the unconditional output
    minus = _wrap(num_classes=4, null_label=4, class_label=2, guidance_scale=-1.0).predict(x, t)[0]
    torch.testing.assert_close(minus, 2 * null - cond)  # s < 0 pushes away from the label


def test_load_refuses_a_string_guidance_scale(dit: Path) -> None:
    with pytest.raises(ParameterError, match=r"^guidance_scale must be a number, got 'x'$"):
        ddpmcli.load(dit, class_label="1", guidance_scale="x")


# -- the CLI's flags on a latent class-conditional model ---------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (["--guidance-scale", "nan"], 2, "--guidance-scale must be finite, got nan"),
        (["--guidance-scale", "inf"], 2, "--guidance-scale must be finite, got inf"),
        (["--class-label", "5"], 2,
         "--class-label 5 is out of range: the model has 5 classes (0..4)"),
        (["--class-label", "0-99"], 2,
         "--class-label 99 is out of range: the model has 5 classes (0..4)"),
        (["--class-label", "1.5"], 2, "--class-label '1.5': want K, A-B, all, random or null"),
        (["--class-label", ""], 2, "--class-label '': want K, A-B, all, random or null"),
    ],
)  # fmt: skip
def test_cli_bad_labels_and_guidance_are_one_line(
    cli: Callable[..., Result], dit: Path, tmp_path: Path, args: list[str], code: int, line: str
) -> None:
    save = tmp_path / "s.npz"
    result = cli("sample", str(dit), "-n", "2", "--steps", "2", "-q", "--save", str(save), *args)
    _one_line(result, code, line)
    assert not save.exists()


def test_cli_decode_refusals(
    cli: Callable[..., Result], dit: Path, data_file: Path, tmp_path: Path
) -> None:
    base = ("reconstruct", str(dit), "--class-label", "0", "-q", "--decode")
    _one_line(
        cli(*base, "--data", str(data_file), "--per-sample"),
        2,
        "--decode gives per-t rows; it does not go with --per-sample",
    )
    model = ddpmcli.load(dit, class_label="0")
    assert model.latent is not None
    latents = tmp_path / "z.npy"
    np.save(latents, model.latent.encode(torch.from_numpy(np.load(data_file))).numpy())
    _one_line(
        cli(*base, "--data", str(latents)),
        2,
        "--decode needs image data to compare with, not latents",
    )


FACTORIES = """
import torch
from torch import nn


def meta(**classes):
    return {"schedule": {"kind": "linear", "timesteps": 20}, "prediction_type": "eps",
            "data_shape": [2], **classes}


def huge(path, load_weights):
    return nn.Linear(2, 2), meta(num_classes=10**12)


def negative_null(path, load_weights):
    return nn.Linear(2, 2), meta(num_classes=4, null_label=-1)


def bool_null(path, load_weights):
    return nn.Linear(2, 2), meta(num_classes=4, null_label=True)


def float_null(path, load_weights):
    return nn.Linear(2, 2), meta(num_classes=4, null_label=4.5)


class Labelled(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 2)

    def forward(self, x, t, labels):
        return x + self.embed(labels)


def schedule_name(path, load_weights):
    return nn.Linear(2, 2), {"schedule": "cosine", "prediction_type": "eps", "data_shape": [2]}


class Plain(nn.Module):
    def forward(self, x, t):
        return 0.1 * x


def list_betas(path, load_weights):
    return Plain(), {"schedule": [0.1, 0.2, 0.3], "prediction_type": "eps", "data_shape": [2]}


def nan_refs(path, load_weights):
    refs = torch.zeros(3, 2)
    refs[1, 1] = float("nan")
    return Plain(), {"schedule": [0.1, 0.2], "prediction_type": "eps", "data_shape": [2],
                     "reference_samples": refs}


def wide_refs(path, load_weights):
    return Plain(), {"schedule": [0.1, 0.2], "prediction_type": "eps", "data_shape": [2],
                     "reference_samples": torch.zeros(3, 5)}


def numpy_counts(path, load_weights):
    import numpy as np

    return Labelled(), meta(num_classes=np.int64(4), null_label=np.int32(4))
"""


@pytest.mark.parametrize(
    ("factory", "got"),
    [("huge", None), ("negative_null", "-1"), ("bool_null", "True"), ("float_null", "4.5")],
)
def test_factory_metadata_class_counts_are_checked(
    cli: Callable[..., Result], tmp_path: Path, factory: str, got: str | None
) -> None:
    """A factory's num_classes is checked (1..2**20) before anything is sized by it; its
    null_label must lie outside the classes."""
    (tmp_path / "factories.py").write_text(FACTORIES)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    spec = f"{tmp_path / 'factories.py'}:{factory}"
    result = cli("sample", "--model", spec, str(tmp_path / "ckpt.pt"), "-n", "2", "--steps", "2")
    if got is None:
        line = f"--model {spec}: metadata num_classes must be an integer in 1..1048576, got "
        line += str(10**12)
    else:
        line = f"--model {spec}: metadata null_label must be an integer outside the classes "
        line += f"0..3 (usually 4, the label table's extra row), got {got}"
    _one_line(result, 1, line)


@pytest.mark.parametrize("decoder", ["discretized", "discretized_tanh"])
def test_an_8_bit_decoder_on_latents_is_refused(
    cli: Callable[..., Result], dit: Path, data_file: Path, decoder: str
) -> None:
    """The discretized decoder bins latents (range +-1e4) as if they were 8-bit pixels: its
    t = 0 term came out 0.0 bits."""
    line = (
        f"--decoder {decoder} is for 8-bit data; a latent model's latents are real-valued: "
        "use continuous (the default)"
    )
    result = cli("nll", str(dit), "--data", str(data_file), "--class-label", "0", "-q",
                 "--t-random", "3", "--decoder", decoder)  # fmt: skip
    _one_line(result, 2, line)
    model = ddpmcli.load(dit, class_label="0")
    with pytest.raises(ParameterError) as info:
        ddpmcli.nll(model, torch.zeros((2, 4, 4, 4)), decoder=decoder)  # type: ignore[arg-type]
    assert str(info.value) == line.replace("--decoder", "decoder")


def test_factory_metadata_takes_numpy_integers(cli: Callable[..., Result], tmp_path: Path) -> None:
    """A count taken from an array's shape or a numpy config is an integer too."""
    (tmp_path / "factories.py").write_text(FACTORIES)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    spec = f"{tmp_path / 'factories.py'}:numpy_counts"
    result = cli("info", "--model", spec, str(tmp_path / "ckpt.pt"), "-f", "json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)[0]
    assert (row["num_classes"], row["null_label"], row["class_label"]) == (4, 4, "null")


def test_example_null_label_variable_must_be_an_integer() -> None:
    """DDPM_NULL_LABEL=abc surfaced as int()'s 'invalid literal for int() with base 10'."""
    path = Path(__file__).resolve().parents[1] / "examples" / "adapt_improved_diffusion.py"
    found = importlib.util.spec_from_file_location("hostile_reach_iddpm_example", path)
    assert found is not None and found.loader is not None
    example = importlib.util.module_from_spec(found)
    found.loader.exec_module(example)
    with pytest.raises(ValueError, match=r"^DDPM_NULL_LABEL must be an integer, got 'abc'$"):
        example.settings_from_env({"DDPM_NULL_LABEL": "abc"})
    assert example.settings_from_env({"DDPM_NULL_LABEL": " 10 "})["null_label"] == 10


# -- a hostile VAE: its config's scaling, its own NaN ------------------------------------------


@pytest.mark.parametrize("value", [0.0, float("inf")])
def test_a_vae_scaling_factor_of_zero_or_inf_is_refused_before_any_file(
    cli: Callable[..., Result], dit: Path, tmp_path: Path, value: float
) -> None:
    """scaling_factor 0 decoded every latent to NaN: sample --save wrote NaN images and
    reconstruct --decode printed mse_image nan, psnr_image inf."""
    import shutil

    folder = tmp_path / "pipeline"
    shutil.copytree(dit, folder)
    config_path = folder / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["scaling_factor"] = value
    config_path.write_text(json.dumps(config))  # json writes inf as Infinity, and reads it back
    save = tmp_path / "samples.npz"
    result = cli("sample", str(folder), "--class-label", "0", "-n", "2", "--steps", "2", "-q",
                 "--save", str(save))  # fmt: skip
    _one_line(
        result, 1, f"the VAE's scaling_factor must be a finite non-zero number, got {value!r}"
    )
    assert not save.exists()


def test_a_vae_that_decodes_to_nan_is_an_error_not_a_nan_column(dit: Path, data_file: Path) -> None:
    from types import SimpleNamespace

    model = ddpmcli.load(dit, class_label="0")
    assert model.latent is not None
    vae = model.latent.vae
    vae.decode = lambda z: SimpleNamespace(sample=torch.full((z.shape[0], 3, 8, 8), float("nan")))
    with pytest.raises(CheckpointError, match=r"^the VAE's decoder returned 768 NaN or infinite"):
        ddpmcli.reconstruct(model, str(data_file), t=[0, 10], decode=True, n=2)


@pytest.mark.parametrize(("prompt", "shown"), [(5, "5"), (b"a cat", "b'a cat'"), (["a"], "['a']")])
def test_a_prompt_that_is_not_a_string_is_named(dit: Path, prompt: object, shown: str) -> None:
    """The tokenizer's refusal surfaced as 'the model fails on inputs of data shape [4, 4, 4]
    ...; pass the right data_shape' (checked before the model is asked what it is)."""
    with pytest.raises(ParameterError) as info:
        ddpmcli.load(dit, prompt=prompt)
    assert str(info.value) == f"prompt must be a string, got {shown}"


def test_a_tensor_that_requires_grad_is_taken_without_a_warning() -> None:
    """A training loop's batch may require grad: references gave torch's 'Converting a tensor
    that requires grad to a scalar' warning on stderr."""
    import warnings

    model = _plain()
    batch = torch.randn((4, 2), generator=torch.Generator().manual_seed(2), requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = ddpmcli.sample(model, n=2, steps=2, references=batch)
        rows = ddpmcli.reconstruct(model, batch, t=[0, 10]).rows
    assert run.rows[0]["xt_std_expected"] > 0 and len(rows) == 2
    assert run.references is not None and not run.references.requires_grad


def test_compare_optimal_on_a_latent_model_is_refused_by_the_api_as_by_the_cli(
    cli: Callable[..., Result], dit: Path, data_file: Path
) -> None:
    """The CLI refused it; the API, given a tensor, ran it and labelled latent-space errors
    optimal_mse (no _latent)."""
    line = "compare_optimal is not available on a latent model"
    result = cli("reconstruct", str(dit), "--data", str(data_file), "--class-label", "0", "-q",
                 "--compare-optimal")  # fmt: skip
    _one_line(result, 2, f"--{line.replace('_', '-')}")
    model = ddpmcli.load(dit, class_label="0")
    images = torch.from_numpy(np.load(data_file))
    with pytest.raises(ParameterError, match=rf"^{line}$"):
        ddpmcli.reconstruct(model, images, t=[0, 10], compare_optimal=True)


def test_factory_metadata_errors_name_the_factory_once(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    """'f.py:x metadata: f.py:x metadata: schedule must be ...': the place was said twice."""
    (tmp_path / "factories.py").write_text(FACTORIES)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    spec = f"{tmp_path / 'factories.py'}:schedule_name"
    result = cli("info", "--model", spec, str(tmp_path / "ckpt.pt"))
    line = f"{spec} metadata: schedule must be a schedule spec dict or a tensor (or list) of betas"
    _one_line(result, 1, line)
    spec = f"{tmp_path / 'factories.py'}:list_betas"  # a plain list of betas is taken
    result = cli("info", "--model", spec, str(tmp_path / "ckpt.pt"), "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["timesteps"] == 3


def test_wrap_of_an_unconditional_module_with_classes_says_labels() -> None:
    """num_classes on a module that takes no labels was blamed on data_shape alone."""
    with pytest.raises(CheckpointError) as info:
        ddpmcli.wrap(
            _Plain(), schedule=ddpmcli.schedule("linear", 20), data_shape=(2,), num_classes=4,
            class_label=1,
        )  # fmt: skip
    assert str(info.value) == (
        "_Plain: the model fails on inputs of data shape [2] with class labels "
        "(_Plain.forward() takes 3 positional arguments but 4 were given); pass the right "
        "data_shape, or a module called module(x_t, t, labels)"
    )


@pytest.mark.parametrize(
    ("refs", "message"),
    [
        (torch.tensor([[float("nan"), 0.0]]), "reference_samples: 1 value(s) are NaN or Inf"),
        (torch.zeros((3, 5)), "reference_samples samples have shape [5], the model wants [2]"),
        (torch.zeros((0, 2)), "reference_samples of shape [0, 2] is not a batch of samples"),
    ],
)
def test_wrap_checks_its_reference_samples(refs: Tensor, message: str) -> None:
    """They were stored as given: a NaN made every sample run's xt_std_expected NaN, an empty
    set warned from torch, another shape compared the samples with vectors of another size."""
    with pytest.raises(DataError) as info:
        ddpmcli.wrap(
            _Plain(), schedule=ddpmcli.schedule("linear", 20), data_shape=(2,),
            reference_samples=refs,
        )  # fmt: skip
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("factory", "line"),
    [
        ("nan_refs", "{spec} metadata: reference_samples hold 1 NaN or infinite value(s)"),
        (
            "wide_refs",
            "--model {spec}: metadata reference_samples have shape [5], data shape is [2]",
        ),
    ],
)
def test_metadata_reference_samples_are_checked(
    cli: Callable[..., Result], tmp_path: Path, factory: str, line: str
) -> None:
    """A NaN in a checkpoint's (or a factory's) reference samples made sample's
    xt_std_expected NaN; a factory's of another shape were taken as they were."""
    (tmp_path / "factories.py").write_text(FACTORIES)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    spec = f"{tmp_path / 'factories.py'}:{factory}"
    result = cli("sample", "--model", spec, str(tmp_path / "ckpt.pt"), "-n", "2", "--steps", "2")
    _one_line(result, 1, line.format(spec=spec))


def test_a_prompt_longer_than_the_text_encoder_reads_is_warned_about(
    cli: Callable[..., Result], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The tiny SD folder's tokenizer reads 8 tokens (start and end included): a 10-letter word
    is 12 tokens, cut to 8 as diffusers' pipelines cut it, with one Warning line; a short prompt
    gives none."""
    pytest.importorskip("transformers")
    sd = test_conditional.sd_folder(tmp_path_factory.mktemp("sd"))
    args = ["info", str(sd), "--format", "json"]
    long = cli(*args, "--prompt", "abcdefghij")
    assert long.exit_code == 0, long.stderr
    assert long.stderr == (
        "Warning: the prompt is 12 tokens; the text encoder reads the first 8, as diffusers' "
        "pipelines do\n"
    )
    assert json.loads(long.stdout)[0]["prompt"] == "abcdefghij"
    short = cli(*args, "--prompt", "a cat")
    assert (short.exit_code, short.stderr) == (0, "")


def test_a_model_returning_inf_stops_sample_even_when_clipping_hides_it() -> None:
    """x0_hat of an Inf epsilon is -Inf, clipped to -1: every x_t stayed finite, and sample used
    to exit 0 with x0_std NaN. The model's own output is checked (read with the statistics)."""
    from ddpmcli.run import NonFiniteSampleError

    sched = ddpmcli.schedule("linear", timesteps=50)
    calls: list[int] = []

    def late_inf(x: Tensor, t: Tensor) -> Tensor:
        calls.append(1)
        return torch.full_like(x, math.inf) if len(calls) > 3 else 0.1 * x

    model = ddpmcli.wrap(late_inf, schedule=sched, data_shape=(2,), check=False)
    with pytest.raises(NonFiniteSampleError) as caught:
        ddpmcli.sample(model, n=4, steps=6, seed=0)
    assert str(caught.value) == (
        "the model returned NaN/Inf (8 values) at step 3 of 6 (t = 24); stopped there (4 rows kept)"
    )
    assert [r["step"] for r in caught.value.rows] == [0, 1, 2, 3]
    assert math.isnan(caught.value.rows[-1]["x0_std"])  # the row shows it
