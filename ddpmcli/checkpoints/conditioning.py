"""Class labels and classifier-free guidance: the conditioning that lives with a loaded model.

A class-conditional model's denoiser takes ``(x_t, t, labels)``. Which label each row gets is
decided by a :class:`LabelChoice`, from the row's *global sample index* (the position of the
sample in the whole run), so batching, chunking and torchrun ranks never change it:

- ``K``: every sample gets label K;
- ``A-B``: sample i gets ``A + i mod (B - A + 1)`` (``all`` is ``0-(N-1)``);
- ``random``: sample i gets a label drawn from a counter-based hash of ``(seed, i)``;
- ``null``: the model's null (unconditional) label.

Classifier-free guidance (Ho & Salimans 2022, eq. 6) with scale ``s``:
``out = out(null) + s * (out(label) - out(null))``; ``s = 1`` is the conditional output with one
forward pass. Otherwise the conditional and null rows are concatenated along the batch and run in
ONE model call. With a learned variance only the prediction channels are guided and the variance
channels are the conditional rows' (as DiT's ``forward_with_cfg``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from ddpmcli.errors import CheckpointError, ParameterError, verbatim
from ddpmcli.hashing import MASK64, splitmix64

if TYPE_CHECKING:
    from ddpmcli.checkpoints.loaded import LoadedModel

ConditionalDenoiser = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``denoiser(x_t, t, labels)`` with ``labels`` int64 ``[B]``."""

LABEL_FORMS = "K, A-B, all, random or null"
MAX_CLASSES = 1 << 20
"""The most classes a model may declare (diffusers' class-conditional configs are checked
against the same bound): a count read from a file or a caller is checked before anything uses it."""


