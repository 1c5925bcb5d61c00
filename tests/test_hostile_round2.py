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
import time
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from capped import BUG_HINT, TIME_LIMIT, assert_one_line, run_capped  # noqa: E402

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
    save_exported_program(net, root / "base.pt2", example, {**meta, "prediction_type": "epsilon"})
    _malformed_programs(root)
    _native(root / "small.pt")
    return root


def _rewrite(root: Path, name: str, change: object) -> None:
    """A copy of base.pt2 with ``change(member name, bytes)`` applied (None drops a member)."""
    with zipfile.ZipFile(root / "base.pt2") as src, zipfile.ZipFile(root / name, "w") as dst:
        for info in src.infolist():
            data = change(info.filename, src.read(info))  # type: ignore[operator]
            if data is not None:
                dst.writestr(info, data)


def _graph(edit: object) -> object:
    def change(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        graph = json.loads(data)
        edit(graph)  # type: ignore[operator]
        return json.dumps(graph).encode()

    return change


def _malformed_programs(root: Path) -> None:
    def target(g: dict) -> None:
        g["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten.linear.nonexistent"

    def major(g: dict) -> None:
        g["schema_version"]["major"] = 999

    def deep(g: dict) -> None:
        g["graph_module"]["graph"]["nodes"][0]["extra"] = json.loads("[" * 200 + "]" * 200)

    _rewrite(root, "target.pt2", _graph(target))
    _rewrite(root, "major.pt2", _graph(major))
    _rewrite(root, "deep.pt2", _graph(deep))
    _rewrite(root, "missing.pt2", lambda n, d: None if n.endswith("weights/weight_0") else d)
    config = b'{"config": 5}'
    _rewrite(root, "config5.pt2", lambda n, d: config if n.endswith("weights_config.json") else d)


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
        (["info", "target.pt2"], "operator torch.ops.aten.linear.nonexistent is not a pure"),
        (["info", "major.pt2"], "written in torch.export schema version 999"),
        (["info", "deep.pt2"], "models/model.json: JSON nests deeper than 64 levels"),
        (["info", "missing.pt2"], "names the member data/weights/weight_0, which the archive"),
        (["info", "config5.pt2"], "model_weights_config.json: config must be a JSON object"),
    ]
    start = time.perf_counter()
    rows = run_capped([args for args, _ in cases], hostile, quiet_process=True)
    for (_, fragment), row in zip(cases, rows, strict=True):
        assert_one_line(row, 1, fragment)
    assert time.perf_counter() - start < TIME_LIMIT * 3
    threads = ["reconstruct", "small.pt", "--data", "moons", "-n", "4", "--threads", "1024"]
    (row,) = run_capped([threads], hostile, quiet_process=True)  # libgomp would print and exit 1
    assert_one_line(row, 2, "--threads 1024: the threads' stacks need ~8.0 GiB")


# ---------------------------------------------------------------------------------------------
# malformed metadata and inputs: one line each, in-process


def _edited(path: Path, out: Path, edit: object) -> Path:
    obj = torch.load(path, weights_only=True)
    edit(obj)  # type: ignore[operator]
    torch.save(obj, out)
    return out


_NATIVE_EDITS = {
    "params list": (lambda o: o["schedule"].update(params=[1, 2]), "schedule.params must be a"),
    "params text": (lambda o: o["schedule"].update(params="x"), "schedule.params must be a"),
    "params null": (lambda o: o["schedule"].update(params=None), "schedule.params must be a"),
    "beta 10**400": (
        lambda o: o["schedule"].update(params={"beta_start": 10**400}),
        "schedule.params.beta_start must be a finite number",
    ),
    "kind list": (lambda o: o["schedule"].update(kind=["linear"]), "schedule.kind must be a"),
    "kind null": (lambda o: o["schedule"].update(kind=None), "schedule.kind must be a name"),
    "betas text": (lambda o: o.update(schedule={"kind": "custom", "betas": ["0.1"] * 10}), "betas"),
    "training list": (lambda o: o.update(training=[1, 2]), "training must be a dict"),
    "training text": (lambda o: o.update(training="x"), "training must be a dict"),
    "training int": (lambda o: o.update(training=5), "training must be a dict"),
    "training tensor": (
        lambda o: o.update(training={"steps": torch.tensor([1, 2])}),
        "training.steps must be",
    ),
    "meta tensor": (
        lambda o: o["state_dict"].update(
            {k: torch.empty(v.shape, device="meta") for k, v in list(o["state_dict"].items())[:1]}
        ),
        "is a meta-device tensor",
    ),
    "sparse tensor": (
        lambda o: o["state_dict"].update(
            {k: v.to_sparse() for k, v in list(o["state_dict"].items())[:1]}
        ),
        "is a torch.sparse_coo tensor",
    ),
}


def _cli_one_line(result, code: int, fragment: str) -> None:  # type: ignore[no-untyped-def]
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert BUG_HINT not in lines[0] and fragment in lines[0], lines[0]


def test_malformed_native_metadata_is_one_line(cli, hostile: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for name, (edit, fragment) in _NATIVE_EDITS.items():
        path = _edited(hostile / "small.pt", tmp_path / f"{name.replace(' ', '_')}.pt", edit)
        _cli_one_line(cli("info", str(path)), 1, fragment)


def test_malformed_inputs_are_one_line(cli, hostile: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    np.savez(tmp_path / "ok.npz", x=np.zeros((8, 2), np.float32))
    raw = (tmp_path / "ok.npz").read_bytes()
    for name, (local, central, value) in {
        "encrypted": (6, 8, None),
        "method99": (8, 10, 99),
    }.items():
        data = bytearray(raw)
        at, cd = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
        if value is None:
            data[at + local] |= 1
            data[cd + central] |= 1
        else:
            struct.pack_into("<H", data, at + local, value)
            struct.pack_into("<H", data, cd + central, value)
        (tmp_path / f"{name}.npz").write_bytes(bytes(data))
        data_file = str(tmp_path / f"{name}.npz")
        result = cli("reconstruct", str(hostile / "small.pt"), "--data", data_file)
        _cli_one_line(result, 1, "encrypted or compressed in a way numpy does not read")
    rlo = tmp_path / "x\u202ey.pt"
    result = cli("info", str(rlo))
    _cli_one_line(result, 1, "x\\u202ey.pt")
    assert "\u202e" not in result.stderr
    _cli_one_line(cli("posterior", "--v", "nan"), 2, "--v must be a number in [-1, 1], got nan")
    result = cli(
        "reconstruct", str(hostile / "small.pt"), "--data", "moons", "-n", "4",
        env={"OMP_NUM_THREADS": "100000"},
    )  # fmt: skip
    _cli_one_line(result, 2, "OMP_NUM_THREADS='100000' must be a whole number from 1 to 1024")
    unet = tmp_path / "pipe" / "unet"
    unet.mkdir(parents=True)
    config = {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1,
              "out_channels": 1, "block_out_channels": [8], "layers_per_block": 1,
              "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"],
              "norm_num_groups": 4}  # fmt: skip
    (unet / "config.json").write_text(json.dumps(config))
    index = {"weight_map": {"a": "bad\u0000name.safetensors"}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "pipe" / "scheduler").mkdir()
    sched = {"_class_name": "DDPMScheduler", "num_train_timesteps": 10}
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    _cli_one_line(cli("info", str(tmp_path / "pipe")), 1, "not a file in the folder")


def test_ascii_stdout_prints_a_table_and_a_non_ascii_path() -> None:
    env = {**__import__("os").environ, "PYTHONIOENCODING": "ascii"}
    proc = subprocess.run(
        [sys.executable, "-m", "ddpmcli", "schedule", "-T", "3", "-f", "table", "--plot",
         "\u00e9t\u00e9/x.png"],
        capture_output=True, text=True, env=env, timeout=TIME_LIMIT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip() == "Error: cannot write plot '\\xe9t\\xe9/x.png': folder "
        "'\\xe9t\\xe9' does not exist"
    ), proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "ddpmcli", "schedule", "-T", "3", "-f", "table"],
        capture_output=True, text=True, env=env, timeout=TIME_LIMIT,
    )  # fmt: skip
    assert proc.returncode == 0 and "Error" not in proc.stderr, proc.stderr
    assert len(proc.stdout.strip().splitlines()) >= 4


