"""Memory of a load and the chunk benchmark's statistics (issue 8: never hungrier than the plain
diffusers loop)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ddpmcli.checkpoints.loaded import load_state
from ddpmcli.errors import CheckpointError

STATUS = Path("/proc/self/status")


def _status_mb(field: str) -> float:
    line = next(s for s in STATUS.read_text().splitlines() if s.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def test_load_state_takes_the_state_tensors_instead_of_copying() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = {k: torch.randn(v.shape) for k, v in net.state_dict().items()}
    load_state(net, state, "here")
    for key, param in net.named_parameters():
        assert param.data_ptr() == state[key].data_ptr()  # one copy: the state's own memory
        assert isinstance(param, nn.Parameter) and torch.equal(param, state[key])
    out = net(torch.ones(1, 3))
    want = torch.ones(1, 3) @ state["0.weight"].T + state["0.bias"]
    want = want @ state["1.weight"].T + state["1.bias"]
    assert torch.allclose(out, want)


@pytest.mark.parametrize("how", ["dtype", "tied", "strides"])
def test_load_state_copies_when_taking_would_change_the_module(how: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    state = {k: torch.randn(v.shape) for k, v in net.state_dict().items()}
    if how == "dtype":  # a float64 state into a float32 module: cast, the module stays float32
        state = {k: v.double() for k, v in state.items()}
    elif how == "tied":  # two entries sharing memory must not tie two parameters
        state["1.weight"] = state["0.weight"]
    else:  # a transposed view: the module keeps its own contiguous layout
        state["0.weight"] = state["0.weight"].T.contiguous().T
    load_state(net, state, "here")
    w0, w1 = net[0].weight, net[1].weight
    assert w0.dtype == torch.float32 and w0.is_contiguous()
    assert w0.data_ptr() != state["0.weight"].data_ptr() and w0.data_ptr() != w1.data_ptr()
    assert torch.equal(w0, state["0.weight"].float()) and torch.equal(w1, state["1.weight"].float())


def test_load_state_still_refuses_a_wrong_shape() -> None:
    net = nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="'weight' has shape \\[3, 3\\], the model wants"):
        load_state(net, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "here")


@pytest.mark.skipif(not STATUS.is_file(), reason="reads /proc/self/status")
def test_a_load_keeps_one_copy_of_the_weights() -> None:
    # 48 MiB of weights: while the loader still holds the state dict (as every format's does
    # until the load returns), the module's freshly initialised parameters are already freed,
    # so the process holds the weights once; copying kept both the state and the module's own
    # (in a fresh interpreter: a long test process's allocator may keep freed blocks mapped)
    code = (
        "import torch; from torch import nn\n"
        "from ddpmcli.checkpoints.loaded import load_state\n"
        "def rss():\n"
        "    line = next(s for s in open('/proc/self/status') if s.startswith('VmRSS:'))\n"
        "    return int(line.split()[1]) / 1024\n"
        "net = nn.Linear(4096, 3072, bias=False)\n"
        "state = {'weight': torch.randn(3072, 4096)}\n"
        "before = rss()\n"
        "load_state(net, state, 'here')\n"
        "print(before - rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) > 40


def _bench() -> Any:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_chunk.py"
    # the benchmarks import their shared helper (benchmarks/_results.py) as a script would
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("bench_chunk", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_chunk"] = module
    spec.loader.exec_module(module)
    return module


def test_bench_runs_every_case_interleaved_and_reports_medians(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = _bench()
    order: list[str] = []
    figures = {"a": [3.0, 1.0, 2.0], "b": [4.0, 9.0, 5.0], "c": [6.0, 6.0, 6.0]}

    def fake_child(case: str, folder: Path, env: Any = None) -> dict[str, Any]:
        value = figures[case][sum(c == case for c in order)]
        order.append(case)
        return {"case": case, "chunk": 16, "seconds": value, "peak_rss_mb": 100 * value,
                "load_peak_rss_mb": 50.0}  # fmt: skip

    monkeypatch.setattr(bench, "child", fake_child)
    rows = bench.measure(["a", "b", "c"], Path("."), 3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotated each repeat
    a, b, c = rows
    assert a["seconds"] == {"median": 2.0, "min": 1.0, "max": 3.0, "all": [3.0, 1.0, 2.0]}
    assert b["peak_rss_mb"]["median"] == 500.0 and b["runs"] == 3
    assert b["time_vs_baseline"] == 2.5 and c["rss_vs_baseline"] == 3.0  # ratios of medians
    assert a["time_vs_baseline"] == 1.0


@pytest.mark.skipif(not STATUS.is_file(), reason="reads /proc/self/status")
def test_bench_peak_is_this_process_own() -> None:
    bench = _bench()
    # read around the call: the interpreter may touch a new page between two reads (seen: VmRSS
    # read after VmHWM came out 4 KiB higher), and the high-water mark only grows
    rss, before = _status_mb("VmRSS"), _status_mb("VmHWM")
    peak = bench.peak_rss_mb()
    assert before <= peak <= _status_mb("VmHWM") and peak >= rss
