"""Hostile checkpoints, built here: pickle payloads in every member each loader reads, TorchScript
with side effects, a model that ignores the batch, a FIFO. Each case asserts that no marker file
appears, the exit code, exactly one `Error:` line on stderr and empty or valid stdout."""

from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import Result

from ddpmcli import checkpoints, core, models

SCHEDULE = core.make_schedule("linear", 20)
META = checkpoints.checkpoint_metadata(SCHEDULE, "epsilon", (2,))


class Payload:
    """Unpickling this creates the marker file (``open(marker, "w")``): code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (self.marker, "w"))


def _torch_bytes(obj: Any, *, zip_format: bool = True) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def _one_error(result: Result, *needles: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _refused(cli: Callable[..., Result], path: Path, marker: Path, *needles: str) -> None:
    for args in (("info", str(path), "-f", "json"), ("sample", str(path), "--n", "2")):
        result = cli(*args, "--steps", "2") if args[0] == "sample" else cli(*args)
        assert result.exit_code == 1, (args, result.stdout, result.stderr)
        _one_error(result, *needles)
        assert result.stdout == ""
        assert not marker.exists(), f"{args}: the payload ran"


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build_model("mlp", models.default_hparams("mlp", (2,)))


@pytest.fixture(scope="module")
def benign_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "ok.pt2"
    example = (torch.randn(3, 2), torch.tensor([0, 1, 2]))
    checkpoints.save_exported_program(_mlp(), path, example, META)
    return path


def _rewrite(src: Path, dst: Path, change: Callable[[str, bytes], bytes | None], add=()) -> None:  # type: ignore[no-untyped-def]
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for name in zin.namelist():
            data = change(name.split("/", 1)[1], zin.read(name))
            if data is not None:
                zout.writestr(name, data)
        for inner, data in add:
            zout.writestr(f"{root}/{inner}", data)


# ---------------------------------------------------------------------------------------------
# pickle payloads, every format


def test_native_zip_payload_refused(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "pwned"
    torch.save({"format": "ddpmcli", "version": 1, "x": Payload(marker)}, tmp_path / "evil.pt")
    _refused(cli, tmp_path / "evil.pt", marker, "refused to load", "io.open")


def test_legacy_pickle_payload_refused(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "pwned"
    (tmp_path / "old.pt").write_bytes(_torch_bytes({"x": Payload(marker)}, zip_format=False))
    _refused(cli, tmp_path / "old.pt", marker)


@pytest.mark.parametrize(
    "where",
    ["sample_inputs", "use_pickle_weight", "legacy_weights", "opaque_obj", "named_pt"],
)
def test_pt2_member_payloads_refused(cli, benign_pt2: Path, tmp_path: Path, where: str) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "pwned"
    evil = _torch_bytes((Payload(marker),))
    add: list[tuple[str, bytes]] = []

    def change(inner: str, data: bytes) -> bytes | None:
        if where in ("sample_inputs", "named_pt") and inner.startswith("data/sample_inputs/"):
            return evil
        if where == "use_pickle_weight" and inner == "data/weights/model_weights_config.json":
            config = json.loads(data)
            entry = config["config"][next(iter(config["config"]))]
            entry["use_pickle"] = True
            return json.dumps(config).encode()
        if where == "use_pickle_weight" and inner == "data/weights/weight_0":
            return evil
        return data

    if where == "legacy_weights":
        add.append(("data/weights/model.pt", evil))
    if where == "opaque_obj":
        import pickle

        add.append(("data/constants/opaque_obj_0", pickle.dumps(Payload(marker))))
    name = "ckpt.pt" if where == "named_pt" else "evil.pt2"
    _rewrite(benign_pt2, tmp_path / name, change, add)
    _refused(cli, tmp_path / name, marker, "refused to load", "io.open")


def test_benign_pt2_loads_without_a_flag(cli, benign_pt2: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("info", str(benign_pt2), "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["format"] == "export"


@pytest.mark.diffusers
def test_diffusers_bin_payload_refused(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("diffusers")
    marker = tmp_path / "pwned"
    unet = tmp_path / "unet"
    unet.mkdir()
    config = {
        "_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
        "layers_per_block": 1, "block_out_channels": [8, 16], "norm_num_groups": 4,
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
    }  # fmt: skip
    (unet / "config.json").write_text(json.dumps(config))
    (unet / "diffusion_pytorch_model.bin").write_bytes(_torch_bytes({"w": Payload(marker)}))
    _refused(cli, unet, marker, "refused to load")


# ---------------------------------------------------------------------------------------------
# TorchScript: code, so only with --trust-program


class _Marking(torch.nn.Module):
    """Creates ``marker`` when loaded (``__setstate__``) and prints on every forward."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.eye(2) * 0.5)
        self.marker = marker

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        print("model says hello")
        return x @ self.w + t[:, None].to(x.dtype) * 0

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.marker, self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.marker = state[0]
        # the result is used, so TorchScript cannot drop the call that creates the file
        self.w = state[1] + torch.from_file(self.marker, True, 4)[:1].sum() * 0
        self.training = state[2]


