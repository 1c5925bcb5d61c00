"""Named presets: the noise schedules of published models, by name.

Each preset is the model's published scheduler config (the values of its
``scheduler/scheduler_config.json`` on the Hugging Face hub, copied here with the keys that
matter; nothing is downloaded), or, for models without a diffusers scheduler config, the kind
and constants of its paper. ``ddpm compare sd15 sd3 flux@1024`` and ``ddpm schedule --from sd3``
take them; ``NAME@RES`` gives a dynamically shifted flow its image size (RES px square).

Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ddpmcli.errors import UsageError


@dataclass(frozen=True)
class Preset:
    """A published model's schedule: ``config`` (a diffusers scheduler config) or ``kind`` with
    ``params`` and ``timesteps``; ``resolution``: the image size its pipeline defaults to
    (used for a dynamic shift when ``@RES`` is not given). ``steps_set_timesteps``: N inference
    steps are the kind's own N-point grid (EDM's Karras sigmas); ``spacing``: how a kind preset is
    respaced to N steps (improved-diffusion's even sections: ``linspace``)."""

    name: str
    summary: str
    source: str
    config: Mapping[str, Any] | None = None
    kind: str | None = None
    params: Mapping[str, float] = field(default_factory=dict)
    timesteps: int | None = None
    resolution: int | None = None
    steps_set_timesteps: bool = False
    spacing: str | None = None


# SD 1.x/2.x/XL: the scaled_linear beta table (Rombach et al. 2022), beta 0.00085 .. 0.012.
_SD_TABLE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
}

