"""Where and how a run executes: device and dtype names, the run's own arithmetic dtype, chunking.

Shared by every loop in :mod:`ddpmcli.run` (and the CLI's ``--device``/``--dtype`` options).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping

import torch

from ddpmcli import limits
from ddpmcli.errors import DdpmError, ParameterError, UsageError

__all__ = [
    "DEVICES",
    "DTYPES",
    "SMALL_MODEL_WORK",
    "apply_threads",
    "cpu_times",
    "free_cores",
    "idle_cores",
    "default_threads",
    "model_work",
    "usable_cores",
    "auto_chunk_size",
    "dtype_name",
    "iter_chunks",
    "resolve_device",
    "resolve_dtype",
    "spread",
    "work_dtype",
]

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


# =============================================================================================
# shared helpers: devices, dtypes, chunking, deterministic noise
# =============================================================================================


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; ``cpu|cuda|mps`` (or ``cuda:1``) checked to exist.

    Raises:
        UsageError: an unknown device name (exit 2).
        DdpmError: a known device this machine does not have (exit 1).
    """
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "auto").strip().lower()
    kind, _, index = text.partition(":")
    if kind not in DEVICES or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise UsageError(f"unknown device {name!r}; allowed: {', '.join(DEVICES)}")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DdpmError("device cuda requested but CUDA is not available on this machine")
        if index and int(index) >= torch.cuda.device_count():
            raise DdpmError(
                f"device {text} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    if kind == "mps" and not _mps_available():
        raise DdpmError("device mps requested but MPS is not available on this machine")
    return torch.device(text)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32|bfloat16|float16|float64`` (or a torch dtype) -> the torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise UsageError(f"unsupported dtype {name}; allowed: {', '.join(DTYPES)}")
        return name
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}") from None


def work_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the diagnostics' own arithmetic on ``device``: float64, except on MPS (which
    has none), whatever dtype the model runs in. Only the model's input and output are cast."""
    return torch.float32 if device.type == "mps" else torch.float64


