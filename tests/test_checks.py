"""`ddpm check` leftovers of issue 8: one span notation, `t` as a JSON list, ties worded as they
are, terminal SNR above 1 an error; `schedule --list-kinds` takes no other option."""

from __future__ import annotations

import json

import pytest

from ddpmcli import core
from ddpmcli.checks import TERMINAL_SNR_ERROR, check_precision, check_terminal_snr, span_text


@pytest.mark.parametrize(
    ("ts", "most_runs", "text"),
    [
        ((), 3, ""),
        ((7,), 3, "7"),
        ((995, 996, 997, 998, 999), 3, "995-999"),
        ((1, 2, 3, 7, 9, 10), 3, "1-3,7,9-10"),
        ((1, 2, 3, 7, 9, 10, 12, 20, 21), 3, "1-3,7 and 5 more t"),
        ((1, 2, 3, 7, 9, 10, 12, 20, 21), None, "1-3,7,9-10,12,20-21"),
    ],
)
def test_span_text_one_notation(ts: tuple[int, ...], most_runs: int | None, text: str) -> None:
    assert span_text(ts, most_runs) == text


def test_check_json_t_is_a_list_of_ints(cli) -> None:
    result = cli("check", "--kind", "cosine", "--format", "json")
    assert result.exit_code == 0, result.stderr
    rows = {row["code"]: row for row in json.loads(result.stdout)}
    assert rows["nonzero_terminal_snr"]["t"] == [999]
    assert rows["float16_alpha_bar_is_1"]["t"] == [0, 1, 2, 3]
    ties = rows["float16_alpha_bar_ties"]["t"]
    assert all(type(t) is int for t in ties) and ties[:4] == [1, 2, 3, 5]
    assert len(ties) == 42
    jsonl = [
        json.loads(line)
        for line in cli("check", "-k", "cosine", "--format", "jsonl").stdout.splitlines()
    ]
    assert [r["t"] for r in jsonl] == [r["t"] for r in rows.values()]


def test_check_text_spans(cli) -> None:
    lines = cli("check", "--kind", "cosine", "--format", "tsv").stdout.splitlines()
    t = {line.split("\t")[1]: line.split("\t")[2] for line in lines[1:]}
    assert t["float16_alpha_bar_is_1"] == "0-3"
    assert t["float16_alpha_bar_ties"].startswith("1-3,5-10,12-14,16-18,")  # no ".." anywhere
    assert not any(".." in line.split("\t")[2] for line in lines[1:])


def test_ties_say_consecutive_only_for_one_run() -> None:
    spread = check_precision(core.make_schedule("cosine"), "float16")
    ties = next(f for f in spread if f.code == "float16_alpha_bar_ties")
    assert "consecutive" not in ties.message
    assert "at 42 t (each equal to the value at the t before it)" in ties.message
    # alpha_bar 1 - 1e-5 * t rounds to 1.0 in float16 at t = 0..2: one run of ties, t 0-2
    betas = [1e-5] * 3 + [0.01] * 7
    sched = core.schedule_from_betas(betas)
    found = {f.code: f for f in check_precision(sched, "float16")}
    tie = found["float16_alpha_bar_ties"]
    assert tie.t == (1, 2)
    assert "equal in float16 at the 3 consecutive t 0-2" in tie.message


def test_terminal_snr_above_one_is_an_error(cli) -> None:
    sched = core.make_schedule("linear", 10)
    (finding,) = check_terminal_snr(sched)
    assert float(sched.snr[-1]) > TERMINAL_SNR_ERROR
    assert (finding.severity, finding.code, finding.t) == ("error", "terminal_snr_above_1", (9,))
    result = cli("check", "--kind", "linear", "-T", "10", "--format", "tsv")
    assert result.exit_code == 1
    row = result.stdout.splitlines()[1].split("\t")
    assert row[:3] == ["error", "terminal_snr_above_1", "9"]
    assert row[3].startswith("terminal SNR is 9.38847 (sqrt(alpha_bar) = 0.950652), above 1: ")
    assert "farther from q(x_T) than the data is; use more timesteps (--timesteps)" in row[3]
    # T = 100: SNR 0.571, under 1 and over the leak threshold: a warning still
    fine = cli("check", "--kind", "linear", "-T", "100", "--format", "tsv")
    assert fine.exit_code == 0
    assert "warning\tnonzero_terminal_snr\t99\t" in fine.stdout


def test_list_kinds_with_other_options_is_a_usage_error(cli) -> None:
    result = cli("schedule", "--list-kinds", "-k", "cosine", "--every", "10")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: --list-kinds prints every kind and takes no other option but --format and "
        "--no-header; drop --kind, --every"
    ]
    fine = cli("schedule", "--list-kinds", "--format", "tsv", "--no-header")
    assert fine.exit_code == 0
    assert fine.stdout.splitlines()[0].startswith("linear\t")
