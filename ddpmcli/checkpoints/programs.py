"""Programs: TorchScript (``torch.jit.save``) and ``torch.export`` (``.pt2``) archives.

A TorchScript file is code: ``torch.jit.load`` runs its scripted ``__setstate__`` and its
``forward`` can do anything TorchScript can (write files with ``torch.from_file``), so it is loaded
only with ``trust_program`` (``--trust-program``, ``DDPM_TRUST_PROGRAM=1``). Without it, ``ddpm
info`` reads the archive itself: the ``ddpm.json`` extra file and the parameter shapes in
``data.pkl``, through the restricted unpickler with inert stand-ins for the module classes.

A ``.pt2`` holds a graph (JSON) and tensors, but ``torch.export.load`` unpickles several members
with ``weights_only=False`` or ``pickle.loads`` (sample inputs, retried unsafely when the safe load
fails; weights and constants marked ``use_pickle``; legacy ``<model>.pt`` files; ``opaque_obj_*``
constants) and would load compiled AOTInductor code. So before torch sees the archive every member
that torch would unpickle is read by our restricted unpickler, compiled code and TorchBind objects
are refused, and while torch loads it ``torch.load`` is held to ``weights_only=True`` and the
archive module's ``pickle.loads`` to the restricted unpickler: no fallback can run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ddpmcli import limits
from ddpmcli.checkpoints.loaded import Denoiser, LoadedModel, loaded_model, module_mover
from ddpmcli.checkpoints.meta import METADATA_NAME, _finish, _merge, _Meta, _sidecar_meta
from ddpmcli.checkpoints.opvet import vet_graph_json, vet_graph_module
from ddpmcli.checkpoints.unpickler import (
    RefusedGlobal,
    iter_tensors,
    one_line,
    refusal,
    scan_pickle,
    scan_torch_save,
)
from ddpmcli.errors import CheckpointError, verbatim
from ddpmcli.files import atomic_write

TRUST_ENV = "DDPM_TRUST_PROGRAM"
TRUST_HINT = (
    "a TorchScript file executes its own code when it is loaded; load it only if you trust its "
    f"source: pass {{trust_program}} (or set {TRUST_ENV}=1)"
)
"""A template naming the parameter ``trust_program`` (``CheckpointError.naming``)."""
MAX_ARCHIVE_MEMBER_BYTES = 4 * 1024**3  # one pickled member of a program archive
MAX_PICKLED_STRUCTURE_BYTES = 256 * 1024**2  # data.pkl, sample inputs: structure, small tensors
MAX_GRAPH_JSON_BYTES = 512 * 1024**2  # one serialized graph (a large UNet's is a few MiB)


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* are deprecated in torch 2.x; still supported
        yield


def trust_from_env() -> bool:
    """Whether ``DDPM_TRUST_PROGRAM`` says to trust programs (``1``, ``true``, ``yes``)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------
# TorchScript


def load_torchscript(p: Path, given: _Meta, *, trust: bool, inspect_only: bool) -> LoadedModel:
    """A TorchScript archive: run only when trusted; read inertly for ``inspect_only``."""
    where = str(p)
    if not trust:
        if inspect_only:
            return _inspect_torchscript(p, given)
        raise CheckpointError.naming(f"{verbatim(where)}: {TRUST_HINT}")
    with _open_zip(p):
        pass  # the declared sizes, before torch inflates anything
    extra = {METADATA_NAME: ""}
    try:
        with _quiet_deprecation():
            module = torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    except (RuntimeError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{where}: corrupt TorchScript archive ({one_line(exc)[:120]})"
        ) from None
    module.eval()
    meta = _merge(_sidecar_meta(p, extra.get(METADATA_NAME), where), given)
    info = {
        "format": "torchscript",
        "learned_variance_inferred": meta.learned_variance is None,
        "architecture": getattr(module, "original_name", "TorchScript"),
        "parameters": sum(t.numel() for t in module.parameters()),
    }
    return loaded_model(
        module,
        _finish(meta, where, flags_hint=True),
        info,
        references=meta.reference_samples,
        mover=module_mover(module),
    )


def _not_loaded(x: Tensor, t: Tensor) -> Tensor:
    raise CheckpointError.naming(
        f"this TorchScript model was only inspected, not loaded: {TRUST_HINT}"
    )


