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
from collections.abc import Callable, Collection, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_type_hints

from ddpmcli.cli.common import (
    ClassLabelOpt,
    ColumnsOpt,
    EveryOpt,
    FormatOpt,
    GuidanceOpt,
    LearnedOpt,
    MaxSequenceLengthOpt,
    MetaKindOpt,
    MetaTimestepsOpt,
    ModelOpt,
    NoHeaderOpt,
    PlotOpt,
    PredOpt,
    PromptOpt,
    QuietOpt,
    ShapeOpt,
    TimeIdsOpt,
    TrustOpt,
    TSelectOpt,
    check_format_flags,
    conditioning_options,
    loader_options,
    reject_conflicts,
    resolve_plot_path,
)
from ddpmcli.cli.data_options import DataRangeOpt, data_load_options
from ddpmcli.output import Row, emit

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
    """The flags every command that runs a checkpoint takes, as given: the metadata a program
    without ``ddpm.json`` cannot tell itself, ``--data-range``, ``--trust-program``, ``--model``
    and the conditioning (``--class-label``, ``--guidance-scale``, ``--prompt``). :meth:`load`
    is the one place such a command loads its checkpoint."""

    kind: MetaKindOpt = None
    timesteps: MetaTimestepsOpt = None
    prediction_type: PredOpt = None
    data_shape: ShapeOpt = None
    data_range: DataRangeOpt = None
    learned_variance: LearnedOpt = None
    trust_program: TrustOpt = False
    model_factory: ModelOpt = None
    class_label: ClassLabelOpt = None
    guidance_scale: GuidanceOpt = None
    prompt: PromptOpt = None
    time_ids: TimeIdsOpt = None
    max_sequence_length: MaxSequenceLengthOpt = None

    def load(
        self,
        checkpoint: Path,
        device: str | torch.device = "cpu",
        dtype: str | None = None,
        *,
        data: str | None = None,
        seed: int = 0,
        inspect_only: bool = False,
    ) -> LoadedModel:
        """``checkpoint`` with these flags (``data``: the evaluation data, whose sample shape a
        program without metadata takes; ``seed``: for random class labels) on ``device`` in
        ``dtype`` (None: the file's own); ``inspect_only``: read, never run (``ddpm info``)."""
        from ddpmcli import api
        from ddpmcli.errors import UsageError
        from ddpmcli.run import resolve_device, resolve_dtype

        if self.timesteps is not None and self.kind is None:  # it was ignored without a word
            raise UsageError(
                f"-T {self.timesteps} sets the length of a --kind schedule; without --kind the "
                "checkpoint's own schedule is used"
            )
        model = api.load(
            checkpoint,
            **loader_options(
                self.kind, self.timesteps, self.prediction_type, self.data_shape,
                self.learned_variance, trust_program=self.trust_program,
            ),
            **data_load_options(checkpoint, data, self.data_shape, self.data_range),
            **conditioning_options(
                self.class_label, self.guidance_scale, seed, self.prompt, self.time_ids,
                self.max_sequence_length,
            ),
            model=self.model_factory, device=resolve_device(device),
            dtype=None if dtype is None else resolve_dtype(dtype),
            **({"inspect_only": True} if inspect_only else {}),
        )  # fmt: skip
        if "prompt_truncated" in model.info:
            from ddpmcli.output import warn

            warn(str(model.info["prompt_truncated"]))
        return model


NO_MODEL_FLAGS = ModelFlags()
"""The default of a command's ``model_flags`` parameter (never used: the splice replaces it)."""


@dataclass(frozen=True)
class TableFlags:
    """The row and output flags of the commands that print rows (schedule, compare, posterior;
    sample, reconstruct and nll without some), as given: which rows (``--t``/``--every``), which
    columns, the format, the figure, quiet."""

    t: TSelectOpt = None
    every: EveryOpt = None
    columns: ColumnsOpt = None
    fmt: FormatOpt = "auto"
    no_header: NoHeaderOpt = False
    plot: PlotOpt = None
    quiet: QuietOpt = False

    def check(self) -> None:
        """Refuse conflicting flags before any work (``--no-header`` with a table, ``--t`` with
        ``--every``)."""
        check_format_flags(self.fmt, self.no_header)
        reject_conflicts(("--t", self.t is not None), ("--every", self.every is not None))

    def emit(
        self,
        rows: Sequence[Row],
        columns: Sequence[str],
        title: str,
        *,
        columns_option: bool = True,
    ) -> None:
        """Write ``rows`` to stdout in ``--format`` (see :func:`ddpmcli.output.emit`)."""
        emit(
            rows, columns, self.fmt, no_header=self.no_header, title=title,
            columns_option=columns_option,
        )  # fmt: skip

    def plot_path(self, command: str) -> Path | None:
        """The figure path of ``--plot`` (a bare ``--plot``: the command's default name),
        checked writable, or None."""
        return resolve_plot_path(self.plot, command)


NO_TABLE_FLAGS = TableFlags()
"""The default of a command's ``table`` parameter (never used: the splice replaces it)."""


def table_options(*, leave_out: Collection[str] = ()) -> Callable[[Command], Command]:
    """Splice the :class:`TableFlags` options into a command at its ``table`` parameter (less
    ``leave_out``: sample, reconstruct and nll place ``--t``/``--every`` themselves, or have
    none, and nll draws no figure)."""
    return option_group(TableFlags, "table", leave_out=leave_out)


def model_options(
    *, leave_out: Collection[str] = ("learned_variance",)
) -> Callable[[Command], Command]:
    """Splice the :class:`ModelFlags` options into a command at its ``model_flags`` parameter
    (``--learned-variance`` only where asked: ``ddpm info``; the others infer it)."""
    return option_group(ModelFlags, "model_flags", leave_out=leave_out)
