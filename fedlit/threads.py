"""Intra-op threads per process: the cores this process may use divided by the processes that share them."""

from __future__ import annotations

import os

THREAD_VARIABLE = "OMP_NUM_THREADS"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a Slurm or cgroup allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def threads_per_process(processes: int, cores: int | None = None) -> int:
    """``cores // processes``, at least 1 (``cores`` defaults to :func:`available_cores`)."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, processes))


def apply_thread_default(processes: int) -> tuple[int, int] | None:
    """Set torch's intra-op threads to :func:`threads_per_process` when ``OMP_NUM_THREADS`` is unset; returns (the
    number set, torch's number before), or None when the variable decides."""
    if os.environ.get(THREAD_VARIABLE):
        return None
    import torch

    threads, before = threads_per_process(processes), torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads, before


def reduced_threads_note(threads: int, before: int, processes: int) -> str | None:
    """The one line that says a process runs fewer intra-op threads than torch would (None when it does not)."""
    if threads >= before:
        return None
    return (f"note: {threads} thread{'s' if threads != 1 else ''} per process instead of torch's {before} "
            f"({available_cores()} cores for {processes} process{'es' if processes != 1 else ''}); "
            f"set {THREAD_VARIABLE} to choose")
