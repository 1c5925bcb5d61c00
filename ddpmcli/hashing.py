"""Counter-based 64-bit hashing: the one home of SplitMix64, which seeds the per-(seed, sample)
noise (:mod:`ddpmcli.run.noise`) and draws random class labels
(:mod:`ddpmcli.checkpoints.conditioning`). Standard library only."""

from __future__ import annotations

MASK64 = (1 << 64) - 1
"""Keep the low 64 bits of a Python int."""


def splitmix64(value: int) -> int:
    """One step of SplitMix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer."""
    z = (value + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)