def auto_chunk_size(
    numel_per_item: int,
    total: int,
    *,
    device: torch.device | str = "cpu",
    budget_bytes: int | None = None,
    bytes_per_element: int = 4,
    activation_factor: int = 256,
    max_chunk: int = 4096,
) -> int:
    """How many items (``numel_per_item`` values each) to push through a model at once.

    The model's activations dominate memory: about ``activation_factor`` times the input per item
    for the small UNets here (32-64 channels at full resolution, a few maps alive at once). The
    budget is 256 MiB on CPU/MPS and a quarter of the free memory on CUDA. The result lies in
    ``[1, min(total, max_chunk)]``; throughput is flat well before ``max_chunk`` on every device.
    """
    dev = torch.device(device)
    if budget_bytes is None:
        budget_bytes = 256 * 2**20
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            budget_bytes = max(budget_bytes, free // 4)
    per_item = max(1, numel_per_item) * bytes_per_element * activation_factor
    return max(1, min(total, max_chunk, budget_bytes // per_item))


def iter_chunks(total: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``0 .. total`` in steps of ``chunk``."""
    if chunk < 1:
        raise UsageError(f"batch size {chunk}: must be at least 1")
    for start in range(0, total, chunk):
        yield start, min(total, start + chunk)


def spread(count: int, k: int) -> list[int]:
    """Up to ``k`` positions spread evenly over ``0 .. count - 1`` (first and last included)."""
    if count <= k:
        return list(range(count))
    if k < 2:
        return [0][:k]
    return sorted({round(i * (count - 1) / (k - 1)) for i in range(k)})


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``float16``."""
    return str(dtype).removeprefix("torch.")


def wider_dtype_hint(dtype: torch.dtype) -> str:
    """``"; try the float32 dtype"`` for a half-precision model, where NaN/Inf may be overflow;
    nothing for float32/float64, where a wider dtype is no remedy."""
    return "" if dtype in (torch.float32, torch.float64) else "; try the float32 dtype"


# =============================================================================================
# CPU threads
# =============================================================================================

SMALL_MODEL_WORK = 2_000_000
"""Multiply-adds per item below which a model runs fastest on one CPU thread: its matrices are
too small to split, and a second thread only adds synchronisation (and loses badly when another
process is busy on a core). Measured by benchmarks/bench_threads.py (the 2-D MLP is ~70k)."""


def usable_cores(
    affinity: set[int] | None = None,
    cpu_max: str | None = None,
    cfs: tuple[str, str] | None = None,
) -> int:
    """The cores this process may actually use: its CPU affinity, capped by the cgroup's CPU
    quota (v2 ``cpu.max`` ``"QUOTA PERIOD"`` or ``"max PERIOD"``; v1 ``cpu.cfs_quota_us`` and
    ``cpu.cfs_period_us``), rounded up. The arguments replace what is read from the system."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # not Linux
            affinity = set(range(os.cpu_count() or 1))
    cores = max(1, len(affinity))
    if cpu_max is None and cfs is None:
        cpu_max = _read_text("/sys/fs/cgroup/cpu.max")
        if cpu_max is None:
            quota = _read_text("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
            period = _read_text("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
            cfs = (quota, period) if quota is not None and period is not None else None
    limit = _quota(cpu_max.split()[:2] if cpu_max else None) if cpu_max else None
    if limit is None and cfs is not None:
        limit = _quota(list(cfs))
    return max(1, min(cores, limit)) if limit is not None else cores


def _quota(parts: list[str] | None) -> int | None:
    """``ceil(quota / period)`` of a cgroup quota; None when unlimited or unreadable."""
    if not parts or len(parts) != 2:
        return None
    quota_text, period_text = (p.strip() for p in parts)
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:  # "max": no quota
        return None
    if quota <= 0 or period <= 0:  # v1 writes -1 for no quota
        return None
    return max(1, math.ceil(quota / period))


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read(256).strip()
    except (OSError, UnicodeDecodeError):
        return None


def cpu_times(stat: str | None = None) -> dict[int, tuple[int, int]]:
    """``{cpu: (idle, total)}`` jiffies from ``/proc/stat`` (or the text ``stat``); empty where
    unreadable."""
    text = _read_proc_stat() if stat is None else stat
    out: dict[int, tuple[int, int]] = {}
    for line in (text or "").splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        try:
            values = [int(v) for v in fields]
        except ValueError:
            continue
        if len(values) >= 5:
            out[int(name[3:])] = (values[3] + values[4], sum(values[:8]))  # idle + iowait
    return out


def _read_proc_stat() -> str | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return f.read(1 << 16)
    except (OSError, UnicodeDecodeError):
        return None


def idle_cores(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus: set[int]
) -> float | None:
    """How many of ``cpus`` were idle between two :func:`cpu_times` readings (a busy neighbour
    makes its core count ~0); None when nothing was measured."""
    idle = 0.0
    seen = False
    for cpu in cpus:
        if cpu in before and cpu in after:
            d_total = after[cpu][1] - before[cpu][1]
            if d_total > 0:
                idle += min(1.0, max(0.0, (after[cpu][0] - before[cpu][0]) / d_total))
                seen = True
    return idle if seen else None


def free_cores(window: float = 0.1) -> int:
    """The usable cores (:func:`usable_cores`) that are not busy with other processes, measured
    over ``window`` seconds, at least 1: other work on a core makes a thread there a straggler
    that every parallel kernel waits for."""
    usable = usable_cores()
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return usable
    before = cpu_times()
    time.sleep(window)
    idle = idle_cores(before, cpu_times(), cpus)
    if idle is None:
        return usable
    return max(1, min(usable, math.floor(idle + 0.5)))


def default_threads(
    work_per_item: int | None,
    *,
    local_world: int = 1,
    environ: Mapping[str, str] | None = None,
    cores: int | None = None,
) -> int:
    """The CPU thread count a command uses when ``--threads`` is not given.

    ``OMP_NUM_THREADS`` (a positive integer) wins; then one thread for a small model
    (``work_per_item`` multiply-adds below :data:`SMALL_MODEL_WORK`); otherwise the usable cores
    not busy with other work (:func:`free_cores`), divided among the ``local_world`` processes
    of this machine (torchrun's ``LOCAL_WORLD_SIZE``), at least one. torchrun sets
    ``OMP_NUM_THREADS=1`` for its workers when the user did not set it (and says so); that value,
    seen in a torchrun worker
    (``TORCHELASTIC_RUN_ID`` set) with several local processes, counts as unset: pass
    ``--threads 1`` to mean it.
    """
    env = os.environ if environ is None else environ
    text = env.get("OMP_NUM_THREADS", "").strip()
    launcher_default = text == "1" and local_world > 1 and bool(env.get("TORCHELASTIC_RUN_ID"))
    if text and not launcher_default:
        text = text.split(",", 1)[0].strip()  # OpenMP's list form "4,2": the outer level's
        if not text.isdigit() or not 1 <= int(text) <= limits.MAX_THREADS:
            raise UsageError(
                f"OMP_NUM_THREADS={text[:20]!r} must be a whole number from 1 to "
                f"{limits.MAX_THREADS} (as --threads)"
            )
        return limits.check_threads(int(text), "OMP_NUM_THREADS variable")
    if work_per_item is not None and work_per_item < SMALL_MODEL_WORK:
        return 1
    total = free_cores() if cores is None else cores
    return max(1, total // max(1, local_world))


def model_work(module: object, numel_per_item: int) -> int | None:
    """A rough count of multiply-adds per item: the parameter count for a model whose input is a
    short vector (an MLP applies every weight once per item), at most ``parameters x values``
    for an image model (each weight of a convolution is applied
    at every position of its resolution). None when the model's parameters cannot be read (a
    program): then it is taken as large."""
    params = getattr(module, "parameters", None)
    if params is None:
        return None
    try:
        count = sum(int(p.numel()) for p in params())
    except (TypeError, RuntimeError):
        return None
    if count == 0:
        return None
    return count if numel_per_item <= 64 else count * numel_per_item


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (the CLI's ``--threads``); returns the count
    in force. The library never calls this itself: a thread count set by the user through
    ``torch.set_num_threads`` stays as it is."""
    if threads is not None:
        if threads < 1:
            raise ParameterError(f"{{threads}} {threads}: must be at least 1")
        limits.check_threads(threads, "threads")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
