"""Ctrl-C against a model stuck in native code: a trusted TorchScript program that loops forever
never returns to the interpreter, so only the watchdog of `ddpmcli.checkpoints.guard` can end the
run. A real process, a real SIGINT: exit 130 within a few seconds and one `Error: interrupted`."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from ddpmcli import checkpoints, core

STEPS = 20
META = checkpoints.checkpoint_metadata(core.make_schedule("linear", STEPS), "epsilon", (2,))


class _Endless(torch.nn.Module):
    """Returns 0.1 x, except that a batch holding timestep ``at`` says so and loops forever."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        stuck = bool((t == self.at).any())
        if stuck:
            print("stuck in the loop")
        y = x
        while stuck:
            y = y * 1.0
        return 0.1 * y


def _read_stderr_until(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    """stderr of ``proc`` up to (and past) ``needle``, or whatever came within ``timeout``."""
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            seen += os.read(proc.stderr.fileno(), 4096)
    return seen


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize(
    ("at", "where"),
    [(STEPS - 1, "the load check (t = T-1)"), (5, "the sampling loop (t = 5)")],
)
def test_ctrl_c_ends_a_model_stuck_in_native_code(tmp_path: Path, at: int, where: str) -> None:
    path = tmp_path / "endless.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated, and still what people ship
        warnings.simplefilter("ignore", DeprecationWarning)
        checkpoints.save_torchscript(torch.jit.script(_Endless(at)), path, META)
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("DDPM_DEBUG", None)
    args = ["sample", str(path), "--trust-program", "--n", "2", "--steps", str(STEPS), "-f", "csv"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpmcli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        before = _read_stderr_until(proc, b"stuck in the loop", timeout=90)
        assert b"stuck in the loop" in before, (where, proc.poll(), before)
        time.sleep(0.3)  # well inside the loop now
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (where, proc.returncode, err)
    assert elapsed < 5, (where, elapsed)
    stderr = (before + err).decode()
    assert [line for line in stderr.splitlines() if line.startswith("Error:")] == [
        "Error: interrupted"
    ], stderr
    assert "Traceback" not in stderr and "DDPM_DEBUG" not in stderr
    assert out == b""  # the model's print went to stderr; no row was finished


def test_ctrl_c_during_an_import_is_delivered_when_the_import_ends() -> None:
    """A SIGINT that lands while a module is being imported (torch's import crosses C++ frames,
    which abort the process when an exception passes through them) is held until no import is
    running, then raised; a second Ctrl-C meanwhile raises at once."""
    code = (
        "import os, signal, sys, time, types\n"
        "from importlib.machinery import ModuleSpec\n"
        "from ddpmcli.cli import app\n"
        "from ddpmcli.errors import Interrupted\n"
        "signal.signal(signal.SIGINT, app._on_sigint)\n"
        "def importing(name):\n"
        "    module = types.ModuleType(name)\n"
        "    module.__spec__ = ModuleSpec(name, None)\n"
        "    module.__spec__._initializing = True\n"
        "    sys.modules[name] = module\n"
        "    return module\n"
        "slow = importing('slow_extension')\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.2)\n"
        "print('held', flush=True)\n"
        "try:\n"
        "    slow.__spec__._initializing = False\n"
        "    time.sleep(2)\n"
        "    print('never raised', flush=True)\n"
        "except Interrupted:\n"
        "    print('raised after the import', flush=True)\n"
        "app._sigint['deferred'] = False\n"
        "importing('another')\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.2)\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(2)\n"
        "    print('second never raised', flush=True)\n"
        "except Interrupted:\n"
        "    print('second raised at once', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[:3] == [
        "held", "raised after the import", "second raised at once"
    ], done.stderr  # fmt: skip
