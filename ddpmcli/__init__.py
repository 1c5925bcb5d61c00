"""ddpm: see a DDPM noise schedule, its posterior, and what a checkpoint does at every noise
level."""

__version__ = "0.1.0"