# SD3 and SD3.5: FlowMatchEulerDiscreteScheduler with the static shift 3 (one config, two presets).
_SD3_FLOW = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "sd15",
            "Stable Diffusion 1.5: scaled_linear betas 0.00085..0.012, epsilon, PNDM",
            "runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDMScheduler: "
            "beta_start 0.00085, beta_end 0.012, scaled_linear, steps_offset 1, "
            "skip_prk_steps true, set_alpha_to_one false, clip_sample false)",
            config={
                "_class_name": "PNDMScheduler",
                **_SD_TABLE,
                "steps_offset": 1,
                "skip_prk_steps": True,
                "set_alpha_to_one": False,
                "clip_sample": False,
            },
        ),
        Preset(
            "sd2-v",
            "Stable Diffusion 2.x 768-v: the SD table, v-prediction, DDIM",
            "stabilityai/stable-diffusion-2 scheduler/scheduler_config.json (DDIMScheduler: "
            "the SD table, prediction_type v_prediction, steps_offset 1, clip_sample false)",
            config={
                "_class_name": "DDIMScheduler",
                **_SD_TABLE,
                "prediction_type": "v_prediction",
                "steps_offset": 1,
                "set_alpha_to_one": False,
                "clip_sample": False,
                "skip_prk_steps": True,
            },
        ),
        Preset(
            "sdxl",
            "SDXL base 1.0: the SD table, epsilon, Euler with leading spacing",
            "stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json "
            "(EulerDiscreteScheduler: the SD table, timestep_spacing leading, steps_offset 1, "
            "interpolation_type linear, use_karras_sigmas false)",
            config={
                "_class_name": "EulerDiscreteScheduler",
                **_SD_TABLE,
                "prediction_type": "epsilon",
                "timestep_spacing": "leading",
                "steps_offset": 1,
                "interpolation_type": "linear",
                "use_karras_sigmas": False,
                "set_alpha_to_one": False,
                "skip_prk_steps": True,
                "clip_sample": False,
                "sample_max_value": 1.0,
            },
            resolution=1024,
        ),
        Preset(
            "sd3",
            "Stable Diffusion 3 medium: rectified flow, static shift 3",
            "stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json "
            "(FlowMatchEulerDiscreteScheduler: num_train_timesteps 1000, shift 3.0)",
            config=dict(_SD3_FLOW),
            resolution=1024,
        ),
        Preset(
            "sd35",
            "Stable Diffusion 3.5 large: rectified flow, static shift 3",
            "stabilityai/stable-diffusion-3.5-large scheduler/scheduler_config.json "
            "(FlowMatchEulerDiscreteScheduler: num_train_timesteps 1000, shift 3.0)",
            config=dict(_SD3_FLOW),
            resolution=1024,
        ),
        Preset(
            "flux-dev",
            "FLUX.1 [dev]: rectified flow, dynamic shift by resolution (mu 0.5 at 256 tokens, "
            "1.15 at 4096)",
            "black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json "
            "(FlowMatchEulerDiscreteScheduler: shift 3.0, use_dynamic_shifting true, base_shift "
            "0.5, max_shift 1.15, base_image_seq_len 256, max_image_seq_len 4096); FluxPipeline "
            "passes sigmas linspace(1, 1/n, n) and mu = calculate_shift(image_seq_len)",
            config={
                "_class_name": "FlowMatchEulerDiscreteScheduler",
                "num_train_timesteps": 1000,
                "shift": 3.0,
                "use_dynamic_shifting": True,
                "base_shift": 0.5,
                "max_shift": 1.15,
                "base_image_seq_len": 256,
                "max_image_seq_len": 4096,
            },
            resolution=1024,
        ),
        Preset(
            "flux-schnell",
            "FLUX.1 [schnell]: rectified flow, no shift (timestep-distilled, 1-4 steps)",
            "black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json "
            "(FlowMatchEulerDiscreteScheduler: shift 1.0, use_dynamic_shifting false)",
            config={
                "_class_name": "FlowMatchEulerDiscreteScheduler",
                "num_train_timesteps": 1000,
                "shift": 1.0,
                "use_dynamic_shifting": False,
                "base_shift": 0.5,
                "max_shift": 1.15,
                "base_image_seq_len": 256,
                "max_image_seq_len": 4096,
            },
            resolution=1024,
        ),
        Preset(
            "sana",
            "SANA 1600M 1024px: rectified flow, flow_shift 3, DPM-Solver++ on flow sigmas",
            "Efficient-Large-Model/Sana_1600M_1024px_diffusers scheduler/scheduler_config.json "
            "(DPMSolverMultistepScheduler: use_flow_sigmas true, flow_shift 3.0, prediction_type "
            "flow_prediction)",
            config={
                "_class_name": "DPMSolverMultistepScheduler",
                "num_train_timesteps": 1000,
                "use_flow_sigmas": True,
                "flow_shift": 3.0,
                "prediction_type": "flow_prediction",
                "algorithm_type": "dpmsolver++",
                "solver_order": 2,
                "final_sigmas_type": "zero",
            },
            resolution=1024,
        ),
        Preset(
            "wan",
            "Wan 2.1 T2V: rectified flow, flow_shift 3 (480p; 5 for 720p), UniPC on flow sigmas",
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json "
            "(UniPCMultistepScheduler: use_flow_sigmas true, flow_shift 3.0, prediction_type "
            "flow_prediction); diffusers docs/source/en/api/pipelines/wan.md: default shift 3.0",
            config={
                "_class_name": "UniPCMultistepScheduler",
                "num_train_timesteps": 1000,
                "use_flow_sigmas": True,
                "flow_shift": 3.0,
                "prediction_type": "flow_prediction",
                "solver_order": 2,
                "final_sigmas_type": "zero",
            },
        ),
        Preset(
            "edm",
            "EDM (Karras et al. 2022) in sigma space: sigma 0.002..80, rho 7",
            "Karras et al. 2022, Table 1: sigma_min 0.002, sigma_max 80, rho 7, "
            "c_noise = ln(sigma)/4 (ddpm kind edm_sigma)",
            kind="edm_sigma",
            params={"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
            timesteps=1000,
            steps_set_timesteps=True,
        ),
        Preset(
            "improved-cosine",
            "improved-diffusion cosine (Nichol & Dhariwal 2021): T = 4000, s = 0.008",
            "openai/improved-diffusion: --noise_schedule cosine --diffusion_steps 4000 "
            "(ImageNet 64 / CIFAR-10 runs), s = 0.008, beta capped at 0.999",
            kind="cosine",
            timesteps=4000,
            spacing="linspace",
        ),
    )
}
ALIASES: dict[str, str] = {
    "sd1.5": "sd15",
    "sd2": "sd2-v",
    "sd3.5": "sd35",
    "flux": "flux-dev",
    "flux-1-dev": "flux-dev",
    "cosine-improved": "improved-cosine",
}


def find(text: str) -> Preset | None:
    """The preset ``text`` names (``NAME`` or ``NAME@RES``; case-insensitive), or None."""
    name = text.strip().lower().partition("@")[0]
    return PRESETS.get(ALIASES.get(name, name))


def parse(text: str) -> tuple[Preset, int | None] | None:
    """``NAME[@RES]`` -> the preset and the resolution (RES, or None), None if not a preset.
    ``@RES`` on a preset without a dynamic shift is a usage error (it would change nothing)."""
    name, at, res = text.strip().partition("@")
    preset = find(name)
    if preset is None:
        return None
    if not at:
        return preset, None
    if not res.isdigit() or int(res) < 16:
        raise UsageError(f"{text!r}: @RES must be an image size in pixels (>= 16), e.g. flux@1024")
    config = preset.config or {}
    if not config.get("use_dynamic_shifting"):
        raise UsageError(f"{text!r}: {preset.name} does not shift by resolution; drop @{res}")
    return preset, int(res)


def names() -> list[str]:
    """The preset names, for help text and completion."""
    return list(PRESETS)
