"""Debian's ``dataset-fashion-mnist`` for the tests that read the real files.

:func:`fashion_mnist_unavailable` installs the package when its files are missing (root and apt-get only), as
:func:`tests.slurm_cluster.slurm_unavailable` installs Slurm, and otherwise says why it cannot (to skip with).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from fedlit.data.fashion_mnist import DEBIAN_FOLDER, DEBIAN_PACKAGE, FILES


def _missing_files() -> list[str]:
    return [stem for pair in FILES.values() for stem in pair if not (DEBIAN_FOLDER / f"{stem}.gz").is_file()]


def fashion_mnist_unavailable(install_timeout: float = 300.0) -> str | None:
    """None when the Debian Fashion-MNIST files are in :data:`DEBIAN_FOLDER` (installing ``dataset-fashion-mnist``
    first if one is missing), otherwise the reason they cannot be."""
    if not _missing_files():
        return None
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"{DEBIAN_FOLDER} missing and installing {DEBIAN_PACKAGE} needs root"
    if shutil.which("apt-get") is None:
        return f"{DEBIAN_FOLDER} missing and no apt-get to install {DEBIAN_PACKAGE}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", DEBIAN_PACKAGE]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=install_timeout)
    if result.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=install_timeout)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=install_timeout)
    if result.returncode != 0 or _missing_files():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
        return f"could not install {DEBIAN_PACKAGE} with apt-get: {tail[0]}"
    return None
