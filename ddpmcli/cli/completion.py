"""Shell completion of option values (issue 8): schedule kinds and their aliases (`--kind`/`-k`,
`compare` specs), column names per command (`--columns`, a comma list), built-in data names
(`--data`, `--references`, with file names from the shell beside them).

Each completer is a typer ``autocompletion=`` callback: typer passes it what is typed
(``incomplete: str``) and, where it takes one, the context (``ctx``); it returns plain strings
(typer wraps them as completion items: no import of click itself).
They run only when the shell asks for completions: this module imports nothing heavy at import
time (the option definitions import it, and `ddpm --help` must stay fast).
"""

from __future__ import annotations

from typing import Any

# Copies of the library's lists, so that completing imports neither torch nor the core (the
# README: `ddpm --help` and completion import no torch); tests/test_checks_completion.py checks
# each against its source (core.SCHEDULE_KINDS/ALIASES, data.BUILTIN_DATASETS, core.QUANTITIES,
# run's STEP/BOUND/AGGREGATE/OPTIMAL_COLUMNS).
KINDS = (
    "linear", "scaled_linear", "cosine", "sigmoid", "sigmoid_logsnr", "sqrt", "laplace", "exp",
    "shifted_cosine", "vp", "edm", "flow", "edm_sigma", "ve",
)  # fmt: skip
KIND_ALIASES = ("squaredcos_cap_v2",)
CUSTOM_KIND = "custom"  # betas or alpha_bars from a file (schedule_options' --betas-file)
BUILTIN_DATA = ("moons", "swiss_roll", "gmm", "shapes")
QUANTITIES = (
    "beta", "alpha", "alpha_bar", "alpha_bar_prev", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar",
    "snr", "log_snr", "sigma", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef_x0", "posterior_mean_coef_xt", "sqrt_recip_alpha_bar",
    "sqrt_recipm1_alpha_bar",
)  # fmt: skip
STEP_COLUMNS = (
    "step", "t", "variance", "xt_std", "xt_std_expected", "x0_min", "x0_max", "x0_std",
    "clip_fraction", "update_norm", "log_snr_gap", "order",
)  # fmt: skip
BOUND_COLUMNS = ("t", "term", "bits_per_dim", "stderr", "weight", "x0_mse", "eps_mse")
AGGREGATE_COLUMNS = ("t", "alpha_bar", "snr", "mse", "psnr", "eps_mse", "clip_fraction")
OPTIMAL_COLUMNS = ("optimal_mse", "optimal_eps_mse", "excess_mse", "excess_stderr")


def kind_names() -> list[str]:
    """Every schedule kind, then the aliases, then ``custom``."""
    return [*KINDS, *KIND_ALIASES, CUSTOM_KIND]


def check_kind(value: str | None) -> str | None:
    """`--kind` checked while the command line is parsed, before torch is imported (issue 20: a
    typo answers in well under a second): a kind, an alias or ``custom``, any case, else a usage
    error with the closest names and the whole list. The core resolves the name itself later."""
    if value is None or value.strip().lower() in kind_names():
        return value
    import difflib

    from ddpmcli.errors import UsageError

    close = difflib.get_close_matches(value.strip().lower(), kind_names(), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(name) for name in close)}?)" if close else ""
    raise UsageError(f"unknown schedule kind {value!r}{hint}; allowed: {', '.join(kind_names())}")


def complete_kind(incomplete: str) -> list[str]:
    """`--kind`: the kinds and aliases starting with what is typed."""
    return [name for name in kind_names() if name.startswith(incomplete)]


def complete_spec(incomplete: str) -> list[str]:
    """`compare SPEC...`: a kind while the spec has no ``:`` or ``+`` yet. No match leaves the
    shell to complete file names (a spec may be a diffusers config)."""
    if ":" in incomplete or "+" in incomplete:
        return []
    return complete_kind(incomplete)


def complete_data(incomplete: str) -> list[str]:
    """`--data`/`--references`: the built-in sets starting with what is typed; none (a path)
    leaves the shell to complete file names (typer's scripts fall back to them)."""
    return [name for name in BUILTIN_DATA if name.startswith(incomplete)]


def column_names(command: str | None) -> list[str]:
    """The columns `command` can print (what its `--columns` accepts); [] for another command."""
    if command in ("schedule", "compare"):
        first = ["schedule"] if command == "compare" else []
        return [*first, "t", "timestep", *QUANTITIES]
    if command in ("posterior", "check"):
        from ddpmcli.cli.schedule import CHECK_COLUMNS, POSTERIOR_COLUMNS

        return list(POSTERIOR_COLUMNS if command == "posterior" else CHECK_COLUMNS)
    if command == "info":
        from ddpmcli.cli.checkpoint import INFO_COLUMNS, MODEL_COLUMNS

        return [*INFO_COLUMNS, *MODEL_COLUMNS]
    names = {
        "reconstruct": ("t", "sample", *AGGREGATE_COLUMNS, *OPTIMAL_COLUMNS),
        "sample": STEP_COLUMNS,
        "nll": (*BOUND_COLUMNS, "sample", "bits_per_dim"),
    }.get(command or "", ())
    return list(dict.fromkeys(names))


def complete_columns(ctx: Any, incomplete: str) -> list[str]:
    """`--columns A,B,...`: the command's columns not yet listed, after what is typed."""
    done, comma, last = incomplete.rpartition(",")
    listed = set(done.split(",")) if comma else set()
    head = done + comma
    names = column_names(getattr(ctx, "info_name", None))
    return [head + name for name in names if name.startswith(last) and name not in listed]
