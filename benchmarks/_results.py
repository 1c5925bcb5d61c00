"""Where a benchmark writes its figures (issue 20: running a benchmark leaves `git status` clean).

A plain run writes `benchmarks/out/NAME` (ignored by git). `--record` writes the tracked
`benchmarks/results/NAME`, the figures the README quotes: do that on purpose, on a quiet
machine, and commit it with the README's numbers. `--out PATH` picks any other file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORDED = HERE / "results"  # tracked: the figures the README quotes
SCRATCH = HERE / "out"  # ignored: what a plain run writes


def add_output_options(parser: argparse.ArgumentParser, name: str) -> None:
    """`--out PATH` and `--record` on a benchmark's parser (``name``: its results file)."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"where to write the figures (default: benchmarks/out/{name}, ignored by git)",
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help=f"write the tracked benchmarks/results/{name} (the figures the README quotes)",
    )


def output_path(args: argparse.Namespace, name: str) -> Path:
    """The results file of this run: --out, else benchmarks/results/NAME with --record, else
    benchmarks/out/NAME; its folder is created."""
    path: Path = args.out if args.out is not None else (RECORDED if args.record else SCRATCH) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