def whole_number(value: object) -> int | None:
    """``value`` as an int when it is a whole number type (int, numpy's integers; not bool),
    else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def class_counts(num_classes: object, null_label: object) -> tuple[int, int | None] | None:
    """``(num_classes, null_label)`` a caller or a factory's metadata declares, checked (None when
    it declares neither): ``num_classes`` a whole number in 1..MAX_CLASSES, ``null_label`` (or
    None) one outside the classes, num_classes..MAX_CLASSES; numpy integers are taken, bools,
    floats and strings are not.

    Raises:
        ValueError: ``args[0]`` names what is wrong: ``null_label without num_classes``,
            ``num_classes`` or ``null_label`` (then ``args[1]`` is the class count); the caller
            words the error for its own options.
    """
    if num_classes is None:
        if null_label is not None:
            raise ValueError("null_label without num_classes")
        return None
    num = whole_number(num_classes)
    if num is None or not 1 <= num <= MAX_CLASSES:
        raise ValueError("num_classes")
    if null_label is None:
        return num, None
    null = whole_number(null_label)
    if null is None or not num <= null <= MAX_CLASSES:
        raise ValueError("null_label", num)
    return num, null


_FLOAT32_MAX = 3.4028234663852886e38


def guidance_value(scale: object) -> float:
    """A guidance scale checked: a finite real number (not a bool, not a string).

    Raises:
        ParameterError: naming ``guidance_scale``.
    """
    one_value = isinstance(scale, Tensor) and scale.numel() == 1
    if isinstance(scale, bool) or not (isinstance(scale, Real) or one_value):
        raise ParameterError(f"{{guidance_scale}} must be a number, got {verbatim(repr(scale))}")
    value = float(scale)  # type: ignore[arg-type]
    if not math.isfinite(value):
        raise ParameterError(f"{{guidance_scale}} must be finite, got {value}")
    if abs(value) > _FLOAT32_MAX:  # Flux's embedded guidance failed in the model's float32
        raise ParameterError(f"{{guidance_scale}} {value:g} is past float32 (|S| <= 3.4e+38)")
    return value


def label_seed_value(seed: object) -> int:
    """The seed of ``random`` labels checked: a whole number (ParameterError naming
    ``label_seed``)."""
    value = whole_number(seed)
    if value is None:
        raise ParameterError(f"{{label_seed}} must be an integer, got {verbatim(repr(seed))}")
    return value


@dataclass(frozen=True)
class LabelChoice:
    """Which label sample i gets: ``mode`` is ``fixed``, ``cycle``, ``random`` or ``null``."""

    mode: str
    first: int = 0
    last: int = 0

    @classmethod
    def parse(cls, text: str | int) -> LabelChoice:
        """``K``, ``A-B``, ``all``, ``random`` or ``null`` (ParameterError naming class_label)."""
        spec = str(text).strip().lower()
        if spec in ("random", "null"):
            return cls(spec)
        if spec == "all":
            return cls("cycle", 0, -1)  # -1: the model's last label, filled in by resolve
        lo, sep, hi = spec.partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            raise ParameterError(
                f"{{class_label}} {verbatim(repr(str(text)))}: want {LABEL_FORMS}"
            ) from None
        if first < 0 or last < first:
            raise ParameterError(
                f"{{class_label}} {verbatim(repr(str(text)))}: labels are non-negative, "
                "and A <= B in A-B"
            )
        return cls("fixed" if first == last else "cycle", first, last)

    def resolve(self, num_classes: int) -> LabelChoice:
        """This choice checked against a model with ``num_classes`` labels."""
        last = num_classes - 1 if self.last == -1 else self.last
        if self.mode in ("fixed", "cycle") and last >= num_classes:
            raise ParameterError(
                f"{{class_label}} {last} is out of range: the model has {num_classes} classes "
                f"(0..{num_classes - 1})"
            )
        return LabelChoice(self.mode, self.first, last)

    def describe(self) -> str:
        if self.mode == "fixed":
            return str(self.first)
        if self.mode == "cycle":
            return f"{self.first}-{self.last}"
        return self.mode


@dataclass
class Conditioning:
    """The labels and guidance of a class-conditional model (see the module docstring).

    ``num_classes`` labels 0..N-1; ``null_label`` the model's unconditional label (None: the
    model has none, and guidance is refused); ``seed`` keys ``random`` labels.
    """

    num_classes: int
    null_label: int | None
    choice: LabelChoice
    guidance_scale: float = 1.0
    seed: int = 0
    _random: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.choice.mode == "null" and self.null_label is None:
            raise CheckpointError.naming(
                "{class_label} null: this model has no null (unconditional) label"
            )
        if not math.isfinite(self.guidance_scale):
            raise ParameterError(f"{{guidance_scale}} must be finite, got {self.guidance_scale}")
        if self.guidance_scale != 1.0 and self.null_label is None:
            raise CheckpointError.naming(
                "{guidance_scale} needs a null (unconditional) label, and this model has none "
                "(its class embedding has only its classes)"
            )

    def labels(self, sample_index: Tensor) -> Tensor:
        """int64 labels ``[B]`` for the global sample indices ``[B]`` (on their device)."""
        idx = sample_index.to(torch.long)
        choice = self.choice
        if choice.mode == "fixed":
            return torch.full_like(idx, choice.first)
        if choice.mode == "null":
            return torch.full_like(idx, cast(int, self.null_label))
        if choice.mode == "cycle":
            return choice.first + idx % (choice.last - choice.first + 1)
        top = int(idx.max()) + 1 if idx.numel() else 0
        while len(self._random) < top:  # each index hashed once per model, then looked up
            i = len(self._random)
            self._random.append(splitmix64((self.seed & MASK64) ^ splitmix64(i)) % self.num_classes)
        table = torch.tensor(self._random[:top], dtype=torch.long)
        return table.to(idx.device)[idx]

    def call(
        self, denoiser: Callable[..., Tensor], x_t: Tensor, t: Tensor, sample_index: Tensor | None,
        *, learned_variance: bool,
    ) -> Tensor:  # fmt: skip
        """The (guided) raw output for rows ``x_t`` of samples ``sample_index`` (default 0..B-1)."""
        net = cast(ConditionalDenoiser, denoiser)
        b = x_t.shape[0]
        if sample_index is None:
            sample_index = torch.arange(b, device=x_t.device)
        labels = self.labels(sample_index.to(x_t.device))
        s = self.guidance_scale
        if s == 1.0:
            return net(x_t, t, labels)
        null = torch.full_like(labels, cast(int, self.null_label))
        both = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
        return guide(both, s, learned_variance=learned_variance)

    def describe(self) -> dict[str, object]:
        """The ``info`` fields of the conditioning."""
        return {
            "num_classes": self.num_classes,
            "null_label": self.null_label,
            "class_label": self.choice.describe(),
            "guidance_scale": self.guidance_scale,
        }


def guide(both: Tensor, scale: float, *, learned_variance: bool) -> Tensor:
    """Classifier-free guidance of one call's output ``[2B, ...]`` (the conditional rows, then
    the null rows): ``null + scale (cond - null)``, the variance channels the conditional's."""
    b = both.shape[0] // 2
    cond, uncond = both[:b], both[b:]
    if not learned_variance:
        return uncond + scale * (cond - uncond)
    c = cond.shape[1] // 2
    guided = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([guided, cond[:, c:]], dim=1)


Prompt = Tensor | dict[str, Tensor]
"""What a text encoder gives for one prompt: its hidden states ``[1, L, D]``, or named tensors
(each with a batch dimension of 1: states, pooled embedding, an SDXL's time ids, ...)."""

GUIDANCE_MODES = ("classifier-free", "embedded", "none")
"""How a text-conditional model takes ``guidance_scale``: classifier-free guidance (a conditional
and a null row in one call), an embedded guidance input (Flux-dev: one call, the scale given to
the network as ``guidance``), or none (the scale must stay 1)."""


