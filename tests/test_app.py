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
        "  ddpm schedule --kind cosine\n  ddpm schedule --kind linear"
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
