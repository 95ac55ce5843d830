"""What one orchestrator reports while it runs, on rank 0 only: console lines (none with ``run.quiet``), a bar over
the rounds (on a terminal, see :mod:`fedlit.progress`) and the Lightning loggers of ``run.loggers``
(:mod:`fedlit.loggers`, created on first use under ``<run_dir>/logs/``)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fedlit.config import Config
from fedlit.loggers import build_loggers, log_round, round_scalars
from fedlit.progress import echo, progress_bar


class RoundReporter:
    """Console lines, the rounds bar and the loggers of one algorithm's run into ``run_dir``."""

    def __init__(self, cfg: Config, name: str, run_dir: Path, rank: int, total_rounds: int):
        self.name = name
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.lead = rank == 0
        self.console = self.lead and not cfg.run.quiet
        self.kinds = list(cfg.run.loggers)
        self.total_rounds = total_rounds
        self._bar = None
        self._loggers: list | None = None

    def line(self, message: str) -> None:
        """Print ``message`` (above the bar) unless quiet or not rank 0."""
        if self.console:
            echo(message)

    def start(self) -> None:
        """Draw the rounds bar at 0 (before the first round: a run with no rounds to train draws none)."""
        if self._bar is None and self.total_rounds > 0:
            self._bar = progress_bar(self.total_rounds, f"{self.name} rounds", enabled=self.console, unit="round")

    def round_finished(self, r: int) -> None:
        """Move the bar to round ``r`` (a resumed run starts it at its first round); close it after the last."""
        self.start()
        if self._bar is None:
            return
        if self._bar.n == 0 and r > 1:  # resumed: the rounds done before do not count in the rate
            self._bar.initial = self._bar.n = r - 1
        self._bar.update(r - self._bar.n)
        if r >= self.total_rounds:
            self._bar.close()
            self._bar = None

    def metrics(self, r: int, row: dict, diagnostics: dict | None = None,
                accuracies: list[float | None] | None = None) -> None:
        """Send round ``r``'s metrics row (and expert attention, per-client accuracies) to the loggers."""
        if not self.lead or not self.kinds:
            return
        if self._loggers is None:
            self._loggers = build_loggers(self.kinds, self.run_dir / "logs", asdict(self.cfg), self.name)
        log_round(self._loggers, r, round_scalars(row, diagnostics), accuracies)

    def close(self) -> None:
        """Remove the bar if it is still drawn (the run stopped early, or had no round left to train)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
