"""The loaded model every format becomes, and the steps every loader shares: fitting a state
dict, moving a module, and the load-time output check."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ddpmcli import core
from ddpmcli.checkpoints.conditioning import Conditioning, TextConditioning
from ddpmcli.checkpoints.guard import model_call
from ddpmcli.checkpoints.latent import LatentSpace
from ddpmcli.checkpoints.unpickler import one_line
from ddpmcli.errors import CheckpointError, DdpmError, verbatim
from ddpmcli.models import placed

Denoiser = Callable[[Tensor, Tensor], Tensor]
_Mover = Callable[[torch.device, "torch.dtype | None"], Denoiser]
CHECK_BATCH = 2  # the load-time check runs this many distinct rows: a batch-1 model shows


@dataclass
class LoadedModel:
    """A checkpoint in any format, as the diagnostics use it.

    ``denoiser(x_t, t)`` takes ``x_t`` ``[B, *data_shape]`` and ``t`` int64 ``[B]`` *model*
    timesteps (for a respaced schedule, ``schedule.timesteps[i]``) and returns the raw output: the
    prediction
    (``prediction_type``), with the variance values ``v`` appended along dim 1 when
    ``learned_variance``. ``schedule`` is the training schedule, float64.
    """

    denoiser: Denoiser
    schedule: core.Schedule
    prediction_type: str
    learned_variance: bool
    data_shape: tuple[int, ...]
    data_range: tuple[float, float]
    reference_samples: Tensor | None
    info: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    _mover: _Mover | None = field(default=None, repr=False)
    conditioning: Conditioning | TextConditioning | None = None
    latent: LatentSpace | None = None
    """A latent model's VAE (:mod:`.latent`): ``data_shape`` is then the latent shape."""

    def predict(
        self, x_t: Tensor, t: Tensor, *, sample_index: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``(prediction, v)``: the model output split along dim 1; ``v`` is None unless learned.

        ``v`` is improved-diffusion's variance interpolation value (nominally in [-1, 1]) for
        ``core.Schedule.model_log_variance("learned_range", ...)``. ``sample_index`` (int64
        ``[B]``, the global sample index of each row) picks each row's label on a conditional
        model (:mod:`.conditioning`; default ``0..B-1``); an unconditional model ignores it.
        """
        # integer timesteps as the models take them; a float tensor keeps its fractions (the
        # probability-flow ODE calls the model between the schedule's entries)
        t = t.to(device=x_t.device, dtype=t.dtype if t.is_floating_point() else torch.long)
        with model_call():
            if self.conditioning is None:
                out = self.denoiser(x_t, t)
            else:
                out = self.conditioning.call(
                    self.denoiser, x_t, t, sample_index, learned_variance=self.learned_variance
                )
        if not self.learned_variance:
            return out, None
        channels = out.shape[1] // 2
        return out[:, :channels], out[:, channels:]

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> LoadedModel:
        """The same model on ``device`` in ``dtype`` (a new object; the schedule stays float64)."""
        dev = self.device if device is None else torch.device(device)
        if self._mover is None:
            raise CheckpointError("this model cannot be moved (no mover)")
        denoiser = self._mover(dev, dtype)
        latent = None if self.latent is None else self.latent.to(dev)
        return dataclasses.replace(
            self, denoiser=denoiser, device=dev, dtype=self.dtype if dtype is None else dtype,
            latent=latent,
        )  # fmt: skip


Finished = tuple[core.Schedule, str, bool, tuple[int, ...], tuple[float, float]]
"""A checkpoint's metadata once complete: schedule, prediction type, learned variance, data
shape, data range (``checkpoints.meta._finish``)."""


def loaded_model(
    denoiser: Denoiser,
    finished: Finished,
    info: dict[str, Any],
    *,
    references: Tensor | None = None,
    mover: _Mover | None = None,
    conditioning: Conditioning | TextConditioning | None = None,
    latent: LatentSpace | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """The one place a :class:`LoadedModel` is built: every format's loader hands it its
    denoiser, finished metadata, ``info`` row and mover."""
    schedule, prediction_type, learned, shape, data_range = finished
    return LoadedModel(
        denoiser=denoiser,
        schedule=schedule,
        prediction_type=prediction_type,
        learned_variance=learned,
        data_shape=shape,
        data_range=data_range,
        reference_samples=references,
        info=info,
        _mover=mover,
        conditioning=conditioning,
        latent=latent,
        dtype=dtype,
    )


def load_state(module: nn.Module, state: Mapping[str, Any], where: str) -> None:
    """``state`` into ``module``: the same keys and shapes, dense tensors with data, or one
    CheckpointError line. A module built with its parameters on the meta device
    (:func:`build_loaded`) takes the state's tensors as its own, each cast to the module's dtype
    where it differs; every other module takes them where it can (:func:`_can_assign`), else
    copies them."""
    own = module.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        raise CheckpointError(
            f"{where}: state dict does not match the architecture: {', '.join(parts)} keys"
        )
    for key, value in state.items():
        if not isinstance(value, Tensor) or value.shape != own[key].shape:
            got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(
                f"{where}: state dict does not match the architecture: {key!r} has shape {got}, "
                f"the model wants {list(own[key].shape)}"
            )
        if value.layout != torch.strided or value.device.type == "meta":
            where_kind = "a meta-device" if value.device.type == "meta" else f"a {value.layout}"
            raise CheckpointError(
                f"{where}: state dict entry {key!r} is {where_kind} tensor; weights must be "
                "dense tensors with data"
            )
    on_meta = any(v.device.type == "meta" for v in own.values())
    assign = True if on_meta else _can_assign(own, state)
    if on_meta:
        state = dict(state)
        _to_dtypes(own, state)
    del own  # so that each replaced parameter is freed as soon as it is replaced
    module.load_state_dict(dict(state), strict=True, assign=assign)


def _to_dtypes(own: Mapping[str, Tensor], state: dict[str, Tensor]) -> None:
    """Each value of ``state`` replaced, in place, by itself in its module entry's dtype where
    they differ (what copying into the entry would do); a value that two keys share (tied
    weights) is cast once and stays shared. A source is dropped as soon as it is cast: where
    nothing else holds it, its memory is freed before the next value is cast."""
    groups: dict[tuple[int, torch.dtype], list[str]] = {}
    for key, value in state.items():  # ids taken while every value is alive: unique
        if key in own and isinstance(value, Tensor):  # (anything else: load_state's error)
            groups.setdefault((id(value), own[key].dtype), []).append(key)
    for (_, want), keys in groups.items():
        if state[keys[0]].dtype != want:
            cast = state[keys[0]].to(want)
            for key in keys:
                state[key] = cast


Cast = Callable[[str, Tensor], Tensor]
"""``cast(key, tensor)``: a weight as read, in the dtype its module entry has."""


def read_safetensors(path: str, cast: Cast | None) -> dict[str, Tensor]:
    """A safetensors file's tensors. ``cast`` None: views of the mapped file (nothing is read
    until used, nothing copied). Else each is read into memory of its own (safetensors'
    ``pread`` backend, where the installed version has it) and given to ``cast`` before the
    next is read, so that each source is freed once cast: the peak is the cast weights and one
    source."""
    import inspect

    from safetensors import safe_open
    from safetensors.torch import load_file

    if cast is None:
        return dict(load_file(path, device="cpu"))
    own = "backend" in inspect.signature(load_file).parameters
    with safe_open(
        path, framework="pt", device="cpu", **({"backend": "pread"} if own else {})
    ) as f:
        return {key: cast(key, f.get_tensor(key)) for key in f.keys()}


def _cast_to(own: Mapping[str, Tensor], key: str, value: Tensor) -> Tensor:
    """``value`` in the dtype of ``own[key]`` (as it is where ``key`` is not there)."""
    if key in own and isinstance(value, Tensor) and value.dtype != own[key].dtype:
        return value.to(own[key].dtype)
    return value


def stored_dtype(state: Mapping[str, Tensor]) -> torch.dtype | None:
    """The one floating dtype every floating value of ``state`` has, None if they differ."""
    dtypes = {v.dtype for v in state.values() if isinstance(v, Tensor) and v.is_floating_point()}
    return next(iter(dtypes)) if len(dtypes) == 1 else None


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, every parameter a module registers becomes a meta-device parameter of its shape
    and dtype: a constructor allocates no weights, and its random initialisation of them does
    nothing. Buffers are computed for real (a non-persistent buffer such as CLIP's
    ``position_ids`` is in no weights file: only the constructor gives its values)."""
    from torch.nn.modules import module as torch_module

    def to_meta(parent: nn.Module, name: str, param: Tensor | None) -> Tensor | None:
        if param is None or param.device.type == "meta":
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    # torch documents the hook's return value as the replacing parameter; its annotation
    # says None
    handle = torch_module.register_module_parameter_registration_hook(to_meta)  # type: ignore[arg-type]
    try:
        yield
    finally:
        handle.remove()


