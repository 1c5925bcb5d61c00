"""Writes that lose data: a ``--save`` through a symlink to another name, outputs over the
command's own inputs (after symlinks and hard links), and the mode of a replaced file.

Each case checks the victim file: same bytes, same mode, and no stray temporary file beside it.
The CLI runs in-process (typer's CliRunner through the real error boundary): the path check runs
before the command does, so none of these cases loads a model.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpmcli.errors import DdpmError
from ddpmcli.files import atomic_write, check_apart


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-D MLP checkpoint on a 10-step schedule."""
    import torch

    from ddpmcli import checkpoints, core, models

    torch.manual_seed(0)
    hparams = models.default_hparams("mlp", (2,))
    path = tmp_path_factory.mktemp("writes") / "ckpt.pt"
    checkpoints.save_native_checkpoint(
        path, models.build_model("mlp", hparams), architecture="mlp", hparams=hparams,
        schedule=core.make_schedule("linear", 10), prediction_type="epsilon", data_shape=(2,),
    )  # fmt: skip
    return path


def _victim(path: Path, data: bytes = b"precious", mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _unchanged(path: Path, data: bytes, mode: int = 0o600) -> None:
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == mode


def _no_strays(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".ddpm-")]


def _one_usage_error(result, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "which this command reads" in lines[0]


# ---------------------------------------------------------------------------------------------
# --save through a symlink


def test_save_through_a_link_to_another_name_writes_the_samples_there(cli, ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = _victim(tmp_path / "target.bin")
    link = tmp_path / "out.npz"
    link.symlink_to(target.name)
    dangling = tmp_path / "dangling.npz"
    dangling.symlink_to("made.data")
    for out in (link, dangling):
        result = cli("sample", str(ckpt), "--n", "4", "--steps", "2", "--save", str(out))
        assert result.exit_code == 0, result.stderr
        assert out.is_symlink()
        with np.load(out) as saved:  # the real samples, through the link
            assert saved["samples"].shape == (4, 2)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # the target's mode is kept
    assert (tmp_path / "made.data").stat().st_size > 0
    _no_strays(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dangling.npz", "made.data", "out.npz", "target.bin"
    ]  # fmt: skip


def test_a_writer_that_writes_beside_its_temporary_replaces_nothing(tmp_path: Path) -> None:
    victim = _victim(tmp_path / "v.npz")
    with pytest.raises(DdpmError, match="did not write the file it was given"):
        atomic_write(victim, lambda tmp: Path(f"{tmp}.npz").write_bytes(b"x"))
    _unchanged(victim, b"precious")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npz"]


def test_a_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    victim = _victim(tmp_path / "v.txt", mode=0o640)
    link = tmp_path / "link.txt"
    link.symlink_to(victim.name)
    atomic_write(link, lambda tmp: tmp.write_bytes(b"new"))
    _unchanged(victim, b"new", 0o640)


# ---------------------------------------------------------------------------------------------
# outputs over inputs


def test_outputs_over_the_commands_inputs_are_refused(cli, ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every command, every output flag: same name, symlink, hard link, file in a data folder."""
    raw = ckpt.read_bytes()
    model = tmp_path / "model.npz"
    model.write_bytes(raw)
    model.chmod(0o600)
    (tmp_path / "link.npz").symlink_to(model)
    os.link(model, tmp_path / "hard.npz")
    png = tmp_path / "model.png"
    png.write_bytes(raw)
    png.chmod(0o600)
    refs = _victim(tmp_path / "refs.npz")
    np.savez(refs, samples=np.zeros((4, 2), np.float32))
    refs.chmod(0o600)
    refs_bytes = refs.read_bytes()
    data = tmp_path / "data.npz"
    data.write_bytes(refs_bytes)
    data.chmod(0o600)
    (tmp_path / "imgs").mkdir()
    one = tmp_path / "imgs" / "one.png"
    Image.new("L", (8, 8), 40).save(one)
    one.chmod(0o600)
    one_bytes = one.read_bytes()
    cfg = tmp_path / "cfg.png"
    cfg.write_bytes(b'{"kind": "linear", "T": 10}')
    cfg.chmod(0o600)
    cases = [
        (["sample", str(model), "--save", str(model)], "--save", model, raw),
        (["sample", str(model), "--save", str(tmp_path / "link.npz")], "--save", model, raw),
        (["sample", str(model), "--save", str(tmp_path / "hard.npz")], "--save", model, raw),
        (["sample", str(ckpt), "--references", str(refs), "--save", str(refs)], "--save", refs,
         refs_bytes),
        (["reconstruct", str(png), "--data", "moons", "--plot", str(png)], "--plot", png, raw),
        (["reconstruct", str(ckpt), "--data", str(one), "--plot", str(one)], "--plot", one,
         one_bytes),
        (["reconstruct", str(ckpt), "--data", str(one.parent), "--plot", str(one)], "--plot", one,
         one_bytes),
        (["train", "--data", str(data), "--out", str(data)], "--out", data, refs_bytes),
        (["schedule", "--from", str(cfg), "--plot", str(cfg)], "--plot", cfg, cfg.read_bytes()),
        (["posterior", "--from", str(cfg), "--plot", str(cfg)], "--plot", cfg, cfg.read_bytes()),
    ]  # fmt: skip
    for args, flag, victim, before in cases:
        result = cli(*args)
        _one_usage_error(result, flag)
        _unchanged(victim, before)
    _no_strays(tmp_path)


def test_check_apart_passes_new_and_separate_files(tmp_path: Path) -> None:
    a = _victim(tmp_path / "a")
    b = _victim(tmp_path / "b")
    check_apart({"--plot": tmp_path / "new.png"}, {"CKPT": [a]})
    check_apart({"--plot": b}, {"CKPT": [a], "--data": ["moons", str(tmp_path / "sub")]})
    (tmp_path / "sub").mkdir()
    check_apart({"--plot": b}, {"--data": [tmp_path / "sub"]})  # b is not in sub


def test_a_writer_failing_on_a_full_disk_is_one_error(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """matplotlib's PDF backend reports a full disk as zlib's 'Error -2 while flushing'."""
    import zlib

    from ddpmcli import files

    victim = _victim(tmp_path / "x.pdf")

    def writer(tmp: Path) -> None:
        raise zlib.error("Error -2 while flushing: inconsistent stream state")

    monkeypatch.setattr(files, "_full", lambda folder: True)
    with pytest.raises(DdpmError, match=r"x\.pdf': No space left on device$"):
        atomic_write(victim, writer)
    _unchanged(victim, b"precious")
    _no_strays(tmp_path)
    monkeypatch.setattr(files, "_full", lambda folder: False)
    with pytest.raises(zlib.error):  # not full: a writer's own error stays a bug
        atomic_write(victim, writer)
