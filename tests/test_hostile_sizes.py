"""Hostile sizes and files: every size is checked before it is allocated, every file we read is a
regular file of bounded size, and each failure is one `Error:` line naming the option or file."""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from ddpmcli import limits
from ddpmcli.errors import DataError, ScheduleError, UsageError

# ---------------------------------------------------------------------------------------------
# ddpmcli.limits itself


def test_available_memory_is_positive_and_below_physical() -> None:
    free = limits.available_memory()
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < free < physical


def test_available_memory_follows_rlimit_as() -> None:
    code = (
        "import resource; from ddpmcli import limits\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 * 1024**3, resource.RLIM_INFINITY))\n"
        "print(limits.available_memory())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert 0 < int(out) < 3 * 1024**3 * limits.MEMORY_MARGIN


def test_check_allocation() -> None:
    limits.check_allocation(1024, "--n 4")
    with pytest.raises(UsageError, match=r"^--n 9 needs ~8\.0e\+06 GiB|^--n 9 needs ~\d"):
        limits.check_allocation(2**63, "--n 9")
    with pytest.raises(DataError, match=r"^cfg\.json: sample_size needs ~.* GiB, more than the "):
        limits.check_allocation(2**63, "cfg.json: sample_size", error=DataError)


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (0, {}, "n must be at least 1, got 0"),
        (-3, {"minimum": 0}, "n must be at least 0, got -3"),
        (11, {"maximum": 10}, "n must be between 1 and 10, got 11"),
        (True, {}, "n must be an integer at least 1, got True"),
        (2.5, {}, "n must be an integer at least 1, got 2.5"),
    ],
)
def test_check_count_one_message_style(value: object, kwargs: dict, message: str) -> None:
    """The library names the parameter; the CLI shows the flag (``--n must be ...``)."""
    with pytest.raises(UsageError) as info:
        limits.check_count(value, "n", **kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message
    assert info.value.exit_code == 2
    assert info.value.render(lambda p: "--" + p) == "--" + message


def test_check_count_passes_values_in_range() -> None:
    assert limits.check_count(1, "n") == 1
    assert limits.check_count(10, "n", maximum=10) == 10
    assert limits.check_count(0, "every", minimum=0) == 0


def test_check_timesteps() -> None:
    assert limits.check_timesteps(1, "-T/--timesteps") == 1
    assert limits.check_timesteps(1000, "-T/--timesteps") == 1000
    with pytest.raises(UsageError, match=r"^-T/--timesteps must be between 1 and 10000000, got 0$"):
        limits.check_timesteps(0, "-T/--timesteps")
    with pytest.raises(ScheduleError, match=r"^c\.json: num_train_timesteps must be between"):
        limits.check_timesteps(10**9, "c.json: num_train_timesteps", error=ScheduleError)
    with pytest.raises(UsageError, match=r"^-T/--timesteps = 10 needs ~.* GiB, more than"):
        limits.check_timesteps(10, "-T/--timesteps", bytes_per_t=2**62)


def test_check_regular_file_refuses_without_opening(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    link = tmp_path / "zero.json"
    link.symlink_to("/dev/zero")
    plain = tmp_path / "ok.json"
    plain.write_text("{}")
    assert limits.check_regular_file(plain, "config") == plain
    with pytest.raises(DataError, match=r"pipe\.json: config is a FIFO, not a regular file$"):
        limits.check_regular_file(fifo, "config")
    with pytest.raises(DataError, match=r"zero\.json: config is a character device, not a"):
        limits.check_regular_file(link, "config")
    with pytest.raises(DataError, match=r": config is a folder, not a regular file$"):
        limits.check_regular_file(tmp_path, "config")
    with pytest.raises(UsageError, match=r"nothere\.json: no such file$"):
        limits.check_regular_file(tmp_path / "nothere.json", "config", error=UsageError)


def test_read_bytes_limit(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 100)
    assert limits.read_bytes(f, "sidecar", limit=100) == b"x" * 100
    with pytest.raises(DataError, match=r"f\.bin: sidecar is larger than the 99 bytes limit$"):
        limits.read_bytes(f, "sidecar", limit=99)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[" * 100_000 + "]" * 100_000, "nests deeper than 64 levels"),
        ('{"a":' * 65 + "1" + "}" * 65, "nests deeper than 64 levels"),
        ("[" + "7" * 5000 + "]", "an integer with 5000 digits (at most 64)"),
        ("-" + "7" * 65, "an integer with 65 digits"),
        ("1." + "0" * 5000, "a number 5002 characters long"),
        ("{", "not valid JSON (line 1, column 2"),
        (b"\xff\xfe[]", "not UTF-8 text"),
    ],
)
def test_parse_json_limits(text: str | bytes, fragment: str) -> None:
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        limits.parse_json(text, "cfg.json")
    assert str(info.value).startswith("cfg.json: ")
    assert fragment in str(info.value)
    assert time.monotonic() - start < 1.0


