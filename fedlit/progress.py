"""Progress bars (tqdm, a dependency of Lightning) and console lines that do not break them.

A bar is drawn on stderr only when it is asked for (rank 0 of a run that is not ``run.quiet``) and stderr is a
terminal: redirected output (a Slurm log, a pipe, a test's captured output) never holds a bar. A disabled bar
still counts, so the code that drives it is the same either way.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it") -> tqdm:
    """A tqdm bar of ``total`` steps on stderr, shown only when ``enabled`` and stderr is a terminal; it disappears
    when closed."""
    return tqdm(total=total, desc=desc, initial=initial, unit=unit, file=sys.stderr, leave=False,
                dynamic_ncols=True, disable=not (enabled and stderr_is_terminal()))


def echo(message: str) -> None:
    """Print ``message`` on stdout above any bar that is drawn (a plain ``print`` when none is)."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()