def _inspect_torchscript(p: Path, given: _Meta) -> LoadedModel:
    """Metadata and parameter counts from the archive's members; nothing in it runs."""
    where = str(p)
    with _open_zip(p) as zf:
        names = zf.namelist()
        embedded = _member_text(zf, names, "/extra/" + METADATA_NAME)
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise CheckpointError(f"{where}: corrupt TorchScript archive (no data.pkl)")
        data = _read_member(zf, pkl, where)
    try:
        tree = scan_pickle(data, allow_programs=True)
    except RefusedGlobal as exc:
        raise refusal(where, pkl, exc.name) from None
    except Exception as exc:  # a corrupt pickle raises many types
        raise CheckpointError(f"{where}: corrupt TorchScript archive ({one_line(exc)})") from None
    meta = _merge(_sidecar_meta(p, embedded, where), given)
    finished = _finish(meta, where, flags_hint=True)
    stubs: dict[str, int] = {}
    for stub in iter_tensors(tree):
        key = stub.storage.key if stub.storage is not None else f"anon{id(stub)}"
        stubs[key] = max(stubs.get(key, 0), stub.numel)
    name = getattr(tree, "stub_name", "TorchScript")
    info = {
        "format": "torchscript",
        "architecture": str(name).rsplit(".", 1)[-1],
        "parameters": sum(stubs.values()),
        "inspected_only": True,
    }
    return loaded_model(_not_loaded, finished, info, references=meta.reference_samples)


# ---------------------------------------------------------------------------------------------
# reading archives


@contextlib.contextmanager
def _open_zip(p: Path) -> Iterator[zipfile.ZipFile]:
    try:
        with zipfile.ZipFile(p) as zf:
            _check_declared_sizes(zf, str(p))
            yield zf
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise CheckpointError(f"{p}: corrupt archive ({one_line(exc)})") from None
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read ({exc.strerror or exc})") from None


def _check_declared_sizes(zf: zipfile.ZipFile, where: str) -> None:
    """The archive's members, as their headers declare them inflated, must fit in memory together
    (torch reads every tensor member whole): a zip bomb is refused before a byte is inflated."""
    total = sum(info.file_size for info in zf.infolist())
    what = f"{where}: the archive's inflated members"
    limits.check_allocation(total, what, error=CheckpointError)


def _read_member(zf: zipfile.ZipFile, name: str, where: str) -> bytes:
    """One member's bytes, its declared (uncompressed) size checked first: against the format's
    limit (a pickled structure holds no tensor data, so it is small) and the memory available
    for it and what the unpickler builds from it."""
    size = zf.getinfo(name).file_size
    inner = name.split("/", 1)[1] if "/" in name else name
    structure = inner == "data.pkl" or inner.startswith(("data/sample_inputs/", "constants.pkl"))
    limit = MAX_PICKLED_STRUCTURE_BYTES if structure else MAX_ARCHIVE_MEMBER_BYTES
    if size > limit:
        raise CheckpointError(
            f"{where}: archive member {name} is too large ({size} bytes when inflated; at most "
            f"{limit})"
        )
    limits.check_allocation(2 * size, f"{where}: archive member {name}", error=CheckpointError)
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise CheckpointError(f"{where}: corrupt archive member {name} ({one_line(exc)})") from None


def _member_text(zf: zipfile.ZipFile, names: list[str], suffix: str) -> str | None:
    found = next((n for n in names if n.endswith(suffix)), None)
    if found is None:
        return None
    if zf.getinfo(found).file_size > limits.MAX_JSON_BYTES:
        raise CheckpointError(f"{zf.filename}: {found} is larger than the JSON size limit")
    return zf.read(found).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# torch.export


_COMPILED_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia/")
_PAYLOAD_DIRS = ("data/weights/", "data/constants/")
_PLAIN_FILES = ("archive_format", "archive_version", "byteorder", "version")


def scan_pt2(p: Path) -> None:
    """Read every member of a ``.pt2`` that torch would unpickle with the restricted unpickler;
    refuse compiled code and TorchBind objects. One CheckpointError line naming the member."""
    where = str(p)
    with _open_zip(p) as zf:
        names = zf.namelist()
        pickled = _pickled_payloads(zf, names, where)
        for name in names:
            inner = name.split("/", 1)[1] if "/" in name else name
            kind = _member_kind(inner, name in pickled)
            if kind == "compiled":
                raise CheckpointError(
                    f"{where}: refused to load: member {name} is compiled native code "
                    "(AOTInductor/ExecuTorch), which ddpm never loads"
                )
            if kind == "torchbind":
                raise CheckpointError(
                    f"{where}: refused to load: member {name} is a TorchBind object, restored by "
                    "torch's own pickler, which can run code"
                )
            if kind == "graph":
                _vet_graph_member(zf, name, where)
                continue
            if kind == "skip":
                continue
            data = _read_member(zf, name, where)
            if kind == "sniff" and not _looks_pickled(data):
                continue
            _scan_member(data, name, where, raw=kind == "pickle")