def _rows(cond: Prompt, b: int) -> Prompt:
    """``cond`` with ``b`` rows (a view: the one prompt's tensors, expanded)."""
    if isinstance(cond, Tensor):
        return cond.expand(b, *cond.shape[1:])
    return {k: v.expand(b, *v.shape[1:]) for k, v in cond.items()}


def _stack(first: Prompt, second: Prompt) -> Prompt:
    """The rows of ``first``, then those of ``second``."""
    if isinstance(first, Tensor):
        return torch.cat([first, cast(Tensor, second)])
    other = cast(dict[str, Tensor], second)  # one encoder gives both: the same form
    return {k: torch.cat([first[k], other[k]]) for k in first}


def _placed(cond: Prompt, like: Tensor) -> Prompt:
    if isinstance(cond, Tensor):
        return cond.to(like.device, like.dtype)
    return {k: v.to(like.device, like.dtype) for k, v in cond.items()}


@dataclass
class TextConditioning:
    """The prompt and guidance of a text-conditional model (Stable Diffusion-style).

    ``encode(prompt)`` is the text encoder: ``[1, L, D]`` hidden states, or a dict of named
    tensors (:data:`Prompt`); it runs once per prompt (cached), and the denoiser takes them as
    ``(x_t, t, states)`` with ``B`` rows. The empty prompt is the default and the null condition
    of guidance, as in diffusers' pipelines; ``encode_null`` replaces it where a pipeline uses
    another (SDXL's zeros). ``guidance`` is one of :data:`GUIDANCE_MODES`; ``default_guidance``
    the scale used when none is given (Flux-dev's pipeline default, 3.5).
    """

    encode: Callable[[str], Prompt]
    prompt: str = ""
    guidance_scale: float = 1.0
    count_tokens: Callable[[str], int] | None = None
    """The prompt's token count before truncation (None: unknown)."""
    max_tokens: int | None = None
    """How many tokens the text encoder reads; the rest of a longer prompt is cut off."""
    encode_null: Callable[[], Prompt] | None = None
    guidance: str = "classifier-free"
    default_guidance: float = 1.0
    set_time_ids: Callable[[object], None] | None = None
    """An SDXL-style model's setter of its added time ids (None: the model has none)."""
    set_sequence_length: Callable[[int], None] | None = None
    """An SD3/Flux model's setter of the T5 tokens it reads (None: the model reads no T5)."""
    shown: dict[str, object] = field(default_factory=dict)
    """Further ``info`` fields of the family (an SDXL's time ids, a Flux's guidance input)."""
    _cache: dict[tuple[str | None, str, str], Prompt] = field(default_factory=dict, repr=False)

    def states(self, prompt: str | None, like: Tensor) -> Prompt:
        """The encoder's output for ``prompt`` (None: the null condition) on ``like``'s device,
        in its dtype (cached)."""
        key = (prompt, str(like.device), str(like.dtype))
        if key not in self._cache:
            with torch.inference_mode():
                if prompt is None:
                    raw = self.encode_null() if self.encode_null is not None else self.encode("")
                else:
                    raw = self.encode(prompt)
                self._cache[key] = _placed(raw, like)
        return self._cache[key]

    def call(
        self, denoiser: Callable[..., Tensor], x_t: Tensor, t: Tensor, sample_index: Tensor | None,
        *, learned_variance: bool,
    ) -> Tensor:  # fmt: skip
        """The (guided) raw output; every row has the one prompt (``sample_index`` unused)."""
        b = x_t.shape[0]
        cond = _rows(self.states(self.prompt, x_t), b)
        if self.guidance == "embedded":
            scale = torch.full((b,), self.guidance_scale, device=x_t.device, dtype=x_t.dtype)
            return denoiser(x_t, t, {**cast(dict[str, Tensor], cond), "guidance": scale})
        if self.guidance_scale == 1.0:
            return denoiser(x_t, t, cond)
        null = _rows(self.states(None, x_t), b)
        both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), _stack(cond, null))
        return guide(both, self.guidance_scale, learned_variance=learned_variance)

    def describe(self) -> dict[str, object]:
        shown: dict[str, object] = {"prompt": self.prompt, "guidance_scale": self.guidance_scale}
        shown.update(self.shown)
        if self.guidance != "classifier-free":
            shown["guidance"] = {
                "embedded": "embedded (the network's guidance input, one call; not CFG)",
                "none": "none (the model takes no guidance)",
            }[self.guidance]
        if self.count_tokens is not None and self.max_tokens is not None:
            tokens = self.count_tokens(self.prompt)
            if tokens > self.max_tokens:
                shown["prompt_truncated"] = (
                    f"the prompt is {tokens} tokens; the text encoder reads the first "
                    f"{self.max_tokens}, as diffusers' pipelines do"
                )
        return shown


