"""The shape of the code, as issue 11 measures it: no module over 600 lines and no function body
(after its signature and docstring) over 60 lines in ``ddpmcli/``; the core imports only torch and
the standard library; the layers call downwards only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ddpmcli"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 600
MAX_BODY_LINES = 60


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]  # the docstring
    if not body:
        return 0
    end = max(getattr(n, "end_lineno", n.lineno) or n.lineno for n in body)
    return end - body[0].lineno + 1


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_function_sizes(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    long = [
        f"{node.name} ({_body_lines(node)} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _body_lines(node) > MAX_BODY_LINES
    ]
    assert long == []


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_imports_torch_and_stdlib_only() -> None:
    import sys

    core = [PACKAGE / "core.py"] if (PACKAGE / "core.py").exists() else []
    core += sorted((PACKAGE / "core").glob("*.py"))
    assert core
    for path in core:
        for name in _imports(path):
            top = name.split(".")[0]
            assert top in {"torch", "ddpmcli", "__future__"} or top in sys.stdlib_module_names, (
                f"{path.name} imports {name}"
            )
            if top == "ddpmcli":
                allowed = ("ddpmcli.core", "ddpmcli.errors", "ddpmcli.choices")
                assert name.startswith(allowed), f"{path.name}: {name}"


# ---------------------------------------------------------------------------------------------
# one source for every choice: the typer options offer exactly the library's values

OPTION_CHOICES = {
    "format": "FORMATS",
    "device": "DEVICES",
    "dtype": "DTYPES",
    "spacing": "SPACINGS",
    "sampler": "SAMPLERS",
    "variance": "VARIANCE_TYPES",
    "architecture": "ARCHITECTURES",
    "method": "NLL_METHODS",
    "probe-kind": "PROBE_KINDS",
    "dequantization": "DEQUANTIZATIONS",
    "denoiser": "SWEEP_DENOISERS",
}


def _choice_options() -> list[tuple[str, str, tuple[str, ...]]]:
    import typer

    from ddpmcli.cli.app import app

    group = typer.main.get_command(app)
    found = []
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        for param in command.params:
            choices = getattr(param.type, "choices", None)
            if choices is not None:
                flag = max(getattr(param, "opts", []), key=len).lstrip("-")
                found.append((name, flag, tuple(str(c) for c in choices)))
    return found


def test_typer_choices_are_the_library_choices() -> None:
    from ddpmcli import choices

    found = _choice_options()
    seen = {option for _, option, _ in found}
    assert {"format", "device", "dtype", "spacing", "sampler", "variance"} <= seen
    for command, option, offered in found:
        if option == "decoder":  # nll: auto picks by the data's shape
            assert offered == ("auto", *choices.DECODERS), command
            continue
        if command in ("sample", "steps") and option == "spacing":  # respacings and sigma grids
            assert offered == choices.SAMPLE_SPACINGS, command
            assert offered == (*choices.SPACINGS, *choices.SIGMA_SPACINGS)
            continue
        assert option in OPTION_CHOICES, f"{command} --{option}: add it to ddpmcli.choices"
        assert offered == getattr(choices, OPTION_CHOICES[option]), f"{command} --{option}"


def test_library_takes_its_choices_from_one_place() -> None:
    from ddpmcli import choices, core, run
    from ddpmcli.run import runtime

    assert core.PREDICTION_TYPES is choices.PREDICTION_TYPES
    assert core.PREDICTION_ALIASES is choices.PREDICTION_ALIASES
    assert core.VARIANCE_TYPES is choices.VARIANCE_TYPES
    assert core.SPACINGS is choices.SPACINGS
    assert tuple(core.DECODERS) == choices.DECODERS
    assert tuple(run.SAMPLERS) == choices.SAMPLERS
    assert tuple(runtime.DTYPES) == choices.DTYPES
    assert tuple(runtime.DEVICES) == choices.DEVICES


@pytest.mark.parametrize(
    ("given", "stored"), [("eps", "epsilon"), ("V", "v_prediction"), ("x0", "sample")]
)
def test_prediction_type_aliases_are_one_spelling(cli, given: str, stored: str) -> None:
    done = cli("check", "--kind", "linear", "-T", "50", "--prediction-type", given, "-f", "csv")
    same = cli("check", "--kind", "linear", "-T", "50", "--prediction-type", stored, "-f", "csv")
    assert (done.exit_code, done.stdout) == (same.exit_code, same.stdout)
    bad = cli("check", "--prediction-type", "noise")
    assert bad.exit_code == 2
    assert "'noise' is not one of epsilon, sample, v_prediction" in bad.stderr


def test_one_spelling_per_option_and_k_for_every_kind() -> None:
    """`-k` wherever a kind is taken (issue 8, one CLI vocabulary), and no short flag twice in
    one command."""
    import typer

    from ddpmcli.cli.app import app

    group = typer.main.get_command(app)
    kinds = 0
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        shorts = [o for p in command.params for o in getattr(p, "opts", []) if o[:2] != "--"]
        assert len(shorts) == len(set(shorts)), name
        for param in command.params:
            if param.name == "kind":
                kinds += 1
                assert set(param.opts) == {"--kind", "-k"}, name
    assert kinds >= 8


def test_checkpoint_commands_take_one_group_of_model_flags() -> None:
    """sample, nll, reconstruct and info take the checkpoint flags from one declaration
    (cli.option_groups.ModelFlags), in its order; only info offers --learned-variance."""
    from dataclasses import fields

    import typer

    from ddpmcli.cli.app import app
    from ddpmcli.cli.option_groups import ModelFlags

    group = typer.main.get_command(app)
    every = [f.name for f in fields(ModelFlags)]
    for name in ("sample", "nll", "reconstruct", "info"):
        params = [p.name for p in group.commands[name].params]  # type: ignore[attr-defined]
        taken = [p for p in params if p in every]
        want = every if name == "info" else [f for f in every if f != "learned_variance"]
        assert taken == want, name
        start = params.index(want[0])
        assert params[start : start + len(want)] == want, name  # spliced in one place