def build_loaded(
    build: Callable[[], nn.Module],
    read_state: Callable[[nn.Module, Cast | None], Mapping[str, Tensor]],
    where: str,
    *,
    bad_config: str,
    dtype: Callable[[Mapping[str, Tensor]], torch.dtype | None] = stored_dtype,
) -> nn.Module:
    """``build()`` holding the weights ``read_state(module, cast)`` gives, one copy of them in
    memory (``cast`` None: as stored, views of a mapped file where they are safetensors; else
    each weight passed through ``cast`` as it is read: :func:`read_safetensors`).

    The module is built with its parameters on the meta device (:func:`parameters_on_meta`):
    no random initial weights are allocated or computed. It is cast to ``dtype(state)`` (None:
    as built) and takes the state's tensors as its own (:func:`load_state`: missing,
    unexpected or misshapen keys are one error line, as for every format). A constructor that
    cannot run so (one that computes with its parameters) is run for real instead; a tensor
    left on the meta device after loading (a buffer the constructor derived from a parameter
    and no file stores) is recomputed by a real build given the loaded weights. Never is a
    meta tensor kept. A constructor's error is ``CheckpointError("{bad_config} (why)")``."""
    try:
        with parameters_on_meta():
            module = build()
    except Exception:  # noqa: BLE001 - needs real parameters: built for real below
        return _load_real(build, read_state, where, bad_config, dtype)
    state = dict(read_state(module, None))
    want = dtype(state)
    if want is not None:
        module.to(dtype=want)
    own = module.state_dict(keep_vars=True)
    if any(isinstance(v, Tensor) and v.dtype != own[k].dtype for k, v in state.items() if k in own):
        # to be cast: read again, each tensor cast as it is read (views of one mapped file
        # would all stay in memory until the last is dropped)
        del state
        state = dict(read_state(module, functools.partial(_cast_to, own)))
    _to_dtypes(own, state)
    del own
    load_state(module, state, where)
    del state
    if not left_on_meta(module):
        return module
    loaded = module.state_dict()  # the weights just loaded, taken by a real build
    del module
    return _load_real(build, lambda _, __: loaded, where, bad_config, dtype)