@pytest.fixture(scope="module")
def marking(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ts")
    marker = root / "pwned"
    scripted = torch.jit.script(_Marking(str(marker)))
    checkpoints.save_torchscript(scripted, root / "prog.pt", META)
    assert not marker.exists()
    return root / "prog.pt", marker


def test_torchscript_refused_without_trust(cli, marking: tuple[Path, Path], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path, marker = marking
    monkeypatch.delenv(checkpoints.TRUST_ENV, raising=False)
    for args in (("sample", "--n", "2", "--steps", "2"), ("reconstruct", "--data", "gmm")):
        result = cli(args[0], str(path), *args[1:], "-f", "json")
        assert result.exit_code == 1, result.stderr
        _one_error(result, "executes its own code", "--trust-program", "DDPM_TRUST_PROGRAM=1")
        assert result.stdout == ""
        assert not marker.exists()


def test_info_reads_torchscript_without_running_it(cli, marking: tuple[Path, Path]) -> None:  # type: ignore[no-untyped-def]
    path, marker = marking
    result = cli("info", str(path), "-f", "json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)[0]
    assert row["format"] == "torchscript" and row["architecture"] == "_Marking"
    assert row["parameters"] == 4 and row["timesteps"] == 20 and row["data_shape"] == "2"
    assert not marker.exists()


def test_trusted_printing_model_keeps_json_clean(
    marking: tuple[Path, Path], tmp_path: Path
) -> None:
    """A real process: TorchScript prints from C++ to fd 1, which must not reach stdout."""
    path, marker = marking
    env = {**os.environ, "DDPM_TRUST_PROGRAM": "1"}
    args = ["sample", str(path), "--n", "3", "--steps", "2", "-f", "json", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "ddpmcli", *args], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout), proc.stdout
    assert "model says hello" in proc.stderr
    assert marker.exists()  # trusted: its __setstate__ did run (that is what trust means)
    marker.unlink()


class _FirstRowOnly(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(x[:1])


def test_batch_ignoring_model_caught(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    checkpoints.save_torchscript(_FirstRowOnly(), tmp_path / "one.pt", META)
    result = cli("sample", str(tmp_path / "one.pt"), "--n", "4", "--steps", "2", "--trust-program")
    assert result.exit_code == 1
    _one_error(result, "ignores the batch")
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------------
# files that are not files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_checkpoint_refused_quickly(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    start = time.monotonic()
    result = cli("info", str(fifo))
    assert time.monotonic() - start < 5
    assert result.exit_code == 1
    _one_error(result, "FIFO")
    assert result.stdout == ""


def test_sidecar_fifo_and_huge_schedule_refused(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    checkpoints.save_torchscript(_FirstRowOnly(), tmp_path / "s.pt")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "s.pt.ddpm.json")
        result = cli("info", str(tmp_path / "s.pt"))
        assert result.exit_code == 1
        _one_error(result, "FIFO")
        os.unlink(tmp_path / "s.pt.ddpm.json")
    huge = {**META, "schedule": {"kind": "linear", "timesteps": 10**12}}
    (tmp_path / "s.pt.ddpm.json").write_text(json.dumps(huge))
    result = cli("info", str(tmp_path / "s.pt"))
    assert result.exit_code == 1
    _one_error(result, "s.pt.ddpm.json", "schedule.timesteps")
