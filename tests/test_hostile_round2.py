"""Hostile input, second round: sizes a config implies, zip bombs, malformed metadata, threads,
escapes, and work that never ends. Each case ends in one ``Error:`` line (never the bug hint),
within a memory cap and a time limit.

The size cases run in one capped subprocess (``RLIMIT_AS`` 4 GiB, well below the machine's):
``ddpmcli.cli.root.run`` is called once per case with stderr captured, so the whole batch costs
one interpreter start. A case that allocated what it describes would die of the cap (MemoryError,
reaching the bug handler) instead of printing its line.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

CAP = 4 * 1024**3
TIME_LIMIT = 60.0
BUG_HINT = "set DDPM_DEBUG=1"

DRIVER = textwrap.dedent(
    """
    import io, json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
    from ddpmcli.cli.root import run
    out = []
    for args in json.loads(sys.argv[1]):
        err, saved = io.StringIO(), sys.stderr
        sys.stderr = err
        start = time.perf_counter()
        try:
            code = run(args)
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.stderr = saved
        out.append([code, err.getvalue(), time.perf_counter() - start])
    print(json.dumps(out))
    """
)


def run_capped(cases: list[list[str]], cwd: Path) -> list[tuple[int, str, float]]:
    """Each argv run in one subprocess under the memory cap: (exit code, stderr, seconds)."""
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER.format(cap=CAP), json.dumps(cases)],
        capture_output=True, text=True, cwd=cwd, timeout=len(cases) * TIME_LIMIT + 60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(row) for row in json.loads(proc.stdout.strip().splitlines()[-1])]  # type: ignore[misc]


def assert_one_line(row: tuple[int, str, float], code: int, *fragments: str) -> None:
    status, stderr, seconds = row
    lines = stderr.strip().splitlines()
    assert status == code, stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert BUG_HINT not in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert seconds < TIME_LIMIT, (seconds, lines[0])


# ---------------------------------------------------------------------------------------------
# archives with forged sizes


def _forge_size(path: Path, member_suffix: str, size: int) -> None:
    """Rewrite the uncompressed size the central directory declares for one member: what a zip
    bomb declares (the checks read declared sizes; nothing here inflates)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
        name = info.filename.encode()
    at = data.find(b"PK\x01\x02" + b"\x00" * 0, 0)
    while at != -1:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46 : at + 46 + name_len]) == name:
            struct.pack_into("<I", data, at + 24, size)
            break
        at = data.find(b"PK\x01\x02", at + 4)
    else:  # pragma: no cover - the member is always there
        raise AssertionError(member_suffix)
    path.write_bytes(bytes(data))


def _native(path: Path, **hparams: object) -> None:
    from ddpmcli import checkpoints, core, models

    base = models.default_hparams("mlp", (2,))
    checkpoints.save_native_checkpoint(
        path, models.build_model("mlp", base), architecture="mlp", hparams=base,
        schedule=core.make_schedule("linear", 10), prediction_type="epsilon", data_shape=(2,),
    )  # fmt: skip
    if hparams:
        obj = torch.load(path, weights_only=True)
        obj["hparams"] = {**obj["hparams"], **hparams}
        torch.save(obj, path)


def _pipeline(root: Path, name: str, net: str, config: dict[str, object]) -> Path:
    folder = root / name
    (folder / net).mkdir(parents=True)
    (folder / net / "config.json").write_text(json.dumps(config))
    (folder / "scheduler").mkdir()
    sched = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "config.json").write_text("{}")
    (folder / "tokenizer").mkdir()
    return folder


_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "norm_num_groups": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 8,
}  # fmt: skip
_DIT = {
    "_class_name": "DiTTransformer2DModel", "sample_size": 8, "in_channels": 4,
    "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1,
    "num_embeds_ada_norm": 10, "norm_type": "ada_norm_zero",
}  # fmt: skip


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("round2")
    _native(root / "blocks.pt", num_blocks=10**6)
    _native(root / "wide.pt", hidden=10**6)
    _pipeline(root, "hid", "unet", {**_UNET, "encoder_hid_dim": 10**8})
    _pipeline(root, "layers", "unet", {**_UNET, "transformer_layers_per_block": 100_000})
    _pipeline(root, "dit", "transformer", {**_DIT, "out_channels": 10**8})
    from ddpmcli.checkpoints.programs import save_exported_program, save_torchscript
    from ddpmcli.models import build_model, default_hparams

    net = build_model("mlp", default_hparams("mlp", (2,))).eval()
    meta = {"schedule": {"kind": "linear", "T": 10}, "data_shape": [2]}
    example = (torch.randn(3, 2), torch.zeros(3, dtype=torch.long))
    for name, member, size in [
        ("inputs.pt2", "sample_inputs/model.pt", 0x2000_0000),  # 512 MiB of "sample inputs"
        ("weights.pt2", "data/weights/weight_0", 0xF000_0000),
    ]:
        save_exported_program(net, root / name, example, meta)
        _forge_size(root / name, member, size)
    save_torchscript(net, root / "script.pt", meta)
    _forge_size(root / "script.pt", "data.pkl", 0xF000_0000)
    return root


def test_sizes_and_bombs_are_one_line_under_a_memory_cap(hostile: Path) -> None:
    cases = [
        (["info", "blocks.pt"], "the mlp network its hparams describe has more than"),
        (["info", "wide.pt"], "the mlp network its hparams describe needs more than"),
        (["info", "hid"], "the UNet2DConditionModel it describes needs more than"),
        (["info", "layers"], "the UNet2DConditionModel it describes has more than"),
        (["info", "dit"], "the DiTTransformer2DModel it describes needs more than"),
        (["info", "inputs.pt2"], "is too large"),
        (["info", "weights.pt2"], "the archive's inflated members needs"),
        (["info", "--trust-program", "script.pt"], "the archive's inflated members needs"),
        (["info", "script.pt"], "the archive's inflated members needs"),
    ]
    start = time.perf_counter()
    rows = run_capped([args for args, _ in cases], hostile)
    for (_, fragment), row in zip(cases, rows, strict=True):
        assert_one_line(row, 1, fragment)
    assert time.perf_counter() - start < TIME_LIMIT * 3
