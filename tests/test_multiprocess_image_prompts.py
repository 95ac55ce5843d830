"""The image-side prompt methods killed mid-run: SIGKILL, then run.resume=auto, ends with the straight run's results
(bitwise). Their 1- vs 2-process invariance is in tests/test_multiprocess_methods.py (every method)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from fedlit.config import IMAGE_SIDE_ALGORITHMS
from fedlit.federation.checkpoint import load_checkpoint
from tests.helpers import FAST, ROOT, cache_dir, only_run_dir, read_results, train_cli
from tests.test_multiprocess import _wait_for_round

pytestmark = pytest.mark.multiprocess

ROUNDS = 12


@pytest.mark.parametrize("algorithm", IMAGE_SIDE_ALGORITHMS)
def test_sigkill_then_resume_equals_the_straight_run(tmp_path, algorithm):
    job = [*FAST, f"backbone.cache_dir={cache_dir()}", f"algorithm={algorithm}", f"fed.rounds={ROUNDS}",
           "data.num_clients=3", "fed.frac=0.67", "optim.persistent_state=true"]
    straight = train_cli(*job, f"run.out_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "train.py"), *job,
                             f"run.out_dir={tmp_path / 'cut'}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_round(tmp_path / "cut", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut = only_run_dir(tmp_path / "cut")
    assert load_checkpoint(cut / "checkpoint.pt")["server"]["round"] < ROUNDS
    resumed = train_cli(*job, f"run.out_dir={tmp_path / 'cut'}", "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((cut / "results.json").read_text()) == read_results(only_run_dir(tmp_path / "straight"))
