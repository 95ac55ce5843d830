"""Stop requests (SIGUSR1 from Slurm before the time limit, SIGTERM on preemption) and Slurm requeue.

This module imports nothing heavy (no torch, no lightning): entry points install :data:`STOP` on their first line,
so a signal during the seconds of start-up imports is recorded instead of killing the process.
"""

from __future__ import annotations

import os
import signal
import subprocess


class StopRequest:
    """Records SIGUSR1/SIGTERM instead of dying; the orchestrator checks ``requested`` at round boundaries."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        """Install the handlers (main thread only; elsewhere a no-op). Installing twice keeps the first
        installation, so that :meth:`uninstall` restores the handlers from before it."""
        if self.installed:
            return self
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:
            pass
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    @property
    def installed(self) -> bool:
        """Whether the handlers are in place."""
        return bool(self._previous)

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signal is not None


STOP = StopRequest()  # the process's one stop flag; the entry points install it for the whole run


def requeue_slurm_job() -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` when running under Slurm (from task 0 only; the others report True);
    True when the requeue was accepted."""
    if os.environ.get("SLURM_PROCID", "0") != "0":
        return True
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = (
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else
        os.environ.get("SLURM_JOB_ID")
    )
    if not job_id:
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    return result.returncode == 0


class Preempted(Exception):
    """Raised at a round boundary after a stop request, once the checkpoint is written."""
