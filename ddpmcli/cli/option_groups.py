"""Option groups: a frozen dataclass of typed options spliced into each command that takes them.

``@option_group(Group, "name")`` replaces a command's ``name: Group`` parameter with the group's
fields as keyword-only options at that place in its signature (typer sees plain options, so help,
completion and parsing are unchanged) and hands the command the parsed values as one ``Group``.
Fields named in ``leave_out`` are not offered and keep their defaults. One declaration of an
option set, used by every command that takes it: the schedule flags
(:mod:`ddpmcli.cli.schedule_options`) and the checkpoint metadata flags (:class:`ModelFlags`).
Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Collection
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar, get_type_hints

from ddpmcli.cli.common import (
    MetaKindOpt,
    MetaTimestepsOpt,
    ModelOpt,
    PredOpt,
    ShapeOpt,
    TrustOpt,
    loader_options,
)

if TYPE_CHECKING:
    import torch

    from ddpmcli.checkpoints import LoadedModel

Command = TypeVar("Command", bound=Callable[..., Any])


def option_group(
    group: type,
    name: str,
    *,
    leave_out: Collection[str] = (),
    context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> Callable[[Command], Command]:
    """Splice ``group``'s fields into a command at its ``name`` parameter (see the module doc);
    ``context`` (if given) wraps each call, e.g. to show library parameter names as flags."""
    hints = get_type_hints(group, include_extras=True)
    offered = [
        inspect.Parameter(
            item.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=item.default if item.default is not MISSING else inspect.Parameter.empty,
            annotation=hints[item.name],
        )
        for item in fields(group)
        if item.name not in leave_out
    ]
    names = [p.name for p in offered]

    def splice(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        parameters: list[inspect.Parameter] = []
        for p in signature.parameters.values():
            if p.name == name:
                parameters += offered
            else:
                parameters.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = group(**{key: kwargs.pop(key) for key in names})
            with context() if context is not None else contextlib.nullcontext():
                return command(**{name: values}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper  # type: ignore[return-value]

    return splice


@dataclass(frozen=True)
class ModelFlags:
    """The checkpoint metadata flags (what a program without ``ddpm.json`` cannot tell itself),
    ``--trust-program`` and ``--model``, as given; :meth:`load` loads a checkpoint with them."""

    kind: MetaKindOpt = None
    timesteps: MetaTimestepsOpt = None
    prediction_type: PredOpt = None
    data_shape: ShapeOpt = None
    trust_program: TrustOpt = False
    model_factory: ModelOpt = None

    def loader_options(self, learned_variance: bool | None = None) -> dict[str, Any]:
        """These flags as keyword arguments of ``checkpoints.load_checkpoint``."""
        options = loader_options(
            self.kind,
            self.timesteps,
            self.prediction_type,
            self.data_shape,
            learned_variance,
            trust_program=self.trust_program,
        )
        return {**options, "model": self.model_factory}

    def load(
        self, checkpoint: Any, device: str | torch.device, dtype: str = "float32"
    ) -> LoadedModel:
        """The one place a command loads a checkpoint: these flags, on ``device`` in ``dtype``."""
        from ddpmcli import api
        from ddpmcli.run import resolve_device, resolve_dtype

        return api.load(
            checkpoint,
            **self.loader_options(),
            device=resolve_device(device),
            dtype=resolve_dtype(dtype),
        )


def model_options(*, leave_out: Collection[str] = ()) -> Callable[[Command], Command]:
    """Splice the :class:`ModelFlags` options into a command at its ``model_flags`` parameter."""
    return option_group(ModelFlags, "model_flags", leave_out=leave_out)
