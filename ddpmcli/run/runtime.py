"""Where and how a run executes: device and dtype names, the run's own arithmetic dtype, chunking.

Shared by every loop in :mod:`ddpmcli.run` (and the CLI's ``--device``/``--dtype`` options).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ddpmcli.errors import DdpmError, UsageError

__all__ = [
    "DEVICES",
    "DTYPES",
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