def _load_real(
    build: Callable[[], nn.Module],
    read_state: Callable[[nn.Module, Cast | None], Mapping[str, Tensor]],
    where: str,
    bad_config: str,
    dtype: Callable[[Mapping[str, Tensor]], torch.dtype | None],
) -> nn.Module:
    """``build()`` for real (random initial weights), then the state loaded into it."""
    try:
        module = build()
    except DdpmError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{bad_config} ({one_line(exc)})") from None
    state = read_state(module, None)
    want = dtype(state)
    if want is not None:
        module.to(dtype=want)
    load_state(module, state, where)
    left = left_on_meta(module)
    if left:
        raise CheckpointError(
            f"{where}: {left[0]!r} is on the meta device after loading (no data): the "
            "architecture does not compute it and the weights do not hold it"
        )
    return module


def left_on_meta(module: nn.Module) -> list[str]:
    """The names of ``module``'s parameters, buffers and tensor attributes (a value a
    constructor kept outside both) that have no data (meta device)."""
    attributes = (
        (f"{prefix}.{key}".lstrip("."), value)
        for prefix, sub in module.named_modules(remove_duplicate=False)
        for key, value in vars(sub).items()
        if isinstance(value, Tensor)
    )
    named = itertools.chain(
        module.named_parameters(remove_duplicate=False),
        module.named_buffers(remove_duplicate=False),
        attributes,
    )
    return [name for name, value in named if value.device.type == "meta"]


