"""Shared settings of the federation tests: a tiny random CLIP and a small shapes partition (seconds per run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
