"""``ddpmcli.schedule``: a noise schedule exactly as `ddpm schedule` builds it (kept apart from
:mod:`ddpmcli.api`, which stays under the module size limit; ``ddpmcli.api.schedule`` is this)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ddpmcli import core
from ddpmcli.choices import SpacingName
from ddpmcli.configs import ScheduleRequest, build_schedule


def schedule(
    kind: str | None = None,
    timesteps: int | None = None,
    *,
    zero_terminal_snr: bool = False,
    logsnr_shift: float = 0.0,
    steps: int | str | None = None,
    spacing: SpacingName | None = None,
    steps_offset: int | None = None,
    from_file: str | os.PathLike[str] | None = None,
    betas_file: str | os.PathLike[str] | None = None,
    alpha_bars_file: str | os.PathLike[str] | None = None,
    from_config: Mapping[str, Any] | None = None,
    resolution: int | None = None,
    image_seq_len: int | None = None,
    **params: float,
) -> core.Schedule:
    """A noise schedule in float64, built exactly as `ddpm schedule` builds it.

    Args:
        kind: a schedule kind or alias (``linear``, ``cosine``, ``flow``, ``edm_sigma``, ...;
            default ``linear``), or ``custom`` with ``betas_file``/``alpha_bars_file``.
        timesteps: T (default 1000).
        zero_terminal_snr, logsnr_shift: transforms applied in that order.
        steps, spacing, steps_offset: respace to ``steps`` (a count or a section string such as
            ``ddim50``); spacing default ``leading`` (or the config file's).
        from_file: a diffusers ``scheduler_config.json`` (or a folder holding one), or a preset
            (``sd3``, ``flux@1024``: :mod:`ddpmcli.presets`).
        from_config: a scheduler config already parsed (a dict of its keys, ``_class_name``
            included); read as ``from_file`` reads a file.
        resolution, image_seq_len: the image size that sets a dynamic flow shift (``mu``, which
            ``**params`` may give instead), as the family's pipeline computes it.
        betas_file, alpha_bars_file: a custom schedule from a file of numbers.
        **params: the kind's own parameters (``beta_start``, ``beta_end``, ``s``, ``shift``...);
            with a config, ``mu`` alone.

    Raises:
        ParameterError: conflicting or out-of-range choices. ScheduleError: bad parameters.
    """
    request = ScheduleRequest(
        kind=kind, timesteps=timesteps, params=dict(params),
        from_file=None if from_file is None else str(from_file),
        betas_file=None if betas_file is None else str(betas_file),
        alpha_bars_file=None if alpha_bars_file is None else str(alpha_bars_file),
        zero_terminal_snr=zero_terminal_snr, logsnr_shift=logsnr_shift,
        steps=None if steps is None else str(steps), spacing=spacing, steps_offset=steps_offset,
        from_config=from_config, resolution=resolution, image_seq_len=image_seq_len,
    )  # fmt: skip
    return build_schedule(request).schedule