def _can_assign(own: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> bool:
    """Whether the module may take the state's tensors as its own (``assign=True``) instead of
    copying them: the same dtypes, device and layout, and no two entries sharing memory (which
    would tie parameters the architecture keeps apart). Taking them keeps one copy of the
    weights in memory instead of two at the peak of a load (the state dict and the module's
    freshly initialised parameters), as diffusers' own loader does."""
    starts = set()
    for key, value in state.items():
        mine = own[key]
        if (value.dtype, value.device, value.stride()) != (mine.dtype, mine.device, mine.stride()):
            return False
        if value.numel() and value.data_ptr() in starts:
            return False
        starts.add(value.data_ptr())
    return True


def module_mover(module: nn.Module) -> _Mover:
    def move(device: torch.device, dtype: torch.dtype | None) -> Denoiser:
        moved: Denoiser = placed(module, device, dtype)
        return moved

    return move


def _condition_words(conditioning: object) -> tuple[str, str]:
    """What a failed check call carried besides x_t and t, and the other way to fix it."""
    if isinstance(conditioning, Conditioning):
        return " with class labels", ", or a module called module(x_t, t, labels)"
    if isinstance(conditioning, TextConditioning):
        return " with the prompt's states", ", or a module called module(x_t, t, states)"
    return "", ""


def check_output_shape(loaded: LoadedModel, where: str) -> None:
    """One forward pass on a batch of distinct rows (different x and t): the output must be
    ``[B, C, ...]`` (or ``[B, 2C, ...]`` with a learned variance), so a model that ignores the
    batch, or fails on the data shape, is one CheckpointError line."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((CHECK_BATCH, *loaded.data_shape), generator=gen)
    x = x.to(device=loaded.device, dtype=loaded.dtype)
    last = max(loaded.schedule.num_train_timesteps - 1, 0)
    t = torch.linspace(0, last, CHECK_BATCH).round().to(device=loaded.device, dtype=torch.long)
    try:
        with torch.inference_mode(), model_call():
            if loaded.conditioning is None:
                out = loaded.denoiser(x, t)
            else:  # the labels of samples 0..B-1, guided if asked: the run's own call
                out = loaded.conditioning.call(loaded.denoiser, x, t, None, learned_variance=False)
    except Exception as exc:  # the model's own error: shape mismatch inside it, most likely
        cond = _condition_words(loaded.conditioning)
        raise CheckpointError.naming(
            f"{verbatim(where)}: the model fails on inputs of data shape "
            f"{list(loaded.data_shape)}{cond[0]} ({verbatim(one_line(exc))}); pass the right "
            f"{{data_shape}}{cond[1]}"
        ) from None
    want = list(x.shape)
    if (
        loaded.info.get("learned_variance_inferred")
        and isinstance(out, Tensor)
        and list(out.shape) == [want[0], 2 * want[1], *want[2:]]
    ):
        # no metadata said either way: twice the channels can only be (prediction, v)
        loaded.learned_variance = True
    if loaded.learned_variance:
        want[1] *= 2
    if not isinstance(out, Tensor) or list(out.shape) != want:
        raise CheckpointError.naming(_shape_mismatch(loaded, out, x, want, where))


def _shape_mismatch(loaded: LoadedModel, out: Any, x: Tensor, want: list[int], where: str) -> str:
    """The message (a template naming parameters) for a model output of the wrong shape."""
    got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
    hint = ""
    if isinstance(out, Tensor) and out.ndim >= 1 and out.shape[0] != x.shape[0]:
        hint = (
            f" (it returned {out.shape[0]} rows for a batch of {x.shape[0]}: "
            "the model ignores the batch)"
        )
    elif isinstance(out, Tensor) and out.ndim == len(want) and out.shape[2:] == x.shape[2:]:
        if out.shape[1] == 2 * x.shape[1] and not loaded.learned_variance:
            hint = " (twice the channels: pass {learned_variance})"
    return (
        f"{verbatim(where)}: model output shape {verbatim(got)} does not match data shape "
        f"{list(loaded.data_shape)} (expected {want}){hint}"
    )
