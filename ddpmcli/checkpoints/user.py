"""Your own architecture: ``model="MODULE:FACTORY"`` (the CLI's ``--model``).

``MODULE`` is an importable dotted path (``mypkg.nets``, looked up on ``sys.path`` and the current
folder) or a Python file (``path/to/adapter.py``); ``FACTORY`` a callable in it, called as::

    factory(checkpoint_path: pathlib.Path, load_weights) -> nn.Module | (nn.Module, metadata)

``load_weights(path)`` reads a safetensors file or a ``torch.save`` file through torch's
``weights_only`` loader (tensors and plain containers; a pickle naming any other class is refused),
and returns its top-level dict. ``metadata`` has the keys of a ``ddpm.json``: ``schedule`` (a spec
dict such as ``{"kind": "cosine", "timesteps": 1000}`` or a tensor of betas), ``prediction_type``,
``learned_variance``, ``data_shape``, ``data_range``; what it leaves out comes from the caller's
options (``kind``, ``timesteps``, ``prediction_type``, ...), which win over it. A class-conditional
module declares ``num_classes`` (its labels are 0..N-1) and, if it was trained with label dropout
for classifier-free guidance, ``null_label`` (its unconditional label, outside 0..N-1: usually N,
the extra row of its label table); it is then called ``module(x_t, t, labels)`` with int64 labels
``[B]``, chosen and guided by :mod:`.conditioning` exactly as a diffusers class-conditional model.

Trust: importing the named module runs its code, and that is the user's explicit choice (the
factory may do anything Python can); the weights themselves are still read safely when the factory
uses ``load_weights``. The module is called ``module(x_t, t)`` with int64 model timesteps, in eval
mode; with a learned variance its output carries ``[prediction, v]`` along dim 1 (2C channels),
and when nothing says whether it does, twice the channels is taken as a learned variance.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from ddpmcli import limits
from ddpmcli.checkpoints.conditioning import (
    MAX_CLASSES,
    Conditioning,
    LabelChoice,
    class_counts,
)
from ddpmcli.checkpoints.loaded import LoadedModel, check_output_shape, loaded_model, module_mover
from ddpmcli.checkpoints.meta import _finish, _merge, _Meta, _parse_meta
from ddpmcli.checkpoints.unpickler import one_line, safe_torch_load
from ddpmcli.errors import CheckpointError, DdpmError, ParameterError, verbatim

SAFETENSORS_SUFFIX = ".safetensors"
Factory = Callable[..., Any]
"""``factory(checkpoint_path, load_weights) -> nn.Module | tuple[nn.Module, Mapping]``."""


def load_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dict stored in a weights file, read without running any code from it.

    A ``.safetensors`` file (or one that is not torch's zip or pickle) is read with safetensors;
    anything else with ``torch.load(weights_only=True)``: tensors and plain containers only, a
    pickle naming any other class is refused. Returns a state dict ``{name: Tensor}`` or, for a
    training checkpoint such as denoising-diffusion-pytorch's ``model-N.pt``, its nested dict.

    Raises:
        CheckpointError: a missing, unreadable or refused file, or one that holds no dict.
    """
    p = Path(path)
    where = str(p)
    if not p.exists():
        raise CheckpointError(f"weights not found: {where}")
    limits.check_regular_file(p, "weights", error=CheckpointError)
    if p.suffix == SAFETENSORS_SUFFIX:
        obj: Any = _safetensors(p, where)
    else:
        obj = safe_torch_load(p, where)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: holds a {type(obj).__name__}, not a dict of weights")
    return dict(obj)


def _safetensors(p: Path, where: str) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{where}: reading safetensors needs the safetensors package (pip install safetensors)"
        ) from None
    try:
        return dict(load_file(str(p), device="cpu"))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(
            f"{where}: truncated or corrupt safetensors file ({one_line(exc)})"
        ) from None


