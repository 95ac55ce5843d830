"""Debian's ``dataset-fashion-mnist`` for the tests that read the real files.

:func:`fashion_mnist_unavailable` installs the package when its files are missing (root and apt-get only), as
:func:`tests.slurm_cluster.slurm_unavailable` installs Slurm, and otherwise says why it cannot (to skip with).
"""

from __future__ import annotations

import os

from fedlit.data.fashion_mnist import DEBIAN_FOLDER, DEBIAN_PACKAGE, FILES
from tests.helpers import apt_install


def _missing_files() -> list[str]:
    return [stem for pair in FILES.values() for stem in pair if not (DEBIAN_FOLDER / f"{stem}.gz").is_file()]


def fashion_mnist_unavailable(install_timeout: float = 300.0) -> str | None:
    """None when the Debian Fashion-MNIST files are in :data:`DEBIAN_FOLDER` (installing ``dataset-fashion-mnist``
    first if one is missing), otherwise the reason they cannot be."""
    if not _missing_files():
        return None
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"{DEBIAN_FOLDER} missing and installing {DEBIAN_PACKAGE} needs root"
    return apt_install([DEBIAN_PACKAGE], _missing_files, install_timeout)