def test_parse_json_accepts_ordinary_documents() -> None:
    doc = {"a": [1, 2.5, None, "x", {"b": [[[]]]}], "n": 10**60}
    assert limits.parse_json(json.dumps(doc), "x") == doc
    assert limits.parse_json("[" * 64 + "]" * 64, "x") is not None


def test_read_json_size_fifo_and_dev_zero(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:  # sparse: 1 GB claimed without writing it
        fh.truncate(10**9)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"big\.json: config is larger than the 32 MiB limit$"):
        limits.read_json(big, "config")
    with pytest.raises(DataError, match=r"fifo\.json: config is a FIFO"):
        limits.read_json(fifo, "config")
    with pytest.raises(DataError, match=r"zero\.json: config is a character device"):
        limits.read_json(zero, "config")
    assert time.monotonic() - start < 1.0


# ---------------------------------------------------------------------------------------------
# helpers for the CLI cases: a real subprocess under a memory cap


MEMORY_CAP = 4 * 1024**3


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def ddpm_capped(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m ddpmcli ARGS` in a child limited to 4 GiB of address space, so a regression
    that allocates a huge array fails the test instead of taking the machine down."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("DDPM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "ddpmcli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_cap_memory,
        env=env,
        cwd=cwd,
    )


def assert_one_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    """Exit code, empty stdout, exactly one `Error:` line holding every fragment, no bug hint."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert "DDPM_DEBUG" not in result.stderr


# ---------------------------------------------------------------------------------------------
# hostile files and sizes through the real command line, under the memory cap


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of hostile files: lying headers, bombs, FIFOs and /dev/zero links (built once)."""
    from PIL import Image

    tmp_path = tmp_path_factory.mktemp("hostile")

    (tmp_path / "liar.npy").write_bytes(_npy_header((10**12,), "<f8") + b"\0" * 80)
    (tmp_path / "liar2d.npy").write_bytes(_npy_header((10**12, 2)) + b"\0" * 64)
    # a zip bomb: a member whose header and declared size agree on 4 GB of zeros (~4 MB packed)
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            header = _npy_header((10**6, 1000))
            member.write(header)
            zeros = b"\0" * (1 << 22)
            for _ in range(4 * 10**9 // len(zeros)):
                member.write(zeros)
            member.write(b"\0" * (4 * 10**9 % len(zeros)))
    (tmp_path / "pngs").mkdir()
    Image.new("L", (5000, 5000)).save(tmp_path / "pngs" / "big.png")
    (tmp_path / "bigT.json").write_text(json.dumps({"num_train_timesteps": 10**9}))
    (tmp_path / "digits.json").write_text('{"num_train_timesteps": ' + "9" * 5000 + "}")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with open(tmp_path / "huge.json", "wb") as fh:
        fh.truncate(10**9)
    os.mkfifo(tmp_path / "fifo.json")
    os.mkfifo(tmp_path / "fifo.npy")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "zero.npy").symlink_to("/dev/zero")
    _small_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / "imgs" / f"{i}.png")
    return tmp_path


def _small_checkpoint(path: Path) -> None:
    """A random 2-D MLP on a 20-step linear schedule, with 16 reference samples."""
    import torch

    from ddpmcli import checkpoints, core, models

    torch.manual_seed(0)
    hparams = models.default_hparams("mlp", (2,))
    checkpoints.save_native_checkpoint(
        path, models.build_model("mlp", hparams), architecture="mlp", hparams=hparams,
        schedule=core.make_schedule("linear", 20), prediction_type="epsilon", data_shape=(2,),
        reference_samples=torch.randn(16, 2),
    )  # fmt: skip


HOSTILE_FILES = sorted(
    ["liar.npy", "liar2d.npy", "bomb.npz", "pngs", "bigT.json", "digits.json", "deep.json",
     "huge.json", "fifo.json", "fifo.npy", "zero.json", "zero.npy", "ckpt.pt", "imgs"]
)  # fmt: skip

CASES = [
    # (args, exit code, fragments of the one Error: line)
    (["schedule", "-T", "1000000000000"], 2, ["-T/--timesteps", "1000000000000"]),
    (["posterior", "-T", "100000000"], 2, ["-T/--timesteps"]),
    (["schedule", "-T", "3000000", "-f", "csv"], 2, ["printing 3000000 rows", "--every"]),
    (["compare", "linear:T=1000000000000", "cosine"], 2, ["linear:T=1000000000000"]),
    (["schedule", "--from", "bigT.json"], 1, ["bigT.json: num_train_timesteps"]),
    (["schedule", "--from", "digits.json"], 1, ["digits.json", "5000 digits"]),
    (["check", "--from", "deep.json"], 1, ["deep.json", "nests deeper"]),
    (["schedule", "--from", "huge.json"], 1, ["huge.json", "32 MiB limit"]),
    (["schedule", "--from", "fifo.json"], 1, ["fifo.json", "FIFO"]),
    (["schedule", "--from", "zero.json"], 1, ["zero.json", "character device"]),
    (["schedule", "--betas-file", "liar.npy"], 1, ["liar.npy", "header claims shape"]),
    (["schedule", "--betas-file", "zero.npy"], 1, ["zero.npy", "character device"]),
    (["train", "--data", "liar2d.npy", "-o", "o.pt"], 1, ["liar2d.npy", "header claims"]),
    (["train", "--data", "bomb.npz", "-o", "o.pt"], 1, ["bomb.npz: array 'x'", "GiB"]),
    (["train", "--data", "pngs", "-o", "o.pt"], 1, ["big.png", "5000 x 5000 pixels"]),
    (["train", "--data", "fifo.npy", "-o", "o.pt"], 1, ["fifo.npy", "FIFO"]),
    (["train", "--n", "1000000000", "-o", "o.pt"], 2, ["--n 1000000000 needs"]),
    (["train", "--batch-size", "1000000000", "-o", "o.pt"], 2, ["--batch-size 1000000000"]),
    (["train", "--width", "1000000", "-o", "o.pt"], 2, ["--width 1000000 needs"]),
    (["train", "--references", "1000000000", "-o", "o.pt"], 2, ["--references 1000000000"]),
    # --data-shape: positive sizes, a sane size, and the built-in set's own shape
    (["train", "--data-shape", "0", "-o", "o.pt"], 2, ["--data-shape [0]", "positive sizes"]),
    (["train", "--data-shape", "-5", "-o", "o.pt"], 2, ["--data-shape [-5]"]),
    (["train", "--data", "gmm", "--data-shape", "3", "-o", "o.pt"], 2, ["--data-shape 3", "gmm"]),
    (["train", "--data-shape", "3,100000,100000", "-o", "o.pt"], 2, ["--data-shape", "values"]),
    (["train", "--data", "imgs", "--data-shape", "1,4000,4000", "-o", "o.pt"], 2,
     ["--batch-size (default 64)", "1,4000,4000"]),
    (["sample", "ckpt.pt", "--data-shape", "0"], 2, ["--data-shape [0]"]),
    # sample counts and batches of the commands that run a model
    (["sample", "ckpt.pt", "--n", "1000000000"], 2, ["--n 1000000000 needs"]),
    (["sample", "ckpt.pt", "--n", "10000000"], 2, ["--n 10000000 in one batch", "--batch-size"]),
    (["sample", "ckpt.pt", "--n", "0"], 2, ["--n must be at least 1, got 0"]),
    (["reconstruct", "ckpt.pt", "--n", "1000000000"], 2, ["--n 1000000000 needs"]),
    (["reconstruct", "ckpt.pt", "--data", "moons", "--n", "1000000000"], 2, ["--n 1000000000"]),
    (["reconstruct", "ckpt.pt", "--data", "moons", "--n", "1000000", "--per-sample"], 2,
     ["--n 1000000 (printing 10000000 rows)"]),
    (["reconstruct", "ckpt.pt", "--data", "moons", "--n", "10000000", "--batch-size",
      "1000000000"], 2, ["--batch-size 1000000000 needs"]),
    (["nll", "ckpt.pt", "--n", "1000000000"], 2, ["--n 1000000000 needs"]),
    (["nll", "ckpt.pt", "--data", "moons", "--n", "1000000000"], 2, ["--n 1000000000 needs"]),
    (["nll", "ckpt.pt", "--data", "moons", "--n", "10000000", "--batch-size", "1000000000"], 2,
     ["--batch-size", "1000000000"]),
    (["nll", "ckpt.pt", "--n", "2", "--batch-size", "0"], 2, ["--batch-size", "at least 1"]),
    # numbers that overflow a C type or the OpenMP runtime
    (["sample", "ckpt.pt", "--n", "2", "--seed", "1" + "0" * 23], 2, ["'--seed'", "range"]),
    (["sample", "ckpt.pt", "--n", "2", "--sampler", "ddim", "--eta", "1e308"], 2, ["--eta"]),
    (["nll", "ckpt.pt", "--n", "2", "--threads", "1000000"], 2, ["'--threads'", "range"]),
    (["train", "--steps", "2", "--threads", "1000000", "-o", "o.pt"], 2, ["'--threads'"]),
]  # fmt: skip


_BATCH_RUNNER = """
import io, json, sys, time
from ddpmcli.cli.app import run_main
real_out, real_err = sys.stdout, sys.stderr
results = []
for args in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    sys.stdout, sys.stderr = out, err
    start = time.monotonic()
    try:
        code = run_main(args)
    except BaseException as exc:
        code = -1
        err.write(f"runner: {exc!r}")
    finally:
        sys.stdout, sys.stderr = real_out, real_err
    results.append([code, out.getvalue(), err.getvalue(), time.monotonic() - start])
json.dump(results, real_out)
"""


@pytest.fixture(scope="module")
def capped_results(hostile: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every case of CASES through `ddpm`'s own entry point (``run_main``, what the console
    script calls), in one child under the memory cap: one torch import instead of one per case.
    A first harmless command takes the imports, so each case's time is the check's own."""
    warm = ["schedule", "-T", "5", "-f", "csv"]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("DDPM_DEBUG", None)
    child = subprocess.run(
        [sys.executable, "-c", _BATCH_RUNNER], input=json.dumps([warm] + [c[0] for c in CASES]),
        capture_output=True, text=True, timeout=600, preexec_fn=_cap_memory, env=env, cwd=hostile,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout)[1:]
    out = {}
    for case, (code, stdout, stderr, seconds) in zip(CASES, results, strict=True):
        args = case[0]
        done = subprocess.CompletedProcess(args, code, stdout, stderr)
        done.seconds = seconds  # type: ignore[attr-defined]
        out[" ".join(args)] = done
    return out


@pytest.mark.parametrize(("args", "code", "fragments"), CASES, ids=lambda v: str(v)[:40])
def test_hostile_input_is_one_error_line(
    capped_results: dict[str, subprocess.CompletedProcess[str]],
    hostile: Path,
    args: list[str],
    code: int,
    fragments: list[str],
) -> None:
    result = capped_results[" ".join(args)]
    assert_one_error(result, code, *fragments)
    assert not (hostile / "o.pt").exists()
    assert sorted(p.name for p in hostile.iterdir()) == HOSTILE_FILES  # nothing left behind
    # each check answers within a second (a loaded 2-core machine: allow a few)
    assert result.seconds < 5, result.seconds  # type: ignore[attr-defined]


def test_hostile_input_through_the_console_script(hostile: Path) -> None:
    """The same, for one case, through a real `python -m ddpmcli` process under the cap."""
    start = time.monotonic()
    result = ddpm_capped("sample", "ckpt.pt", "--n", "1000000000", cwd=hostile)
    assert_one_error(result, 2, "--n 1000000000 needs")
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------------------------------------
# ddpm check for any T, and a trained_betas length mismatch as a finding


@pytest.mark.parametrize("big_t", [1, 2, 20, 49])
def test_check_config_with_small_t(cli, tmp_path: Path, big_t: int) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "scheduler_config.json"
    cfg.write_text(json.dumps({"num_train_timesteps": big_t}))
    result = cli("check", "--from", str(cfg), "-f", "csv")
    assert result.exit_code in (0, 1), result.stderr
    assert "Error:" not in result.stderr
    assert result.stdout.startswith("severity,code,t,message\n")


@pytest.mark.parametrize("length", [5, 15])
def test_check_reports_trained_betas_length_mismatch(cli, tmp_path: Path, length: int) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "scheduler_config.json"
    cfg.write_text(json.dumps({"num_train_timesteps": 10, "trained_betas": [0.01] * length}))
    result = cli("check", "--from", str(cfg), "-f", "csv")
    assert result.exit_code == 1
    assert "Error:" not in result.stderr
    lines = [line for line in result.stdout.splitlines() if "trained_betas_length" in line]
    assert lines == [
        f"error,trained_betas_length,,trained_betas has {length} values but num_train_timesteps "
        f"is 10: diffusers indexes one with the other (the schedule here uses the {length} betas)"
    ]


def test_n_beyond_the_data_is_said(hostile: Path) -> None:
    """reconstruct and nll use every sample there is when --n asks for more, and say so."""
    for command in ("reconstruct", "nll"):
        result = ddpm_capped(command, "ckpt.pt", "--n", "100", "-f", "csv", cwd=hostile)
        assert result.returncode == 0, result.stderr
        assert "--n 100 is more than the 16 samples of reference samples; using all" in (
            result.stderr
        )
        assert result.stdout.count("\n") > 2


# ---------------------------------------------------------------------------------------------
# a diffusers config's label table and time embedding count toward the allocation check


@pytest.mark.parametrize(
    ("config", "what"),
    [
        (  # a 32-channel UNet whose label table alone is 2**20 x 65536 floats (256 GiB)
            {
                "_class_name": "UNet2DModel", "sample_size": 8, "block_out_channels": [32],
                "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"],
                "num_class_embeds": 1 << 20, "time_embedding_dim": 65536,
            },
            "the UNet2DModel it describes",
        ),
        (  # a one-layer DiT of width 2048 (0.3 GB of blocks); its label table is 8 GiB
            {
                "_class_name": "DiTTransformer2DModel", "sample_size": 8, "in_channels": 4,
                "num_attention_heads": 2, "attention_head_dim": 1024, "num_layers": 1,
                "num_embeds_ada_norm": 1 << 20,
            },
            "the DiT it describes",
        ),
    ],
)  # fmt: skip
def test_diffusers_label_tables_are_checked_before_allocating(
    tmp_path: Path, config: dict[str, object], what: str
) -> None:
    folder = tmp_path / "pipe"
    net = folder / ("unet" if config["_class_name"] == "UNet2DModel" else "transformer")
    net.mkdir(parents=True)
    (net / "config.json").write_text(json.dumps(config))
    sched = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    cap = "import resource; resource.setrlimit(resource.RLIMIT_AS, (8 * 1024**3, -1))\n"
    code = cap + "from ddpmcli.cli.app import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "info", str(folder)], capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and what in lines[0], lines
