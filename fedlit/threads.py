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


def apply_thread_default(processes: int) -> int | None:
    """Set torch's intra-op threads to :func:`threads_per_process` when ``OMP_NUM_THREADS`` is unset; returns the
    number set, or None when the variable decides."""
    if os.environ.get(THREAD_VARIABLE):
        return None
    import torch

    threads = threads_per_process(processes)
    torch.set_num_threads(threads)
    return threads
