"""The schedule specs of ``ddpm compare``: one schedule named in one string,
``KIND[+zsnr][:key=value,...]``, a preset ``NAME[@RES][:key=value,...]`` (``sd15``, ``sd3``,
``flux@1024``: :mod:`ddpmcli.presets`) or a diffusers config file, built through
:func:`ddpmcli.configs.build_schedule`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddpmcli import presets
from ddpmcli.configs import BuiltSchedule, ScheduleRequest, build_schedule
from ddpmcli.errors import DdpmError, ParameterError, ScheduleParameterError, UsageError

_SPEC_INT_KEYS = {"t": "timesteps", "timesteps": "timesteps", "steps_offset": "steps_offset"}
_SPEC_FLAG_KEYS = {"zsnr", "zero_terminal_snr"}
_SPEC_NAMES = {
    "timesteps": "T",
    "betas_file": "betas",
    "alpha_bars_file": "alpha_bars",
    "zero_terminal_snr": "+zsnr",
    "from_file": "a config file",
}
"""How a spec spells the schedule parameters whose key is not the parameter's name."""


@dataclass(frozen=True)
class CompareSpec:
    """One schedule of ``ddpm compare``: the label printed in its ``schedule`` column."""

    label: str
    built: BuiltSchedule


def _looks_like_file(text: str) -> bool:
    p = Path(text)
    return p.suffix.lower() == ".json" or p.is_dir() or ("/" in text and p.exists())


def parse_compare_spec(text: str, steps: str | None = None) -> CompareSpec:
    """Parse one compare spec into a schedule; ``steps`` (compare's ``--steps``) applies where the
    spec names none.

    Grammar: ``KIND[+zsnr][:key=value,...]``, ``PRESET[@RES][:key=value,...]`` or a path to a
    diffusers config (file or folder); a file of a preset's name wins over the preset.
    Keys: ``T`` (or ``timesteps``), ``zsnr``/``zero_terminal_snr`` (0/1), ``logsnr_shift``,
    ``steps``, ``spacing``, ``steps_offset``, ``betas``/``alpha_bars`` (a file; kind ``custom``),
    and the kind's constants (``beta_end=0.012``, ``s=0.008``, ...). Examples: ``cosine``,
    ``linear:beta_end=0.012,T=500``, ``scaled_linear+zsnr``, ``cosine:steps=50,spacing=trailing``.
    """
    spec = text.strip()
    if not spec:
        raise UsageError("empty schedule spec; e.g. cosine, linear:beta_end=0.012,T=500")
    if _looks_like_file(spec):
        try:
            built = build_schedule(ScheduleRequest(from_file=spec, steps=steps))
        except DdpmError as exc:
            raise type(exc)(f"spec {spec!r}: {exc}") from None
        return CompareSpec(label=spec, built=built)
    head, _, tail = spec.partition(":")
    kind, *modifiers = [part.strip() for part in head.split("+")]
    is_preset = presets.parse(kind) is not None  # a usage error for a bad @RES
    request = ScheduleRequest(from_file=kind) if is_preset else ScheduleRequest(kind=kind)
    for modifier in modifiers:
        if modifier.lower() not in _SPEC_FLAG_KEYS:
            raise UsageError(f"spec {spec!r}: unknown modifier +{modifier}; allowed: +zsnr")
        request.zero_terminal_snr = True
    for item in filter(None, (part.strip() for part in tail.split(","))) if tail else ():
        key, sep, value = item.partition("=")
        key = key.strip()
        value = value.strip()
        if not sep or not key or not value:
            raise UsageError(f"spec {spec!r}: {item!r} is not key=value")
        _apply_spec_item(request, key, value, spec)
    if request.steps is None:
        request.steps = steps
    if request.kind is not None and request.kind.lower() != "custom":
        request.kind = core_kind(request.kind, spec)
    try:
        built = build_schedule(request)
    except ParameterError as exc:
        message = exc.render(lambda name: _SPEC_NAMES.get(name, name))
        raise UsageError(f"spec {spec!r}: {message}") from None
    except DdpmError as exc:
        raise type(exc)(f"spec {spec!r}: {exc}") from None
    return CompareSpec(label=spec, built=built)


def core_kind(name: str, spec: str) -> str:
    """The core's registry name for ``name`` (aliases resolved), errors naming the spec."""
    from ddpmcli import core

    try:
        return core.canonical_kind(name)
    except ScheduleParameterError as exc:
        raise ScheduleParameterError(
            f"spec {spec!r}: {exc}; or custom, a config file, or a preset "
            f"({', '.join(presets.names())})"
        ) from None


def _apply_spec_item(request: ScheduleRequest, key: str, value: str, spec: str) -> None:
    lowered = key.lower()
    if lowered in _SPEC_INT_KEYS:
        try:
            number = int(value)
        except ValueError:
            raise UsageError(f"spec {spec!r}: {key}={value!r} is not an integer") from None
        setattr(request, _SPEC_INT_KEYS[lowered], number)
    elif lowered in _SPEC_FLAG_KEYS:
        if value.lower() not in ("0", "1", "true", "false", "yes", "no"):
            raise UsageError(f"spec {spec!r}: {key}={value!r}; use 1 or 0")
        request.zero_terminal_snr = value.lower() in ("1", "true", "yes")
    elif lowered == "steps":
        request.steps = value
    elif lowered == "spacing":
        request.spacing = value
    elif lowered == "betas":
        request.betas_file = value
    elif lowered == "alpha_bars":
        request.alpha_bars_file = value
    else:
        try:
            real = float(value)
        except ValueError:
            raise UsageError(f"spec {spec!r}: {key}={value!r} is not a number") from None
        if lowered == "logsnr_shift":
            request.logsnr_shift = real
        else:
            request.params[key] = real
