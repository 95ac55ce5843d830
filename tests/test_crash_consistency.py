"""SIGKILL inside a disk-store checkpoint (#15): a process killed at chosen moments of round 3's incremental
checkpoint (before a shard or record file is renamed into place, before the main file is, right after it is)
resumes to the results of an uninterrupted run, and leaves no stale file behind once it has."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fedlit.federation.checkpoint import disk_store_of, load_checkpoint
from tests.helpers import FAST, ROOT, cache_dir, only_run_dir, read_results, train_cli

pytestmark = pytest.mark.slow

JOB = [*FAST, f"backbone.cache_dir={cache_dir()}", "algorithm=pfedmoap", "optim.persistent_state=true",
       "fed.frac=0.5", "fed.rounds=4", "store.backend=disk", "store.shard_size=2"]

# experiments/train.py with os.replace wrapped: the process kills itself (SIGKILL) right before, or right after,
# the n-th shard or record file of round 3's checkpoint is renamed into place (n = 0: the main file, checkpoint.pt,
# which round 3 renames after all of them).
KILLER = """
import os, runpy, signal, sys
from pathlib import Path

when, n = sys.argv[1], int(sys.argv[2])
renamed = []
real_replace = os.replace

def replace(src, dst):
    name = Path(dst).name
    shard = ".r000003." in name
    main = name == "checkpoint.pt" and bool(renamed)
    hit = (main and n == 0) or (shard and len(renamed) + 1 == n)
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
    if shard:
        renamed.append(name)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
sys.argv = ["experiments/train.py", *sys.argv[3:]]
runpy.run_path("experiments/train.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    done = train_cli(*JOB, f"run.out_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    return read_results(only_run_dir(out))


def listed_files(run_dir) -> list[str]:
    """The shard and record files the run's checkpoint lists."""
    tables = disk_store_of(load_checkpoint(run_dir / "checkpoint.pt"), run_dir / "store")
    return sorted(name for table in tables for name in table.listed_files())


# round 3 renames at least one shard file and one record file (two clients per round), then checkpoint.pt
@pytest.mark.parametrize("when, n", [("before", 1), ("after", 1), ("before", 2), ("before", 0), ("after", 0)])
def test_sigkill_inside_an_incremental_checkpoint_resumes_to_identical_results(tmp_path, straight, when, n):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, when, str(n), *JOB, f"run.out_dir={tmp_path}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    round_on_disk = load_checkpoint(run_dir / "checkpoint.pt")["server"]["round"]
    main_renamed = when == "after" and n == 0
    assert round_on_disk == (3 if main_renamed else 2)  # whatever was renamed, the main file decides the round
    on_disk = {p.name for p in (run_dir / "store").iterdir()}
    stale = on_disk - set(listed_files(run_dir))
    assert stale  # the kill left files the checkpoint does not list: a temporary, a new or an old version
    if when == "before" and n > 0:
        assert any(name.endswith(".tmp") for name in stale)
    resumed = train_cli(*JOB, f"run.out_dir={tmp_path}", "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_results(run_dir)["rounds"] == straight["rounds"]
    assert sorted(p.name for p in (run_dir / "store").iterdir()) == listed_files(run_dir)  # nothing stale left