def make_conditioning(
    num_classes: int,
    null_label: int | None,
    class_label: str | int | None,
    guidance_scale: float | None,
    seed: int,
) -> Conditioning:
    """The conditioning of a model with ``num_classes`` labels from the loader's options.

    Without ``class_label`` the model runs on its null label (unconditional), and a model without
    one needs ``class_label``.
    """
    if class_label is None:
        if null_label is None:
            raise CheckpointError.naming(
                f"a class-conditional model with {num_classes} classes and no null label: pass "
                f"{{class_label}} ({LABEL_FORMS})"
            )
        class_label = "null"
    choice = LabelChoice.parse(class_label).resolve(num_classes)
    scale = 1.0 if guidance_scale is None else guidance_value(guidance_scale)
    return Conditioning(num_classes, null_label, choice, scale, label_seed_value(seed))


def check_unconditional(class_label: object, guidance_scale: float | None, where: str) -> None:
    """An unconditional model given conditioning options: one error line."""
    if class_label is not None:
        raise CheckpointError.naming(
            f"{verbatim(where)}: {{class_label}} given, but the model is unconditional"
        )
    if guidance_scale is not None and guidance_scale != 1.0:
        raise CheckpointError.naming(
            f"{verbatim(where)}: {{guidance_scale}} given, but the model is unconditional"
        )


def _text_options(
    text: TextConditioning | None, where: str, time_ids: object, max_sequence_length: int | None
) -> None:
    """Apply SDXL's time ids and SD3/Flux's T5 token count; either given to a model without
    them is an error."""
    if time_ids is not None:
        if text is None or text.set_time_ids is None:
            raise CheckpointError.naming(
                f"{verbatim(where)}: {{time_ids}} given, but the model is not SDXL-style"
            )
        text.set_time_ids(time_ids)
    if max_sequence_length is not None:
        if text is None or text.set_sequence_length is None:
            raise CheckpointError.naming(
                f"{verbatim(where)}: {{max_sequence_length}} given, but the model reads no T5 "
                "prompt encoding (SD3 and Flux pipelines do)"
            )
        text.set_sequence_length(max_sequence_length)
        text.shown["max_sequence_length"] = max_sequence_length


def attach(
    loaded: LoadedModel,
    class_label: str | int | None,
    guidance_scale: float | None,
    seed: int,
    where: str,
    *,
    inspect_only: bool = False,
    prompt: str | None = None,
    time_ids: object = None,
    max_sequence_length: int | None = None,
) -> LoadedModel:
    """``loaded`` with its conditioning built from the loader's options.

    ``time_ids``: an SDXL-style model's added time ids (:mod:`.sdxl`), default from its data shape.
    ``max_sequence_length``: the T5 tokens an SD3/Flux model reads (default its pipeline's).

    A text-conditional loader gives the model a :class:`TextConditioning`, which takes
    ``prompt`` (default empty). A loader marks a class-conditional model with
    ``info["num_classes"]`` and ``info["null_label"]``; an unconditional one given conditioning
    options is an error. ``info`` (inspect only) builds it only when a label is given, so it can
    show any model.
    """
    if prompt is not None and not isinstance(prompt, str):  # the tokenizer's error blamed the shape
        raise ParameterError(f"{{prompt}} must be a string, got {verbatim(repr(prompt))}")
    text = loaded.conditioning if isinstance(loaded.conditioning, TextConditioning) else None
    _text_options(text, where, time_ids, max_sequence_length)
    if text is not None:
        if class_label is not None:
            raise CheckpointError.naming(
                f"{verbatim(where)}: {{class_label}} given, but the model is text-conditional "
                "(give {prompt})"
            )
        scale = text.default_guidance if guidance_scale is None else guidance_value(guidance_scale)
        if text.guidance == "none" and scale != 1.0:
            raise CheckpointError.naming(
                f"{verbatim(where)}: {{guidance_scale}} given, but this model takes no guidance"
            )
        text.prompt, text.guidance_scale = prompt or "", scale
        loaded.info.update(text.describe())
        return loaded
    if prompt is not None:
        raise CheckpointError.naming(
            f"{verbatim(where)}: {{prompt}} given, but the model is not text-conditional"
        )
    num = loaded.info.get("num_classes")
    if num is None:
        check_unconditional(class_label, guidance_scale, where)
        return loaded
    null = loaded.info.get("null_label")
    if inspect_only and class_label is None and null is None:
        return loaded
    loaded.conditioning = make_conditioning(int(num), null, class_label, guidance_scale, seed)
    loaded.info.update(loaded.conditioning.describe())
    return loaded
