"""Every named choice of the library and the command line, defined once.

Each choice is a ``Literal`` (what typer turns into the option's choices, and what library
signatures are typed with) and the tuple of its values (what the library checks against).
Standard library only: the CLI imports this to build its options, and `ddpm --help` must not
import torch. The core (`ddpmcli.core.kinds`) and the runtime take their tuples from here;
``tests/test_architecture.py`` checks that the typer options and the library agree.
"""

from __future__ import annotations

from typing import Literal, get_args

PredictionType = Literal["epsilon", "sample", "v_prediction", "flow"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
PREDICTION_ALIASES: dict[str, str] = {
    "eps": "epsilon",
    "x0": "sample",
    "v": "v_prediction",
    "flow_prediction": "flow",
    "velocity": "flow",
}
"""Accepted everywhere a prediction type is taken, documented in `--help`. ``flow`` is the
rectified-flow velocity v = eps - x0 (SD3, Flux); ``v``/``v_prediction`` keep their VP meaning
sqrt(ab) eps - sqrt(1 - ab) x0."""

VarianceType = Literal["fixed_small", "fixed_large", "learned_range"]
VARIANCE_TYPES: tuple[str, ...] = get_args(VarianceType)

SpacingName = Literal["leading", "trailing", "linspace"]
SPACINGS: tuple[str, ...] = get_args(SpacingName)
DEFAULT_SPACING: SpacingName = "trailing"
"""Spacing when neither the flags nor a checkpoint's scheduler config name one: it always
visits t = T-1 (leading skips it; `ddpm check` warns about that)."""

SigmaSpacingName = Literal["karras", "exponential", "beta", "lu"]
SIGMA_SPACINGS: tuple[str, ...] = get_args(SigmaSpacingName)
"""Grids of noise levels rather than of training timesteps (`ddpm sample --spacing`): Karras
et al. 2022's rho grid, uniform in log sigma, Lee et al. 2024's beta grid, uniform log-SNR (Lu et
al. 2022's "lu"), between the training schedule's sigma_min and sigma_max."""

SampleSpacingName = Literal[
    "leading", "trailing", "linspace", "karras", "exponential", "beta", "lu"
]  # fmt: skip
SAMPLE_SPACINGS: tuple[str, ...] = get_args(SampleSpacingName)
"""What `ddpm sample --spacing` takes: the respacings and the sigma grids."""

SweepDenoiserName = Literal["checkpoint", "optimal"]
SWEEP_DENOISERS: tuple[str, ...] = get_args(SweepDenoiserName)
"""What `ddpm steps --denoiser` samples: the checkpoint's network, or the Bayes-optimal denoiser
of its data (the samplers' error alone, against a float64 converged solve of that exact ODE)."""

SamplerName = Literal[
    "ddpm", "ddim", "dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "flow-euler", "euler", "euler-a",
    "heun", "unipc",
]  # fmt: skip
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
"""The built-in samplers; `ddpmcli.run.samplers` registers exactly these."""

DpmForm = Literal["diffusers", "exact"]
DPM_FORMS: tuple[str, ...] = get_args(DpmForm)
"""DPM-Solver++'s third-order update (`--dpm-form`): ``diffusers`` (its, k-diffusion's and Lu et
al.'s code, second order in fact: its D2 term has half the Taylor coefficient) or ``exact`` (the
Taylor coefficient and a DPM-Solver++(2S) first step, one more model call: third order)."""

TimeShiftType = Literal["exponential", "linear"]
TIME_SHIFT_TYPES: tuple[str, ...] = get_args(TimeShiftType)
"""A flow's resolution-dependent time shift (diffusers' ``time_shift_type``): Flux's
exponential ``e^mu/(e^mu + (1/s - 1))`` or CogView4's linear ``mu/(mu + (1/s - 1))``."""

DecoderName = Literal["discretized", "discretized_tanh", "continuous"]
DECODERS: tuple[str, ...] = get_args(DecoderName)

NllMethod = Literal["vb", "ode", "both"]
NLL_METHODS: tuple[str, ...] = get_args(NllMethod)
"""`ddpm nll`: the variational bound, the probability-flow ODE's likelihood, or both."""

ProbeKind = Literal["rademacher", "gaussian"]
PROBE_KINDS: tuple[str, ...] = get_args(ProbeKind)
"""Hutchinson-Skilling probes of the ODE's divergence estimate."""

Dequantization = Literal["auto", "none", "uniform"]
DEQUANTIZATIONS: tuple[str, ...] = get_args(Dequantization)
"""The ODE likelihood's data: none (continuous), uniform (8-bit; auto for images)."""

DtypeName = Literal["float32", "bfloat16", "float16", "float64"]
DTYPES: tuple[str, ...] = get_args(DtypeName)
"""Dtypes a model may run in, the same set for every command."""

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
DEVICES: tuple[str, ...] = get_args(DeviceName)

FormatName = Literal["auto", "table", "csv", "tsv", "json", "jsonl"]
FORMATS: tuple[str, ...] = get_args(FormatName)

ArchitectureName = Literal["auto", "mlp", "unet"]
ARCHITECTURES: tuple[str, ...] = get_args(ArchitectureName)


def prediction_type_of(name: str) -> str | None:
    """The prediction type ``name`` spells (any case, aliases included), or None."""
    key = name.strip().lower()
    key = PREDICTION_ALIASES.get(key, key)
    return key if key in PREDICTION_TYPES else None


def prediction_type_choices() -> str:
    """The accepted spellings, for help and messages: the types, then the aliases."""
    aliases = ", ".join(f"{a}={t}" for a, t in PREDICTION_ALIASES.items())
    return f"{', '.join(PREDICTION_TYPES)} (aliases {aliases})"
