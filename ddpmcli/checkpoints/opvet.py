"""What a ``torch.export`` graph may run: pure tensor operators, vetted before the graph runs.

An exported graph is data (JSON), but its nodes name operators, and some ATen operators touch the
world: ``aten.from_file(path, shared=True)`` maps any file the user can write into a tensor that
the next in-place node overwrites; ``aten.save`` writes one; ``aten.set_`` rebinds a tensor to a
storage; ``aten.manual_seed`` resets the global generator. So every node of every graph in a
``.pt2`` is checked twice: its target *name* in the archive's JSON before torch deserializes it
(:func:`vet_graph_json`), and the deserialized target itself before the graph is turned into a
module (:func:`vet_graph_module`). Allowed:

- an ``aten`` operator overload whose schema takes only tensors, numbers, dtypes, devices, layouts,
  memory formats and lists of these, with strings only as the named options of pure operators
  (``approximate``, ``rounding_mode``, ``mode``, ``equation`` ...), and which is not one of the
  operators that reach files, storages, printing or global state (:data:`REFUSED_ATEN`);
- the symbolic-shape arithmetic torch serializes (``_operator.add``, ``torch.sym_max`` ...).

Everything else is refused with one line naming the operator: other namespaces (custom operators,
``prims``, extensions), higher-order operators (``cond``, ``while_loop``, ``wrap_with_*``: they
carry their own graphs and switch global state), and any Python callable.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterator
from typing import Any

import torch

from ddpmcli.errors import CheckpointError

REFUSED_ATEN: frozenset[str] = frozenset(
    {
        "from_file",  # maps a file into a tensor (shared=True writes back)
        "save",  # writes a file
        "set",  # rebinds a tensor to another storage
        "set_",
        "set_data",
        "_print",  # writes to stdout
        "warn",
        "manual_seed",  # global generator state
        "seed",
        "initial_seed",
        "Generator",
        "set_grad_enabled",  # global autograd state
        "_cufft_set_plan_cache_max_size",
        "_cufft_clear_plan_cache",
        "record_stream",
        "_set_item",
        "_linalg_check_errors",
    }
)
"""ATen operators never run from a checkpoint, whatever their arguments."""

OPTION_STRINGS: frozenset[str] = frozenset(
    {
        "approximate",
        "assert_msg",
        "activation",
        "algorithm",
        "driver",
        "equation",
        "indexing",
        "interpolation",
        "mode",
        "norm",
        "ord",
        "p",
        "pad_mode",
        "padding",
        "padding_side",
        "reduce",
        "rounding_mode",
        "side",
        "UPLO",
    }
)
"""The string arguments a pure operator may take: names of options, never a path or a message."""

_PLAIN_TYPES: frozenset[str] = frozenset(
    "Tensor int float bool complex Scalar SymInt SymFloat SymBool ScalarType Layout Device "
    "MemoryFormat str Generator number".split()
)
_WRAPPERS = re.compile(r"Optional\[|List\[|\]|\?")

_SYM_OPS: dict[str, Any] = {
    **{
        f"_operator.{name}": getattr(operator, name)
        for name in (
            "eq ne le ge lt gt neg pos mul add sub floordiv mod pow truediv and_ or_ lshift "
            "rshift getitem"
        ).split()
    },
    "math.trunc": math.trunc,
    **{
        f"torch.{name}": getattr(torch, name)
        for name in ("sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt")
    },
}
"""Symbolic-shape arithmetic as torch serializes it (serialized name -> the callable)."""

_ATEN_NAME = re.compile(r"^torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")


def refused_reason(op: Any) -> str | None:
    """Why ``op`` (a graph node's target) may not run from a checkpoint, or None if it may."""
    if any(op is known for known in _SYM_OPS.values()):
        return None
    if isinstance(op, torch._ops.HigherOrderOperator):
        return "a higher-order operator (it runs its own graphs)"
    if not isinstance(op, torch._ops.OpOverload):
        return "not a tensor operator"
    namespace = op.namespace
    if namespace != "aten":
        return f"an operator of the {namespace!r} namespace (only aten operators run)"
    base = op._schema.name.split("::", 1)[-1]
    if base in REFUSED_ATEN:
        return "it reaches files, storages or global state"
    for arg in op._schema.arguments:
        kind = str(arg.type)
        if _WRAPPERS.sub("", kind) not in _PLAIN_TYPES:
            return f"it takes a {kind} argument"
        if "str" in kind and arg.name not in OPTION_STRINGS:
            return f"it takes a string argument {arg.name!r}"
    return None


def _refuse(where: str, name: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: refused to run the exported graph: operator {name} is not a pure tensor "
        f"operator ({reason}); a .pt2 may run only aten tensor operators"
    )


def resolve_target(name: str) -> Any:
    """The operator a serialized target name denotes, looked up without importing or calling
    anything; None where the name is not one a vetted graph may hold."""
    if name in _SYM_OPS:
        return _SYM_OPS[name]
    match = _ATEN_NAME.match(name)
    if match is None or match.group(1).startswith("__") or match.group(2).startswith("__"):
        return None
    packet = getattr(torch.ops.aten, match.group(1), None)
    overload = getattr(packet, match.group(2), None) if packet is not None else None
    return overload if isinstance(overload, torch._ops.OpOverload) else None


def _json_nodes(graph: Any) -> Iterator[dict[str, Any]]:
    """Every node dict of a serialized graph, nested graphs (higher-order operands) included."""
    stack = [graph]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "target" in item and "inputs" in item:
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def vet_graph_json(model: Any, where: str) -> None:
    """Check every node target named in a parsed ``models/*.json`` before torch reads it."""
    module = model.get("graph_module") if isinstance(model, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"{where}: corrupt torch.export archive (no graph_module)")
    for node in _json_nodes(module):
        name = node.get("target")
        if not isinstance(name, str):
            raise CheckpointError(f"{where}: corrupt torch.export archive (a target is not text)")
        op = resolve_target(name)
        reason = "unknown or not an aten operator" if op is None else refused_reason(op)
        if reason is not None:
            raise _refuse(where, _printable(name), reason)


def vet_graph_module(graph_module: Any, where: str) -> None:
    """Check every node of a deserialized graph and of the graphs below it."""
    for sub in graph_module.modules():
        graph = getattr(sub, "graph", None)
        if graph is None:
            continue
        for node in graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op != "call_function":
                raise _refuse(where, f"{node.op} {node.target}", "not a tensor operator")
            reason = refused_reason(node.target)
            if reason is not None:
                raise _refuse(where, _printable(str(node.target)), reason)


def _printable(name: str) -> str:
    return name.encode("unicode_escape").decode("ascii")[:160]
