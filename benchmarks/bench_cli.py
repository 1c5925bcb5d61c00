"""Start-up and schedule-command speed of the `ddpm` CLI (issue 2's speed targets).

Each command is run as a fresh process ``--runs`` times; the median wall time is reported next to
its baseline and the ratio is checked against the target:

- ``ddpm --help`` and shell completion within 1.5x of ``python -c "import typer"``;
- ``ddpm schedule --kind cosine --format csv`` within 1.2x of ``python -c "import torch"``;
- ``ddpm schedule --kind flow --param shift=3 --format csv`` the same (issue 16);
- ``-T 1000000 --every 100000`` within 1.5x of ``-T 1000`` (the core is vectorised over t).

Usage: python benchmarks/bench_cli.py [--runs 9] [--record | --out PATH]
  -> benchmarks/out/cli.json (--record: benchmarks/results/cli.json)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata

from _results import add_output_options, output_path  # noqa: E402  (benchmarks/)

DDPM = [shutil.which("ddpm") or "ddpm"]
PY = [sys.executable]


def _once(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, capture_output=True, env=env, check=False)
    return time.perf_counter() - start


def paired(
    cmd: list[str], base: list[str], runs: int, env: dict[str, str] | None = None
) -> tuple[float, float]:
    """Median wall-clock seconds of ``cmd`` and of its baseline ``base``, run alternately
    ``runs`` times each after one warm-up of both, so that a change in the machine's load is
    shared by the two rather than counted against one of them."""
    # Bytecode caching as in a default Python: a user's second run reads .pyc files, while an
    # environment with PYTHONDONTWRITEBYTECODE=1 would recompile ddpmcli on every start.
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cmd_env = {**plain, **(env or {})}
    base_env = plain
    _once(cmd, cmd_env)
    _once(base, base_env)
    ours, theirs = [], []
    for _ in range(runs):
        ours.append(_once(cmd, cmd_env))
        theirs.append(_once(base, base_env))
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    add_output_options(parser, "cli.json")
    args = parser.parse_args()
    args.out = output_path(args, "cli.json")

    complete_env = {"_DDPM_COMPLETE": "complete_bash", "COMP_WORDS": "ddpm sch", "COMP_CWORD": "1"}
    cases = [
        ("ddpm --help", DDPM + ["--help"], None, PY + ["-c", "import typer"], 1.5),
        ("shell completion", DDPM, complete_env, PY + ["-c", "import typer"], 1.5),
        (
            "ddpm schedule --kind cosine --format csv",
            DDPM + ["schedule", "--kind", "cosine", "--format", "csv"],
            None,
            PY + ["-c", "import torch"],
            1.2,
        ),
        (
            "ddpm schedule --kind flow --param shift=3 --format csv",
            DDPM + ["schedule", "--kind", "flow", "--param", "shift=3", "--format", "csv"],
            None,
            PY + ["-c", "import torch"],
            1.2,
        ),
        (
            "schedule -T 1000000 --every 100000",
            DDPM
            + [
                "schedule",
                "--kind",
                "cosine",
                "-T",
                "1000000",
                "--every",
                "100000",
                "--format",
                "csv",
            ],
            None,
            DDPM + ["schedule", "--kind", "cosine", "-T", "1000", "--format", "csv"],
            1.5,
        ),
    ]
    results = []
    load_before = os.getloadavg()[0]  # the machine's load goes with the numbers it shaped
    print(f"{'command':42} {'median s':>9} {'baseline s':>10} {'ratio':>6} {'target':>6}")
    for name, cmd, env, base_cmd, target in cases:
        t, base = paired(cmd, base_cmd, args.runs, env)
        ratio = t / base
        ok = ratio <= target
        results.append(
            {
                "command": name,
                "median_s": t,
                "baseline": " ".join(base_cmd),
                "baseline_s": base,
                "ratio": ratio,
                "target": target,
                "ok": ok,
            }
        )
        print(
            f"{name:42} {t:9.3f} {base:10.3f} {ratio:6.2f} {target:6.1f}{'' if ok else '  MISSED'}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "runs": args.runs,
                "python": sys.version.split()[0],
                "cpu_count": os.cpu_count(),
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "typer": metadata.version("typer"),
                "torch": metadata.version("torch"),
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