def resolve_factory(spec: str) -> Factory:
    """The callable named by ``MODULE:FACTORY`` (a dotted module or a ``.py`` file), imported.

    Raises:
        ParameterError: the spec is not ``MODULE:FACTORY`` (a usage error).
        CheckpointError: the module cannot be imported, lacks the name, or it is not callable.
    """
    module_part, sep, name = spec.rpartition(":")
    if not sep or not module_part.strip() or not name.strip():
        raise ParameterError(
            f"{{model}} {verbatim(repr(spec))}: want MODULE:FACTORY (a dotted module such as "
            "mypkg.nets:make, or a file such as adapters/mine.py:make)"
        )
    module = _import(module_part.strip(), spec)
    factory = getattr(module, name.strip(), None)
    if factory is None:
        raise CheckpointError.naming(
            f"{{model}} {verbatim(spec)}: {verbatim(module_part)} has no attribute "
            f"{verbatim(repr(name))}"
        )
    if not callable(factory):
        raise CheckpointError.naming(
            f"{{model}} {verbatim(spec)}: {verbatim(name)} is a {type(factory).__name__}, "
            "not a callable factory"
        )
    return factory


def _import(module_part: str, spec: str) -> ModuleType:
    """Import a dotted module (the current folder on the path, as ``python -m`` has it) or a
    ``.py`` file (its folder on the path, so it can import its neighbours)."""
    is_file = module_part.endswith(".py") or "/" in module_part or os.sep in module_part
    try:
        if not is_file:
            _on_path(os.getcwd())
            return importlib.import_module(module_part)
        path = Path(module_part).resolve()
        if not path.is_file():
            raise CheckpointError.naming(
                f"{{model}} {verbatim(spec)}: no such file {verbatim(module_part)}"
            )
        _on_path(str(path.parent))
        name = f"ddpm_user_model_{path.stem}"
        found = importlib.util.spec_from_file_location(name, path)
        if found is None or found.loader is None:
            raise CheckpointError.naming(
                f"{{model}} {verbatim(spec)}: {verbatim(module_part)} is not a Python module"
            )
        module = importlib.util.module_from_spec(found)
        sys.modules[name] = module  # dataclasses and pickling look their module up here
        try:
            found.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    except DdpmError:
        raise
    except ModuleNotFoundError as exc:
        raise CheckpointError.naming(
            f"{{model}} {verbatim(spec)}: cannot import {verbatim(module_part)} "
            f"({verbatim(one_line(exc))})"
        ) from None
    except Exception as exc:  # the user's module failed while it ran its own top level
        raise CheckpointError.naming(
            f"{{model}} {verbatim(spec)}: importing {verbatim(module_part)} failed "
            f"({type(exc).__name__}: {verbatim(one_line(exc))})"
        ) from None


def _on_path(folder: str) -> None:
    if folder not in sys.path:
        sys.path.insert(0, folder)


def load_user_model(p: Path, spec: str, given: _Meta, *, inspect_only: bool) -> LoadedModel:
    """The checkpoint ``p`` opened by the user's factory ``spec``, its metadata (the factory's,
    overridden by ``given``) completed, as a :class:`LoadedModel`."""
    where = str(p)
    if not os.path.lexists(p):
        raise CheckpointError(f"checkpoint not found: {where}")
    factory = resolve_factory(spec)
    module, raw = _call_factory(factory, p, spec)
    file_meta = _Meta() if raw is None else _parse_meta(raw, f"{spec} metadata")
    classes = None if raw is None else _classes(raw, spec)
    meta = _merge(file_meta, given)
    _check_complete(meta, where, spec)
    module.eval()
    info: dict[str, Any] = {
        "format": "user",
        "factory": spec,
        "learned_variance_inferred": meta.learned_variance is None,
        "architecture": type(module).__name__,
        "parameters": sum(t.numel() for t in module.parameters()),
    }
    if classes is not None:  # conditioning.attach reads these, as it does a diffusers loader's
        info["num_classes"], info["null_label"] = classes
    if meta.variance is not None:  # the variance its trainer used: sample's and nll's default
        info["variance"] = meta.variance
    loaded = loaded_model(
        module,
        _finish(meta, where, flags_hint=True),
        info,
        references=meta.reference_samples,
        mover=module_mover(module),
    )
    refs = loaded.reference_samples
    if refs is not None and tuple(refs.shape[1:]) != tuple(loaded.data_shape):
        raise CheckpointError.naming(
            f"{{model}} {verbatim(spec)}: metadata reference_samples have shape "
            f"{list(refs.shape[1:])}, data shape is {list(loaded.data_shape)}"
        )
    if inspect_only and loaded.info["learned_variance_inferred"]:
        # the user chose to run this code: one tiny forward pass tells a learned variance apart
        _check_inferred(loaded, classes, where)
    return loaded


