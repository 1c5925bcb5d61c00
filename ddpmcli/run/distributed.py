"""Runs over several processes (torchrun): which rank this is, its device and share of the work,
and the few collectives the loops need. In one process every helper is a no-op.

A launcher (``torchrun``, ``python -m torch.distributed.run``, ``srun torchrun``) sets
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (plus the rendezvous address);
:func:`current` reads them once. ``torch.distributed`` is imported only when ``WORLD_SIZE > 1``,
so a single-process run pays nothing for it.

How the loops split work: the samples (rows of the data, or samples to draw) are cut into
``world`` contiguous ranges, rank ``r`` taking ``share(n)``; every random number is a function of
``(seed, sample index[, t])`` (:mod:`ddpmcli.run.noise`), or drawn for all samples and sliced, so
a rank computing samples ``[a, b)`` sees exactly the single-process noise. Each rank fills its part
of zero-initialised sums or per-sample buffers and :meth:`Ranks.sum` adds them up, so rank count
changes a number only by the float rounding of that sum.

Failures: a rank whose work raised calls :meth:`Ranks.settle` with the exception instead of
raising; every rank calls it at the same point, learns who failed, and raises the same
:class:`RankFailure` naming the rank, so no rank waits forever in a later collective.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ddpmcli.errors import DdpmError, UsageError
from ddpmcli.run.events import RunError

__all__ = ["RankFailure", "Ranks", "after_failure", "current", "env_int", "shares"]


class RankFailure(RunError):
    """One or more ranks of a distributed run failed; the message names the first of them."""


def env_int(name: str, default: int, environ: dict[str, str] | None = None) -> int:
    """An integer environment variable (a launcher's), or ``default`` when unset."""
    env = os.environ if environ is None else environ
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"environment variable {name}={text!r} is not an integer") from None


def shares(total: int, world: int) -> list[tuple[int, int]]:
    """``world`` contiguous ranges covering ``0 .. total``, sizes differing by at most one (the
    first ``total % world`` ranges one longer)."""
    base, extra = divmod(total, world)
    out, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


@dataclass
class Ranks:
    """This process's place in a run: ``rank`` of ``world`` (``local_rank`` of ``local_world``
    on its machine). ``Ranks()`` is the single process: every collective returns its input."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    _group: bool = field(default=False, repr=False)

    @property
    def active(self) -> bool:
        """Whether there is more than one process."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, writes files and shows progress."""
        return self.rank == 0

    def share(self, total: int) -> tuple[int, int]:
        """This rank's ``[start, stop)`` of ``total`` items (see :func:`shares`)."""
        return shares(total, self.world)[self.rank]

    def device(self, device: torch.device) -> torch.device:
        """The device this rank runs on: ``cuda:LOCAL_RANK`` when ``device`` is CUDA and several
        processes share the machine, else ``device`` itself."""
        if self.active and device.type == "cuda" and device.index is None:
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise DdpmError(
                    f"rank {self.rank}: LOCAL_RANK {self.local_rank} but only {count} CUDA "
                    "device(s) on this machine; use --nproc-per-node at most the GPU count"
                )
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def progress(self, done: int, total: int) -> int:
        """Rank 0's estimate of every rank's work done, from its own ``done`` (the ranks run the
        same work at the same pace; reading the others' counts would cost a collective)."""
        return min(total, done * self.world)

    def sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks, in place (on its own device; float64 stays float64)."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable; CPU tensors), in rank order."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def settle(self, failure: BaseException | None) -> None:
        """Every rank calls this at the same point: raise a :class:`RankFailure` on every rank
        when any rank's work failed (``failure`` not None), naming the first failing rank and its
        error; return when none did. In one process the failure is re-raised as it is."""
        if not self.active:
            if failure is not None:
                raise failure
            return
        message = None if failure is None else _message(failure)
        reports: Sequence[str | None] = self.gather(message)
        failed = [(r, m) for r, m in enumerate(reports) if m is not None]
        if not failed:
            return
        rank, text = failed[0]
        more = f" ({len(failed) - 1} other rank(s) failed too)" if len(failed) > 1 else ""
        error = RankFailure(f"rank {rank}: {text}{more}")
        if failure is not None:
            raise error from failure
        raise error

    def close(self) -> None:
        """Leave the process group (at the end of a command)."""
        if self._group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._group = False


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, DdpmError) else f"{type(exc).__name__}: {text}"


_CURRENT: Ranks | None = None
RANK_GRACE_SECONDS = 10.0
"""How long a rank other than 0 waits, after a failure, for rank 0 to report it and exit."""


def current(environ: dict[str, str] | None = None) -> Ranks:
    """This process's :class:`Ranks`, from the launcher's environment; the process group is
    joined on the first call when ``WORLD_SIZE > 1`` (gloo for CPU tensors, NCCL for CUDA
    tensors when CUDA is present). Ranks other than 0 send stdout and stderr to the null device
    (``DDPM_DEBUG=1`` keeps their stderr), so only rank 0 prints rows, notes and errors."""
    global _CURRENT
    if _CURRENT is not None and environ is None:
        return _CURRENT
    world = env_int("WORLD_SIZE", 1, environ)
    if world < 1:
        raise UsageError(f"environment variable WORLD_SIZE={world}: must be at least 1")
    rank = env_int("RANK", 0, environ)
    local_rank = env_int("LOCAL_RANK", rank, environ)
    local_world = env_int("LOCAL_WORLD_SIZE", world, environ)
    if not 0 <= rank < world:
        raise UsageError(f"environment variable RANK={rank}: must lie in 0..{world - 1}")
    ranks = Ranks(rank, world, local_rank, max(1, local_world))
    if environ is None:
        if ranks.active:
            _join(ranks)
        _CURRENT = ranks
    return ranks


def _join(ranks: Ranks) -> None:
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        minutes = env_int("DDPM_DIST_TIMEOUT_MIN", 30)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
    ranks._group = True
    atexit.register(ranks.close)  # a group left open aborts the interpreter at exit
    if not ranks.is_main:
        debug = os.environ.get("DDPM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
        sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        sys.stdout = sink
        if not debug:
            sys.stderr = sink


def after_failure() -> None:
    """Called by the CLI's error boundary after a failure: a rank other than 0 waits (up to
    :data:`RANK_GRACE_SECONDS`) so that rank 0 prints the one error line and exits first; the
    launcher then stops this rank. Exiting at once could get rank 0 stopped before it printed."""
    if _CURRENT is not None and _CURRENT.active and not _CURRENT.is_main:
        time.sleep(RANK_GRACE_SECONDS)


def reset() -> None:
    """Forget the cached :class:`Ranks` (tests)."""
    global _CURRENT
    _CURRENT = None
