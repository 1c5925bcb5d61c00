"""Issue 20, the first hour of a new user: outputs that never clobber, errors that say what was
meant before the slow part, defaults that agree, the same numbers on every thread count."""

from __future__ import annotations

import hashlib
from pathlib import Path

TINY_TRAIN = ("train", "--data", "gmm", "--n", "64", "--steps", "2", "--batch-size", "16",
              "--width", "8", "-T", "10", "-q")  # fmt: skip


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_train_never_overwrites_a_checkpoint_without_force(cli, tmp_path: Path) -> None:
    out = tmp_path / "ckpt.pt"
    assert cli(*TINY_TRAIN, "--out", str(out)).exit_code == 0
    before = _md5(out)
    again = cli(*TINY_TRAIN, "--seed", "1", "--out", str(out))
    assert again.exit_code == 2
    assert again.stderr.splitlines() == [
        f"Error: --out {str(out)!r} already exists; pass --force to replace it, or choose "
        "another --out"
    ]
    assert _md5(out) == before
    forced = cli(*TINY_TRAIN, "--seed", "1", "--out", str(out), "--force")
    assert forced.exit_code == 0, forced.stderr
    assert _md5(out) != before