# ---------------------------------------------------------------------------------------------
# work that never ends: figures decimate, tables of many rows thin out, and say so


def test_a_figure_of_many_timesteps_draws_evenly_spaced_ones(cli, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ddpmcli import core
    from ddpmcli.plotting import schedule as plots

    big = core.make_schedule("linear", 50_000)
    thin = plots.thinned(big)
    assert thin.num_steps == plots.MAX_PLOT_POINTS
    assert float(thin.alpha_bar[0]) == float(big.alpha_bar[0])
    assert float(thin.alpha_bar[-1]) == float(big.alpha_bar[-1])
    assert int(thin.timesteps[-1]) == 49_999
    assert plots.thinned(core.make_schedule("linear", 100)).num_steps == 100
    monkeypatch.setattr(plots, "MAX_PLOT_POINTS", 50)
    result = cli("schedule", "-T", "400", "--t", "0", "--plot", str(tmp_path / "s.png"))
    assert result.exit_code == 0, result.stderr
    assert "the figure draws 50 of the 400 timesteps, evenly spaced" in result.stderr
    assert (tmp_path / "s.png").stat().st_size > 0


def test_a_table_of_many_rows_shows_evenly_spaced_ones(cli, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ddpmcli import output

    monkeypatch.setattr(output, "MAX_TABLE_ROWS", 10)
    result = cli("schedule", "-T", "1000", "-f", "table", "--columns", "t,beta")
    assert result.exit_code == 0, result.stderr
    assert "a table shows at most 10 rows: 10 evenly spaced of 1000" in result.stderr
    body = [line.split()[0] for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert body[0] == "0" and body[-1] == "999" and len(body) == 10
    tsv = cli("schedule", "-T", "1000", "-f", "tsv", "--columns", "beta")
    assert len(tsv.stdout.splitlines()) == 1001 and "table shows" not in tsv.stderr


def test_a_vocabulary_with_text_ids_is_refused_when_loaded(tmp_path: Path) -> None:
    """String ids in vocab.json failed only when a prompt was encoded (the bug handler)."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent))
    import pipeline_folders

    from ddpmcli.checkpoints import text_encoders
    from ddpmcli.errors import CheckpointError

    folder = pipeline_folders.write_clip_tokenizer(tmp_path / "tok", "vocab.json")
    vocab = json.loads((folder / "vocab.json").read_text())
    (folder / "vocab.json").write_text(json.dumps({k: str(v) for k, v in vocab.items()}))
    with pytest.raises(CheckpointError, match=r"vocab\.json: must map each token to a whole"):
        text_encoders.load_tokenizer(folder, "clip")


def test_compare_checks_the_rows_of_all_its_schedules_together(cli, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Each spec's rows fit (2 MiB); the 40 specs' rows together (80 MiB) do not."""
    from ddpmcli import limits

    monkeypatch.setattr(limits, "available_memory", lambda: 3 * 1024**2)
    result = cli("compare", *["linear:T=1000"] * 40, "-f", "tsv")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("Error: 40000 rows of 40 schedules needs ~"), result.stderr
    assert result.stdout == ""