def _classes(raw: Mapping[str, Any], spec: str) -> tuple[int, int | None] | None:
    """``(num_classes, null_label)`` declared by the factory's metadata, None if it has none
    (checked by :func:`~ddpmcli.checkpoints.conditioning.class_counts`).

    Labels 0..N-1 are the classes; the null label, where there is one, is none of them (so
    ``all`` and ``random`` never pick it, as with diffusers' and DiT's label tables).
    """
    given_num, given_null = raw.get("num_classes"), raw.get("null_label")
    try:
        return class_counts(given_num, given_null)
    except ValueError as exc:
        where = f"{{model}} {verbatim(spec)}"
        if exc.args[0] == "null_label without num_classes":
            raise CheckpointError.naming(
                f"{where}: the factory's metadata gives null_label but no num_classes"
            ) from None
        if exc.args[0] == "num_classes":
            raise CheckpointError.naming(
                f"{where}: metadata num_classes must be an integer in 1..{MAX_CLASSES}, got "
                f"{verbatim(repr(given_num))}"
            ) from None
        num = exc.args[1]
        raise CheckpointError.naming(
            f"{where}: metadata null_label must be an integer outside the classes 0..{num - 1} "
            f"(usually {num}, the label table's extra row), got {verbatim(repr(given_null))}"
        ) from None


def _check_inferred(
    loaded: LoadedModel, classes: tuple[int, int | None] | None, where: str
) -> None:
    """The load-time output check of ``info``, which attaches no conditioning: a class-conditional
    module is called with label 0 for it (it may refuse a call without labels)."""
    if classes is not None:
        loaded.conditioning = Conditioning(classes[0], classes[1], LabelChoice("fixed", 0, 0))
    try:
        check_output_shape(loaded, where)
    finally:
        loaded.conditioning = None


_HOW = {
    "schedule": "{kind} (and {timesteps})",
    "prediction_type": "{prediction_type}",
    "data_shape": "{data_shape}",
}


def _check_complete(meta: _Meta, where: str, spec: str) -> None:
    """What neither the factory's metadata nor the caller gives: one line naming both ways."""
    given = {
        "schedule": meta.schedule,
        "prediction_type": meta.prediction_type,
        "data_shape": meta.data_shape or meta.shape_from_data,
    }
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise CheckpointError.naming(
            f"{verbatim(where)}: the factory {verbatim(spec)} gives no {', '.join(missing)}; "
            f"return it in its metadata dict, or pass {', '.join(_HOW[m] for m in missing)}"
        )


def _call_factory(
    factory: Factory, p: Path, spec: str
) -> tuple[nn.Module, Mapping[str, Any] | None]:
    """``factory(p, load_weights)``, its result checked: a module, or (module, metadata dict)."""
    try:
        result = factory(p, load_weights)
    except DdpmError:
        raise  # load_weights' refusal (a pickle payload, a missing file) stays as it is
    except Exception as exc:
        raise CheckpointError.naming(
            f"{{model}} {verbatim(spec)}: the factory failed on {verbatim(p)} "
            f"({type(exc).__name__}: {verbatim(one_line(exc))})"
        ) from None
    raw: Any = None
    if isinstance(result, tuple) and len(result) == 2:
        result, raw = result
        if raw is not None and not isinstance(raw, Mapping):
            raise CheckpointError.naming(
                f"{{model}} {verbatim(spec)}: the factory's metadata is a "
                f"{type(raw).__name__}, not a dict"
            )
    if not isinstance(result, nn.Module):
        raise CheckpointError.naming(
            f"{{model}} {verbatim(spec)}: the factory returned a {type(result).__name__}, not an "
            "nn.Module (or a tuple of an nn.Module and a metadata dict)"
        )
    return result, raw
