"""README.md cannot drift: every ``$ ddpm ...`` line of its ```console blocks is run and its output
compared with the block, line by line (numbers, columns and text; only volatile values such as
timings are masked), and the schedule-kind table is compared with `ddpm schedule --list-kinds`.

How a console block is read:
- ``$ CMD`` lines are commands (a trailing ``\\`` continues one); the lines up to the next ``$``
  are what the command printed, stdout and stderr as a terminal shows them (the README's runs
  were made with ``COLUMNS=110``);
- a line ``...`` (after stripping) stands for any number of lines, and ``  # note`` after two
  spaces at the end of an output line is a comment for the reader;
- blocks without a ``$ ddpm`` line (a Python script's output) are not run;
- ``<!-- readme-test: skip REASON -->`` on the line before a block leaves it out, with a reason
  (say why it cannot run here, e.g. it needs a GPU or a download).

The blocks run in README order in one folder. Commands that write a file a later block reads (the
main job's ``ddpm train ... --out ckpt.pt``) run once, in the module-scoped ``workdir`` fixture,
and their own block is compared with that run. Commands are run in-process through the real app
(``ddpm`` with ``; echo $?``, ``>/dev/null`` and ``2>&1`` understood), anything else in bash.

``python tests/test_readme.py --kinds-table`` prints the kinds table to paste into the README.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COLUMNS = "110"  # the width the README's runs were made at (see "A tour")
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip\s+(.+?)\s*-->")
# Values that change from run to run: wall times ("in 31.6 s", "0.12 s"), written by any command.
VOLATILE = [(re.compile(r"\b\d+(?:\.\d+)? s\b"), "<seconds> s")]
PRODUCER = re.compile(r"^ddpm train\b.*\s(?:--out|-o)\s+(\S+)")


@dataclass
class Command:
    line: str  # the command as written after "$ "
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    number: int  # 1-based position among the console blocks
    line: int  # where it starts in README.md
    commands: list[Command]
    skip: str | None = None

    @property
    def id(self) -> str:
        first = self.commands[0].line if self.commands else ""
        return f"block{self.number}-line{self.line}: {first[:60]}"


def parse_blocks(text: str) -> list[Block]:
    """The ```console blocks of ``text`` that hold a ``$ ddpm`` command."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    number = 0
    while i < len(lines):
        if lines[i].strip() != "```console":
            i += 1
            continue
        number += 1
        start = i + 1
        previous = lines[i - 1] if i > 0 else ""
        skip = SKIP_MARK.search(previous)
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        commands = _commands(body)
        if any(c.line.startswith("ddpm ") for c in commands):
            blocks.append(Block(number, start, commands, skip.group(1) if skip else None))
        i += 1
    return blocks


def _commands(body: list[str]) -> list[Command]:
    commands: list[Command] = []
    pending = ""
    for raw in body:
        if pending:
            pending += " " + raw.strip()
            if not pending.endswith("\\"):
                commands.append(Command(pending))
                pending = ""
            else:
                pending = pending[:-1].rstrip()
        elif raw.startswith("$ "):
            line = raw[2:].strip()
            if line.endswith("\\"):
                pending = line[:-1].rstrip()
            else:
                commands.append(Command(line))
        elif commands:
            commands[-1].expected.append(raw)
    return commands


# ---------------------------------------------------------------------------------------------
# running a command


