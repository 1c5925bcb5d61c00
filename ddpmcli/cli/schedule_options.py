"""The schedule flags, one group spliced into every command that builds a schedule.

`@schedule_options()` replaces a command's ``flags: ScheduleFlags`` parameter with the
schedule options (``--kind``/``-k`` ... ``--image-seq-len``) at that place in its
signature, and hands the command the parsed values as one :class:`ScheduleFlags`;
`respacing=False` leaves out ``--steps``/``--spacing``/``--steps-offset`` (train). Nothing here
imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from ddpmcli.choices import SpacingName
from ddpmcli.cli.common import as_flags, in_panel, parse_key_values, warn_respacing
from ddpmcli.cli.completion import check_kind, complete_kind
from ddpmcli.cli.option_groups import Command, option_group
from ddpmcli.errors import UsageError

if TYPE_CHECKING:
    from ddpmcli.configs import ScheduleRequest

PANEL_SCHEDULE = "Schedule"


_option = in_panel(PANEL_SCHEDULE)  # the options of the Schedule panel of the help


KindOpt = Annotated[
    str | None,
    _option(
        "--kind",
        "-k",
        help="Schedule kind from the core registry (list them with `ddpm schedule --list-kinds`), "
        "an alias such as squaredcos_cap_v2, or custom (with --betas-file/--alpha-bars-file). "
        "Default: linear.",
        autocompletion=complete_kind,
        callback=check_kind,
    ),
]
TimestepsOpt = Annotated[
    int | None,
    _option("--timesteps", "-T", help="T, the number of training timesteps (default 1000)."),
]
BetaStartOpt = Annotated[
    float | None,
    _option("--beta-start", help="First beta (linear, scaled_linear, sigmoid)."),
]
BetaEndOpt = Annotated[
    float | None,
    _option("--beta-end", help="Last beta (linear, scaled_linear, sigmoid)."),
]
MaxBetaOpt = Annotated[
    float | None,
    _option("--max-beta", help="Beta cap (cosine, sqrt)."),
]
ParamOpt = Annotated[
    list[str] | None,
    _option(
        "--param",
        "-p",
        metavar="NAME=VALUE",
        help="Any other constant of the kind, repeatable: --param s=0.01 (see --list-kinds).",
    ),
]
# The first bytes of what a model checkpoint starts with: a zip archive (torch.save, TorchScript,
# .pt2) or a bare pickle (protocol 2-5).
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _not_a_checkpoint(value: Path | None) -> Path | None:
    """`--from` given a model checkpoint says so and what to run instead (issue 20: it read as
    `not UTF-8 text (byte 128)`). Only the first bytes are read; anything else is left to the
    config reader and its own messages."""
    # a regular file only: opening a FIFO blocks until a writer comes (the config reader refuses
    # FIFOs and devices without opening them)
    if value is None:
        return value
    try:
        if not value.is_file():
            return value
        with open(value, "rb") as file:
            head = file.read(4)
    except OSError:
        return value
    if head.startswith(_CHECKPOINT_MAGIC):
        raise UsageError(
            f"--from {str(value)!r} is a model checkpoint, not a scheduler config: its schedule is "
            f"in `ddpm info {value}` (kind, T, terminal SNR), and `ddpm reconstruct/sample/nll "
            f"{value}` use it; --from takes a diffusers scheduler_config.json or its folder"
        )
    return value


FromOpt = Annotated[
    Path | None,
    _option(
        "--from",
        metavar="FILE",
        help="A diffusers scheduler_config.json (or a folder holding one).",
        callback=_not_a_checkpoint,
    ),
]
BetasFileOpt = Annotated[
    Path | None,
    _option("--betas-file", metavar="FILE", help="Custom betas: .npy, .txt, .csv, .tsv or .json."),
]
AlphaBarsFileOpt = Annotated[
    Path | None,
    _option(
        "--alpha-bars-file",
        metavar="FILE",
        help="Custom alpha_bars (strictly decreasing): .npy, .txt, .csv, .tsv or .json.",
    ),
]
ZeroSnrOpt = Annotated[
    bool,
    _option("--zero-terminal-snr", help="Rescale to zero terminal SNR (Lin et al. 2024, Alg. 1)."),
]
LogsnrShiftOpt = Annotated[
    float,
    _option("--logsnr-shift", help="Add this to every log-SNR (after --zero-terminal-snr)."),
]
StepsOpt = Annotated[
    str | None,
    _option(
        "--steps",
        metavar="N",
        help="Respace to N inference steps (with --spacing), or a section string: ddim50, "
        "10,20,30.",
    ),
]
SpacingOpt = Annotated[
    SpacingName | None,
    _option(
        "--spacing",
        help="How --steps N are spread: leading, trailing, linspace. Default: a config's own, "
        "else trailing (it visits t = T-1), as for sample; leading warns when it skips T-1.",
    ),
]
StepsOffsetOpt = Annotated[
    int | None,
    _option("--steps-offset", help="diffusers' steps_offset for leading spacing."),
]
ScaleOpt = Annotated[
    bool,
    _option(
        "--scale-to-timesteps",
        help="linear: scale the ends by 1000/T as improved-diffusion does (diffusers does not).",
    ),
]

ResolutionOpt = Annotated[
    int | None,
    _option(
        "--resolution",
        metavar="PX",
        help="Flow with dynamic shifting (Flux, --kind flow): the image size, PX x PX, that sets "
        "mu as the pipeline does ((PX/16)^2 tokens).",
    ),
]
ImageSeqLenOpt = Annotated[
    int | None,
    _option(
        "--image-seq-len",
        metavar="N",
        help="Flow with dynamic shifting: the image (or video) sequence length that sets mu.",
    ),
]

RESPACING_FLAGS = ("steps", "spacing", "steps_offset")
SCHEDULE_FLAG_NAMES = {
    "from_file": "--from",
    "timesteps": "-T/--timesteps",
    "mu": "--param mu=...",
    "from_config": "--from",
}
"""The schedule parameters whose flag is not ``--`` + the name (``cli.common.as_flags``)."""


@dataclass(frozen=True)
class ScheduleFlags:
    """The schedule flags as given (None or the flag's own default where not given)."""

    kind: KindOpt = None
    timesteps: TimestepsOpt = None
    beta_start: BetaStartOpt = None
    beta_end: BetaEndOpt = None
    max_beta: MaxBetaOpt = None
    param: ParamOpt = None
    from_file: FromOpt = None
    betas_file: BetasFileOpt = None
    alpha_bars_file: AlphaBarsFileOpt = None
    zero_terminal_snr: ZeroSnrOpt = False
    logsnr_shift: LogsnrShiftOpt = 0.0
    steps: StepsOpt = None
    spacing: SpacingOpt = None
    steps_offset: StepsOffsetOpt = None
    scale_to_timesteps: ScaleOpt = False
    resolution: ResolutionOpt = None
    image_seq_len: ImageSeqLenOpt = None

    def warn_respacing(self, built: Any) -> None:
        """`common.warn_respacing` for a schedule these flags built: only when ``--steps N``
        respaced it (a count; a section string names its own timesteps)."""
        if self.steps is None or not self.steps.strip().isdigit():
            return
        from ddpmcli.configs import spacing_of

        warn_respacing(built.schedule, spacing_of(self.spacing, built.config))

    def request(self, *, respacing: bool = True) -> ScheduleRequest:
        """One request for `configs.build_schedule`; ``respacing=False`` leaves --steps,
        --spacing and --steps-offset out (check probes them itself)."""
        from ddpmcli.configs import ScheduleRequest

        params = parse_key_values(self.param)
        for name in ("beta_start", "beta_end", "max_beta"):
            value = getattr(self, name)
            if value is not None:
                if name in params:
                    flag = "--" + name.replace("_", "-")
                    raise UsageError(f"{flag} and --param {name}=... both given")
                params[name] = value
        if self.scale_to_timesteps:
            params["scale_to_timesteps"] = 1.0
        return ScheduleRequest(
            kind=self.kind,
            timesteps=self.timesteps,
            params=params,
            from_file=None if self.from_file is None else str(self.from_file),
            betas_file=None if self.betas_file is None else str(self.betas_file),
            alpha_bars_file=None if self.alpha_bars_file is None else str(self.alpha_bars_file),
            zero_terminal_snr=self.zero_terminal_snr,
            logsnr_shift=self.logsnr_shift,
            steps=self.steps if respacing else None,
            spacing=self.spacing if respacing else None,
            steps_offset=self.steps_offset if respacing else None,
            resolution=self.resolution,
            image_seq_len=self.image_seq_len,
        )


NO_FLAGS = ScheduleFlags()
"""The default of a command's ``flags`` parameter where it follows options with defaults (never
used: the splice replaces it)."""


def schedule_options(*, respacing: bool = True) -> Callable[[Command], Command]:
    """Splice the schedule flags into a command at its ``flags`` parameter (see the module doc);
    errors naming schedule parameters show the flags (``from_file`` as ``--from``)."""
    return option_group(
        ScheduleFlags,
        "flags",
        leave_out=() if respacing else RESPACING_FLAGS,
        context=lambda: as_flags(**SCHEDULE_FLAG_NAMES),
    )