def _member_kind(inner: str, use_pickle: bool) -> str:
    """How torch reads a member: compiled/torchbind (refused), pickle, torch_save, sniff, skip."""
    if inner.startswith(_COMPILED_DIRS):
        return "compiled"
    if inner.startswith("models/") and inner.endswith(".json"):
        return "graph"
    if inner.endswith(".json") or inner.startswith(("extra/", ".data/")) or inner in _PLAIN_FILES:
        return "skip"
    if inner.startswith(_PAYLOAD_DIRS):
        base = inner.rsplit("/", 1)[-1]
        if base.startswith("custom_obj"):
            return "torchbind"
        if base.startswith("opaque_obj"):
            return "pickle"
        if use_pickle or base.endswith(".pt"):
            return "torch_save"
        return "skip"  # raw tensor bytes: torch never unpickles them
    if inner.startswith("data/sample_inputs/"):
        return "torch_save"
    return "sniff"


def _pickled_payloads(zf: zipfile.ZipFile, names: list[str], where: str) -> set[str]:
    """Members that a weights/constants config marks ``use_pickle``."""
    found: set[str] = set()
    for name in names:
        if not name.endswith("_config.json") or "/data/" not in f"/{name}":
            continue
        folder = name.rsplit("/", 1)[0]
        shown = f"{where}: {_inner(name)}"
        text = _member_text(zf, names, name) or "{}"
        config = limits.parse_json(text, shown, error=CheckpointError)
        entries = config.get("config") if isinstance(config, Mapping) else None
        if entries is not None and not isinstance(entries, Mapping):
            raise CheckpointError(f"{shown}: config must be a JSON object")
        for entry in (entries or {}).values():
            if not isinstance(entry, Mapping) or not isinstance(entry.get("path_name"), str):
                raise CheckpointError(f"{shown}: each entry must name its member (path_name)")
            member = f"{folder}/{entry['path_name']}"
            if member not in names:
                raise CheckpointError(
                    f"{shown}: names the member {_inner(member)}, which the archive lacks"
                )
            if entry.get("use_pickle"):
                found.add(member)
    return found


def _inner(name: str) -> str:
    """A member's name inside the archive's top folder (which is named after the file saved)."""
    return name.split("/", 1)[1] if "/" in name else name


def _vet_graph_member(zf: zipfile.ZipFile, name: str, where: str) -> None:
    """Every operator a serialized graph names, checked before torch deserializes it."""
    size = zf.getinfo(name).file_size
    if size > MAX_GRAPH_JSON_BYTES:
        raise CheckpointError(f"{where}: graph {name} is too large ({size} bytes)")
    limits.check_allocation(8 * size, f"reading the graph {name}", error=CheckpointError)
    text = _read_member(zf, name, where)
    shown = f"{where}: {_inner(name)}"
    graph = limits.parse_json(text, shown, error=CheckpointError, limit=size)
    _check_schema_version(graph, shown)
    vet_graph_json(graph, shown)


def _check_schema_version(graph: Any, shown: str) -> None:
    """The graph's serialization schema must be one this torch reads (same major version)."""
    from torch._export.serde.schema import SCHEMA_VERSION

    version = graph.get("schema_version") if isinstance(graph, Mapping) else None
    major = version.get("major") if isinstance(version, Mapping) else None
    if major != SCHEMA_VERSION[0]:
        raise CheckpointError(
            f"{shown}: written in torch.export schema version {major!r}; this torch "
            f"({torch.__version__}) reads version {SCHEMA_VERSION[0]}"
        )


