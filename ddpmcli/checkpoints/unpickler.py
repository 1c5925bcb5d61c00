"""The restricted unpickler every format shares, and torch's own safe load with one-line errors.

:func:`scan_pickle` reads a pickle without ever importing or calling anything it names: each global
it asks for must be on a small allow-list (tensor rebuilders, storage types, ``OrderedDict``), and
is answered by an inert stand-in, so the result is a tree of plain containers and
:class:`TensorStub` objects (shape and dtype, no data). With ``allow_programs`` a TorchScript
module class (``__torch__.*``) becomes an inert :class:`ObjectStub` too, so ``ddpm info`` can read
a program's parameter shapes without loading it. Anything else is :class:`RefusedGlobal`.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpmcli.errors import CheckpointError

# Storage types torch.save names for each dtype (``torch FloatStorage`` ...).
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
_REFUSAL_TAIL = (
    "and a checkpoint may hold only tensors and plain containers (ddpm never runs code from a "
    "checkpoint)"
)


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a Python object outside the allow-list."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@dataclass(frozen=True)
class StorageStub:
    """A storage named by a persistent id: its archive key, dtype and element count."""

    key: str
    dtype: str
    numel: int


@dataclass
class TensorStub:
    """A tensor as the pickle describes it: no data, only what ``ddpm info`` reports."""

    storage: StorageStub | None
    shape: tuple[int, ...]
    parameter: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class ObjectStub:
    """An instance of a TorchScript class, kept as its class name and (inert) state.

    Pickle's NEWOBJ needs a real class, so each name gets a subclass (:func:`_class_stub`)."""

    stub_name = "object"

    def __init__(self, *args: Any) -> None:  # REDUCE: keep the arguments, run nothing
        self.args = args

    def __setstate__(self, state: Any) -> None:  # BUILD: keep the state, run nothing
        self.state = state


def _class_stub(name: str) -> type[ObjectStub]:
    return type("ObjectStub", (ObjectStub,), {"stub_name": name})


def _tensor_v2(storage: Any, offset: Any, size: Any, *rest: Any) -> TensorStub:
    shape = tuple(int(d) for d in size) if isinstance(size, (tuple, list)) else ()
    return TensorStub(storage if isinstance(storage, StorageStub) else None, shape)


def _parameter(data: Any, *rest: Any) -> Any:
    if isinstance(data, TensorStub):
        data.parameter = True
    return data


def _from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    return func(*args) if callable(func) else None


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # protocol-2 pickles spell a bytes object as _codecs.encode(str, "latin1")
    return str(text).encode("latin1" if encoding.lower() in ("latin1", "latin-1") else "utf-8")


_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type,
    ("torch", "Tensor"): lambda *a: None,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _codecs_encode,
}
# TorchScript's pickler helpers: they tag containers with their static type, nothing more
_TORCHSCRIPT_HELPERS = {
    "restore_type_tag": lambda value, *a: value,
    "build_intlist": list,
    "build_tensorlist": list,
    "build_doublelist": list,
    "build_boollist": list,
}


class _Restricted(pickle.Unpickler):
    def __init__(self, data: bytes, allow_programs: bool) -> None:
        super().__init__(io.BytesIO(data))
        self.allow_programs = allow_programs

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if self.allow_programs and module == "torch.jit._pickle" and name in _TORCHSCRIPT_HELPERS:
            return _TORCHSCRIPT_HELPERS[name]
        if self.allow_programs and (module == "__torch__" or module.startswith("__torch__.")):
            return _class_stub(f"{module}.{name}")
        raise RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            _, dtype, key, _location, numel = pid
            return StorageStub(str(key), str(dtype), int(numel))
        raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:40]!r}")


def scan_pickle(data: bytes, *, allow_programs: bool = False) -> Any:
    """Unpickle ``data`` into inert stand-ins; :class:`RefusedGlobal` for any other global.

    Raises ``pickle.UnpicklingError`` (or another parse error) for a stream that is not a pickle.
    """
    return _Restricted(data, allow_programs).load()


def scan_torch_save(data: bytes, *, allow_programs: bool = False) -> Any:
    """Scan a ``torch.save`` payload: a zip with ``*/data.pkl``, or a bare pickle stream."""
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            pickles = [n for n in zf.namelist() if n.endswith(".pkl")]
            if not pickles:
                raise pickle.UnpicklingError("no data.pkl in the zip container")
            results = [scan_pickle(zf.read(n), allow_programs=allow_programs) for n in pickles]
        return results[0]
    # a legacy stream is several pickles in a row (magic number, header, object, keys) and then
    # raw storage bytes: scan the pickles up to the storage keys
    start, found = 0, None
    for _ in range(5):
        if start >= len(data):
            break
        found = scan_pickle(data[start:], allow_programs=allow_programs)
        start += _consumed(data[start:])
        if isinstance(found, list) and all(isinstance(k, str) for k in found):
            break  # the storage keys: raw bytes follow
    return found


def _consumed(data: bytes) -> int:
    """Bytes of the first pickle in ``data`` (up to and including its STOP)."""
    import pickletools

    for op, _arg, pos in pickletools.genops(data):
        if op.name == "STOP":
            return (pos or 0) + 1
    return len(data)


def refusal(where: str, member: str | None, name: str) -> CheckpointError:
    """The one line for a pickle that needs a class outside the allow-list."""
    inside = f" (member {member})" if member else ""
    return CheckpointError(
        f"{where}: refused to load{inside}: the file needs the Python object {name}, "
        + _REFUSAL_TAIL
    )


def iter_tensors(tree: Any) -> Iterator[TensorStub]:
    """Every :class:`TensorStub` in a scanned tree (containers and object states), once each."""
    seen: set[int] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, TensorStub):
            yield node
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend(node)
        elif isinstance(node, ObjectStub):
            stack.extend([getattr(node, "state", None), *getattr(node, "args", ())])


def safe_torch_load(source: Path | io.BytesIO, where: str) -> Any:
    """``torch.load(weights_only=True)`` with every failure as one CheckpointError line."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise refusal(where, None, found.group(1)) from None
        raise CheckpointError(
            f"{where}: not a torch checkpoint (unreadable, truncated or unsupported content)"
        ) from None
    except Exception as exc:  # the safe unpickler raises many types on garbage (IndexError, ...)
        if isinstance(source, Path) and not zipfile.is_zipfile(source):
            # not torch's zip container: an old-style pickle, or not a checkpoint at all
            raise CheckpointError(
                f"{where}: not a torch checkpoint (unreadable, truncated or unsupported content)"
            ) from None
        raise CheckpointError(
            f"{where}: truncated or corrupt checkpoint ({one_line(exc)[:120]})"
        ) from None


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type name)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__
