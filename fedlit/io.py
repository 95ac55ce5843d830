"""Files that are never half-written: every output of fedlit goes through :func:`atomic_write`."""

from __future__ import annotations

import fcntl
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


class FileLock:
    """An exclusive ``flock`` on the file ``path``, created when acquired and removed when released, so that nothing
    stale is left behind. The kernel drops the lock when its holder dies (even by SIGKILL); the file then stays
    until the next holder releases it. A process that locked a file another one had removed meanwhile finds that
    the path names another file (or none) and tries again, so two holders never coexist."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: IO | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock (waiting for it when ``blocking``); False when it is held elsewhere and not ``blocking``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = self.path.open("a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                f.close()
                return False
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._file = f
                return True
            f.close()  # the previous holder removed this file after we opened it: lock the current one

    def holder(self) -> str:
        """What the current holder wrote into the file (empty when nothing)."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def write_holder(self, text: str) -> None:
        """Replace the file's content by ``text`` (who holds the lock); only while holding it."""
        assert self._file is not None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(text)
        self._file.flush()

    def release(self) -> None:
        """Remove the file, then drop the lock (removing first: a waiter that then locks the old file sees that the
        path no longer names it)."""
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


DEFAULT_CACHE_DIR = "~/.cache/fedlit"


def default_cache_dir() -> Path:
    """Where fedlit keeps built backbones and cached features: ``$FEDLIT_CACHE`` if set, else ``~/.cache/fedlit``
    (user-expanded)."""
    return Path(os.environ.get("FEDLIT_CACHE") or DEFAULT_CACHE_DIR).expanduser()