def _looks_pickled(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04" or (len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5)


def _scan_member(data: bytes, name: str, where: str, *, raw: bool) -> None:
    try:
        if raw:
            scan_pickle(data)
        else:
            scan_torch_save(data)
    except RefusedGlobal as exc:
        raise refusal(where, name, exc.name) from None
    except Exception as exc:  # a corrupt or truncated pickle raises many types
        raise CheckpointError(
            f"{where}: corrupt archive member {name} ({one_line(exc)[:120]})"
        ) from None


def _refused_pickle_loads(data: bytes, *args: Any, **kwargs: Any) -> Any:
    raise pickle.UnpicklingError("ddpm refuses plain pickle.loads in a program archive")


@contextlib.contextmanager
def _no_unsafe_unpickling() -> Iterator[None]:
    """While torch reads a ``.pt2``: ``torch.load`` always ``weights_only=True`` (so its unsafe
    retry cannot run) and the archive module's ``pickle.loads`` refuses."""
    from torch.export.pt2_archive import _package

    real_load = torch.load

    def safe_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(f, *args, **kwargs)

    real_pickle = _package.pickle
    shim = SimpleNamespace(**{k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("_")})
    shim.loads = _refused_pickle_loads
    torch.load = safe_load
    _package.pickle = shim  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = real_load
        _package.pickle = real_pickle


@contextlib.contextmanager
def _quiet_torch_loggers() -> Iterator[None]:
    """torch's own loggers silenced while it reads an archive: a corrupt one makes them print
    tracebacks (15-36 lines) before the error that becomes our one line."""
    import logging

    saved = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(saved)


def load_exported(p: Path, given: _Meta) -> LoadedModel:
    """A ``torch.export`` archive, scanned first (:func:`scan_pt2`), then read by torch."""
    where = str(p)
    scan_pt2(p)
    extra: dict[str, Any] = {METADATA_NAME: ""}
    try:
        with _quiet_deprecation(), _quiet_torch_loggers(), _no_unsafe_unpickling():
            program = torch.export.load(str(p), extra_files=extra)
    except (Exception, RecursionError) as exc:  # torch.export raises many types for a bad archive
        raise CheckpointError(
            f"{where}: corrupt torch.export archive ({one_line(exc)[:120]})"
        ) from None
    vet_graph_module(program.graph_module, where)
    meta = _merge(_sidecar_meta(p, extra.get(METADATA_NAME), where), given)
    finished = _finish(meta, where, flags_hint=True)
    module = program.module()
    static_batch = _static_batch(program)
    program_dtype = _program_dtype(program)

    def mover(device: torch.device, dtype: torch.dtype | None) -> Denoiser:
        # An exported graph bakes its dtypes in, so it keeps its own and we cast at the boundary.
        module.to(device)
        return _ExportedDenoiser(module, static_batch, program_dtype)

    info: dict[str, Any] = {
        "format": "export",
        "learned_variance_inferred": meta.learned_variance is None,
        "architecture": "torch.export program",
        "parameters": sum(t.numel() for t in program.state_dict.values()),
    }
    if static_batch is not None:
        info["static_batch"] = static_batch
    return loaded_model(
        _ExportedDenoiser(module, static_batch, program_dtype),
        finished,
        info,
        references=meta.reference_samples,
        mover=mover,
    )


class _ExportedDenoiser:
    """Calls an exported program: casts to its dtype, and splits/pads to a static batch size."""

    def __init__(self, module: Any, static_batch: int | None, dtype: torch.dtype) -> None:
        self.module = module
        self.static_batch = static_batch
        self.dtype = dtype

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        out_dtype = x.dtype
        x = x.to(self.dtype)
        if self.static_batch is None or x.shape[0] == self.static_batch:
            return self.module(x, t).to(out_dtype)
        b = self.static_batch
        outs = []
        for start in range(0, x.shape[0], b):
            xs, ts = x[start : start + b], t[start : start + b]
            n = xs.shape[0]
            if n < b:  # pad the last chunk by repeating its first sample
                xs = torch.cat([xs, xs[:1].expand(b - n, *xs.shape[1:])])
                ts = torch.cat([ts, ts[:1].expand(b - n)])
            outs.append(self.module(xs, ts)[:n])
        return torch.cat(outs).to(out_dtype)


def _static_batch(program: Any) -> int | None:
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            val = node.meta.get("val")
            if val is not None and hasattr(val, "shape") and len(val.shape) > 0:
                first = val.shape[0]
                return int(first) if isinstance(first, int) else None
    return None


def _program_dtype(program: Any) -> torch.dtype:
    for value in program.state_dict.values():
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.dtype
    return torch.float32


def save_torchscript(
    model: nn.Module | torch.jit.ScriptModule,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Script ``model`` (unless scripted) and save it, with ``metadata`` as ``ddpm.json``."""
    with _quiet_deprecation():
        scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.script(model)
        files = {METADATA_NAME: json.dumps(dict(metadata))} if metadata is not None else {}
        return atomic_write(
            path, lambda tmp: torch.jit.save(scripted, str(tmp), _extra_files=files)
        )


def save_exported_program(
    model: nn.Module,
    path: str | os.PathLike[str],
    example: tuple[Tensor, Tensor],
    metadata: Mapping[str, Any] | None = None,
    *,
    dynamic_batch: bool = True,
) -> Path:
    """``torch.export`` ``model`` at ``example`` inputs (batch dynamic) and save it as ``.pt2``."""
    dynamic: Any = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic = ({0: batch}, {0: batch})
    program = torch.export.export(model, example, dynamic_shapes=dynamic)
    files = {METADATA_NAME: json.dumps(dict(metadata))} if metadata is not None else None
    return atomic_write(path, lambda tmp: torch.export.save(program, str(tmp), extra_files=files))
