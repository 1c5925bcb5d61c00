"""Data loading: arrays, images, built-in sets, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddpmcli import data
from ddpmcli.errors import DataError


@pytest.mark.parametrize("name", list(data.BUILTIN_DATASETS))
def test_builtin_deterministic_and_in_range(name: str) -> None:
    spec = data.BUILTIN_DATASETS[name]
    a = data.builtin_dataset(name, 64, seed=3)
    assert tuple(a.shape) == (64, *spec.data_shape)
    assert torch.equal(a, data.builtin_dataset(name, 64, seed=3))
    assert not torch.equal(a, data.builtin_dataset(name, 64, seed=4))
    lo, hi = spec.data_range
    assert a.min() >= lo - 0.5 and a.max() <= hi + 0.5


def test_gmm_mixture_matches_samples() -> None:
    mix = data.gaussian_mixture("gmm")
    assert mix is not None and data.gaussian_mixture("moons") is None
    x = data.builtin_dataset("gmm", 20000, 0, dtype=torch.float64)
    d = torch.cdist(x, mix.means).min(dim=1).values
    # squared distance to the nearest mean over 2 dims ~ 2 std^2
    assert abs(float((d**2).mean()) - 2 * float(mix.stds[0]) ** 2) < 2e-3
    torch.testing.assert_close(mix.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_npy_vectors_and_nhwc_uint8(tmp_path: Path) -> None:
    vec = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32)
    np.save(tmp_path / "v.npy", vec)
    torch.testing.assert_close(data.load_data(tmp_path / "v.npy", (2,)), torch.from_numpy(vec))
    img = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    img[..., 0] = 255
    np.savez(tmp_path / "i.npz", x=img)
    out = data.load_data(tmp_path / "i.npz", (3, 8, 8))
    assert tuple(out.shape) == (4, 3, 8, 8)
    assert float(out[:, 0].min()) == 1.0 and float(out[:, 1].max()) == -1.0


def test_image_folder_resized(tmp_path: Path) -> None:
    from PIL import Image

    for i in range(3):
        Image.new("L", (20, 20), color=40 * i).save(tmp_path / f"{i}.png")
    out = data.load_data(tmp_path, (1, 8, 8))
    assert tuple(out.shape) == (3, 1, 8, 8)
    assert float(out[0].max()) == -1.0


def test_get_data_dispatch() -> None:
    x = data.get_data("moons", n=5, seed=1)
    assert torch.equal(x, data.builtin_dataset("moons", 5, 1))
    with pytest.raises(DataError, match="has samples of shape"):
        data.get_data("shapes", n=2, data_shape=(2,))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.npy", "data not found"),
        (lambda p: (np.save(p / "w.npy", np.zeros((3, 5))), p / "w.npy")[1], "the model wants"),
        (lambda p: (np.save(p / "n.npy", np.full((3, 2), np.nan)), p / "n.npy")[1], "NaN"),
        (lambda p: ((p / "e").mkdir(), p / "e")[1], "no PNG or JPEG"),
        (lambda p: ((p / "b.npy").write_bytes(b"garbage"), p / "b.npy")[1], "cannot read"),
        (lambda p: (np.save(p / "z.npy", np.zeros((0, 2))), p / "z.npy")[1], "no samples"),
    ],
)
def test_bad_input_one_line(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        data.load_data(path, (2,))
    assert "\n" not in str(info.value)