def _normalise(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        line = re.sub(r"\s{2,}#\s.*$", "", line).rstrip()  # a reader's note
        for pattern, mask in VOLATILE:
            line = pattern.sub(mask, line)
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return out


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether ``actual`` is ``expected`` with each ``...`` line standing for any lines."""
    if not expected:
        return not actual
    head, rest = expected[0], expected[1:]
    if head.strip() == "...":
        return any(matches(rest, actual[k:]) for k in range(len(actual) + 1))
    return bool(actual) and actual[0] == head and matches(rest, actual[1:])


class Shell:
    """Runs README command lines in one folder: ``ddpm`` in-process through the app (the same
    code as the console script), the rest in bash."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.status = 0

    def run(self, line: str) -> str:
        try:
            words = shlex.split(line)
        except ValueError:
            return self._bash(line)
        out: list[str] = []
        for segment in _segments(words):
            if segment is None:
                return self._bash(line)
            out.append(self._one(segment))
        return "".join(out)

    def _one(self, words: list[str]) -> str:
        if words == ["echo", "$?"]:
            return f"{self.status}\n"
        keep = [w for w in words if w not in (">/dev/null", "2>&1")]
        if not keep or keep[0] != "ddpm" or any(w.startswith(("<", ">", "|")) for w in keep):
            return self._bash(shlex.join(words))
        from typer.testing import CliRunner

        from ddpmcli.cli.app import app

        here = os.getcwd()
        os.chdir(self.cwd)
        try:
            result = CliRunner().invoke(app, keep[1:], env={"COLUMNS": COLUMNS})
        finally:
            os.chdir(here)
        self.status = result.exit_code
        return result.stderr if ">/dev/null" in words else result.output

    def _bash(self, line: str) -> str:
        env = {**os.environ, "COLUMNS": COLUMNS}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        done = subprocess.run(
            ["bash", "-c", line], cwd=self.cwd, env=env, capture_output=True, text=True,
            timeout=300, check=False,
        )  # fmt: skip
        self.status = done.returncode
        return done.stdout + done.stderr


def _segments(words: list[str]) -> Iterator[list[str] | None]:
    """``words`` split at ``;`` (shlex keeps ``cmd;`` as one word ending in ';'); None for shell
    syntax the in-process runner does not do (pipes, &&, globs, variables other than $?)."""
    current: list[str] = []
    for word in words:
        if word in ("|", "&&", "||", "&") or ("$" in word and word != "$?") or "*" in word:
            yield None
            return
        if word.endswith(";"):
            if word[:-1]:
                current.append(word[:-1])
            yield current
            current = []
        else:
            current.append(word)
    if current:
        yield current


# ---------------------------------------------------------------------------------------------
# the tests

BLOCKS = parse_blocks(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Shell, dict[str, str]]:
    """One folder for every block, with what the README's producer commands wrote (its main
    job's checkpoint), each run once; their output by command line."""
    shell = Shell(tmp_path_factory.mktemp("readme"))
    produced: dict[str, str] = {}
    for block in BLOCKS:
        for command in block.commands:
            if PRODUCER.match(command.line) and command.line not in produced:
                produced[command.line] = shell.run(command.line)
                assert shell.status == 0, produced[command.line]
    return shell, produced


def test_the_readme_has_console_examples() -> None:
    assert len(BLOCKS) >= 8
    assert all(block.skip is None or block.skip.strip() for block in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_console_block_is_what_the_command_prints(
    block: Block, workdir: tuple[Shell, dict[str, str]]
) -> None:
    if block.skip is not None:
        pytest.skip(f"README marks it: {block.skip}")
    shell, produced = workdir
    for command in block.commands:
        output = produced.get(command.line)
        if output is None:
            output = shell.run(command.line)
        actual = _normalise(output.splitlines())
        expected = _normalise(command.expected)
        assert matches(expected, actual), (
            f"README.md line {block.line}: `$ {command.line}` printed\n"
            + "\n".join(actual)
            + "\n\nbut the README shows\n"
            + "\n".join(expected)
            + "\n\n(re-run the command and paste its output; mark volatile values in "
            "tests/test_readme.py's VOLATILE)"
        )


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_what_the_examples_wrote_is_ignored_by_git(workdir: tuple[Shell, dict[str, str]]) -> None:
    """Run in a clone's root, the README's examples leave `git status` clean: everything they
    wrote (here, in the blocks' folder, after the tests above ran them) is ignored there."""
    shell, _ = workdir
    written = sorted(str(p.relative_to(shell.cwd)) for p in shell.cwd.rglob("*") if p.is_file())
    assert written, "the examples wrote nothing (the main job's checkpoint at least)"
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True,
        text=True, check=False,
    )  # fmt: skip
    assert sorted(done.stdout.split()) == written, "add what they write to .gitignore"


def test_the_matcher_is_strict() -> None:
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert matches(["a", "...", "b"], ["a", "b"])
    assert not matches(["a", "...", "d"], ["a", "b", "c"])
    assert not matches(["a"], ["a", "b"])  # nothing extra
    assert not matches(["0.1354"], ["0.1355"])  # numbers to the digit
    assert _normalise(["1      # zero terminal SNR", "wrote x (2 steps in 31.6 s)"]) == [
        "1",
        "wrote x (2 steps in <seconds> s)",
    ]
    blocks = parse_blocks(
        "```console\n$ ddpm a \\\n  --b\nout\n$ echo $?\n0\n```\n"
        "<!-- readme-test: skip needs a GPU -->\n```console\n$ ddpm c\n```\n"
        "```console\nplain output\n```\n"
    )
    assert [[c.line for c in b.commands] for b in blocks] == [["ddpm a --b", "echo $?"], ["ddpm c"]]
    assert blocks[0].commands[0].expected == ["out"] and blocks[1].skip == "needs a GPU"


# ---------------------------------------------------------------------------------------------
# the kinds table


def kinds_rows() -> list[dict[str, str]]:
    from typer.testing import CliRunner

    from ddpmcli.cli.app import app

    result = CliRunner().invoke(app, ["schedule", "--list-kinds", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows: list[dict[str, str]] = json.loads(result.stdout)
    return rows


def kinds_markdown(rows: list[dict[str, str]]) -> list[str]:
    """The README's kinds table, one line per `--list-kinds` row, each field as printed."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"`{row[columns[0]]}`"] + [(row[c] or "").replace("|", "\\|") for c in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def readme_kinds_table(text: str) -> list[str]:
    after = text.split("`ddpm schedule --list-kinds` prints this table", 1)[1]
    lines = after.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_the_kinds_table_is_what_list_kinds_prints() -> None:
    table = readme_kinds_table(README.read_text(encoding="utf-8"))
    assert table == kinds_markdown(kinds_rows()), (
        "README's kinds table differs from `ddpm schedule --list-kinds`; paste the output of "
        "`python tests/test_readme.py --kinds-table`"
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--kinds-table"]:
        print("\n".join(kinds_markdown(kinds_rows())))
