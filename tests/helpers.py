"""Shared settings of the federation tests: a tiny random CLIP and a small shapes partition (seconds per run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedlit.config import Config, load_config
from fedlit.io import default_cache_dir

ROOT = Path(__file__).resolve().parents[1]

FAST = [
    "backbone.name=tiny",
    "gate.d_gate=16",
    "prompt.n_ctx=4",
    "data.num_clients=4",
    "data.shots=8",
    "data.train_per_class=8",
    "data.test_per_class=4",
    "method.num_experts=3",
    "fed.rounds=3",
    "fed.local_epochs=1",
    "run.quiet=true",
]


def fast_config(tmp_path: Path, *overrides: str) -> Config:
    """The fast configuration with ``run.out_dir`` under ``tmp_path`` and extra overrides."""
    return load_config(None, FAST + [f"run.out_dir={tmp_path}", "backbone.cache_dir=" + str(cache_dir())]
                       + list(overrides))


def cache_dir() -> Path:
    """The shared feature/backbone cache (FEDLIT_CACHE or ~/.cache/fedlit)."""
    return default_cache_dir()


def train_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``experiments/train.py`` in a subprocess; returns the completed process (stdout/stderr captured)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"), *args], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def only_run_dir(out_dir: Path, name: str = "default") -> Path:
    """The single run directory under ``out_dir/name``."""
    dirs = sorted(p for p in (Path(out_dir) / name).iterdir() if p.is_dir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_results(run_dir: Path) -> dict:
    """``results.json`` of a run directory."""
    return json.loads((Path(run_dir) / "results.json").read_text())


def apt_install(packages: Sequence[str], missing: Callable[[], list[str]],
                install_timeout: float = 300.0) -> str | None:
    """Install Debian ``packages`` with apt-get (refreshing the package lists once if the first try fails); None
    when ``missing()`` is then empty, otherwise the reason (to skip with). Needs root and apt-get."""
    what = " ".join(packages)
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing())} missing and no apt-get to install {what}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=install_timeout)
    if result.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=install_timeout)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=install_timeout)
    if result.returncode != 0 or missing():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
        return f"could not install {what} with apt-get: {tail[0]}"
    return None
