"""The app's help text: prose paragraphs reflowed, examples kept line by line."""

from __future__ import annotations

from typer.testing import CliRunner

from ddpmcli.cli.app import app, reflow_help


def test_reflow_joins_prose_and_keeps_examples() -> None:
    doc = """Summary line.

    A paragraph that was wrapped
    in the source at column 100.

    Examples:

      ddpm schedule --kind cosine
      ddpm schedule --kind linear
    """
    assert reflow_help(doc) == (
        "Summary line.\n\n"
        "A paragraph that was wrapped in the source at column 100.\n\n"
        "Examples:\n\n"
        # \b: click keeps the examples' lines as written (issue 20: never wrapped mid-command)
        "\b\n  ddpm schedule --kind cosine\n  ddpm schedule --kind linear"
    )


def test_every_command_help_is_reflowed() -> None:
    for info in app.registered_commands:
        assert info.help, f"{info.name or info.callback} has no help"
        first = info.help.split("\n\n")[1] if "\n\n" in info.help else ""
        if first and not first.startswith((" ", "- ", "* ")):
            assert "\n" not in first, (info.callback, first)


def test_help_renders_wide_paragraphs() -> None:
    result = CliRunner().invoke(
        app, ["check", "--help"], terminal_width=200, env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0
    assert "betas hitting the cap, alpha_bar not strictly decreasing" in result.output


def test_error_boundary_shows_the_parameters_a_library_error_names_as_flags(capsys) -> None:  # type: ignore[no-untyped-def]
    """Rule 16: the library names parameters; only the CLI (its one boundary) names flags."""
    from ddpmcli.cli.root import run_guarded
    from ddpmcli.errors import CheckpointError, ParameterError

    def fail() -> None:
        raise CheckpointError.naming("m{{1}}.pt: pass the right {data_shape} or {learned_variance}")

    assert str(CheckpointError.naming("pass {data_shape}")) == "pass data_shape"
    assert run_guarded(fail) == 1
    assert capsys.readouterr().err == (
        "Error: m{1}.pt: pass the right --data-shape or --learned-variance\n"
    )

    def usage() -> None:
        raise ParameterError("{batch_size} must be at least 1")

    assert run_guarded(usage) == 2
    assert capsys.readouterr().err == "Error: --batch-size must be at least 1\n"
