"""Files that are never half-written: every output of fedlit goes through :func:`atomic_write`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[IO], None] | str | bytes, binary: bool | None = None) -> None:
    """Write ``path`` through a temporary file in the same directory, fsync it and rename it into place.

    ``write`` is the content (``str`` or ``bytes``) or a function that writes to the open file (e.g.
    ``lambda f: torch.save(obj, f)``; then the file is binary unless ``binary=False``). A crash or an exception
    leaves the previous file untouched and no temporary file behind (except after SIGKILL: see
    :func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if binary is None:
        binary = not isinstance(write, str)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            if callable(write):
                write(f)
            else:
                f.write(write)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``directory`` when its process was killed; returns
    them. Call it only while no other process writes there (e.g. under the run-directory lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


DEFAULT_CACHE_DIR = "~/.cache/fedlit"


def default_cache_dir() -> Path:
    """Where fedlit keeps built backbones and cached features: ``$FEDLIT_CACHE`` if set, else ``~/.cache/fedlit``
    (user-expanded)."""
    return Path(os.environ.get("FEDLIT_CACHE") or DEFAULT_CACHE_DIR).expanduser()
