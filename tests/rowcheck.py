"""Row comparison for tests: numbers within a tolerance, everything else (labels, None) exactly.

pytest >= 9.2's ``approx`` refuses a mapping that holds strings, and result rows hold both."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def assert_row_close(
    got: Mapping[str, Any], want: Mapping[str, Any], *, rel: float, abs: float = 0.0
) -> None:  # noqa: A002 - as pytest.approx names it
    assert list(got) == list(want), (list(got), list(want))
    for key, w in want.items():
        g = got[key]
        if _number(g) and _number(w):
            same = (math.isnan(g) and math.isnan(w)) or math.isclose(g, w, rel_tol=rel, abs_tol=abs)
            assert same, f"{key}: {g!r} != {w!r} (rel {rel}, abs {abs})"
        else:
            assert g == w, f"{key}: {g!r} != {w!r}"


def as_json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Result rows as the JSON format writes them: a non-finite float is null there (a last step's
    log-SNR gap onto clean data is inf in the API's rows)."""
    return [
        {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        for row in rows
    ]


def json_rows(result: Any) -> list[dict[str, Any]]:
    """The rows a successful ``--format json`` CLI run printed (its stderr shown if it failed)."""
    assert result.exit_code == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows
