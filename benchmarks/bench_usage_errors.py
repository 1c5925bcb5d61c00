"""Usage errors answer before the slow part (issue 20): each bad flag below exits 2 within 0.5 s
of process start, without importing torch or opening the checkpoint, against the baseline
`python -c "import typer"` (the least any `ddpm` command can cost).

Each case runs alternately with the baseline in fresh processes; medians of the wall times. A
case passes when it exits 2 and its median is under 0.5 s (a loaded machine slows both: the ratio
to the baseline is printed too).

Usage: python benchmarks/bench_usage_errors.py [--runs 7] [--record | --out PATH]
  -> benchmarks/out/usage_errors.json (--record: benchmarks/results/usage_errors.json)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _results import add_output_options, output_path

DDPM = [shutil.which("ddpm") or "ddpm"]
BASELINE = [sys.executable, "-c", "import typer"]
LIMIT_S = 0.5
CASES = {
    "--n 0": ["sample", "missing.pt", "--n", "0"],
    "--eta without ddim": ["sample", "missing.pt", "--eta", "0.5"],
    "--kind cosin": ["schedule", "--kind", "cosin"],
    "--trajectory-every without --plot": ["sample", "missing.pt", "--trajectory-every", "100"],
    "--plot out.jpg": ["sample", "missing.pt", "--plot", "out.jpg"],
}


def _once(cmd: list[str], cwd: str) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, check=False)
    return time.perf_counter() - start, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    add_output_options(parser, "usage_errors.json")
    args = parser.parse_args()
    out = output_path(args, "usage_errors.json")
    results = []
    with tempfile.TemporaryDirectory() as cwd:
        for name, argv in CASES.items():
            ours, base, codes = [], [], set()
            for _ in range(args.runs):
                seconds, code = _once([*DDPM, *argv], cwd)
                ours.append(seconds)
                codes.add(code)
                base.append(_once(BASELINE, cwd)[0])
            median, baseline = statistics.median(ours), statistics.median(base)
            ok = codes == {2} and median < LIMIT_S
            results.append(
                {"case": name, "argv": argv, "median_s": round(median, 4),
                 "baseline_s": round(baseline, 4), "ratio": round(median / baseline, 2),
                 "exit_codes": sorted(codes), "ok": ok}
            )  # fmt: skip
            print(
                f"{name:36} {median:6.3f} s  import typer {baseline:6.3f} s  "
                f"{median / baseline:4.2f}x  exit {sorted(codes)}  {'ok' if ok else 'SLOW'}"
            )
    out.write_text(
        json.dumps(
            {"load": os.getloadavg()[0], "limit_s": LIMIT_S, "runs": args.runs, "results": results},
            indent=2,
        )  # fmt: skip
        + "\n"
    )
    print(f"wrote {out}", file=sys.stderr)
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
