"""The disk client store (#15) in real processes: SIGKILL at any moment of a run with incremental checkpoints
resumes to the same results; two processes sharing the store give the memory store's numbers."""

from __future__ import annotations

import json
import signal

import pytest

from fedlit.federation.checkpoint import disk_store_of, load_checkpoint
from tests.helpers import only_run_dir, read_results, train_cli
from tests.test_multiprocess import JOB, LONG_ROUNDS, _start, _wait_for_round

pytestmark = pytest.mark.multiprocess

DISK = ["store.backend=disk", "store.shard_size=2"]


def test_sigkill_mid_run_with_the_disk_store_then_resume_ends_with_identical_results(tmp_path):
    reference = train_cli(*JOB, *DISK, f"fed.rounds={LONG_ROUNDS}", f"run.out_dir={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    proc = _start(tmp_path / "cut", *DISK)
    _wait_for_round(tmp_path / "cut", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut_dir = only_run_dir(tmp_path / "cut")
    assert load_checkpoint(cut_dir / "checkpoint.pt")["server"]["round"] < LONG_ROUNDS
    resumed = train_cli(*JOB, *DISK, f"fed.rounds={LONG_ROUNDS}", f"run.out_dir={tmp_path / 'cut'}",
                        "run.resume=auto", "run.quiet=false")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after round" in resumed.stdout
    assert json.loads((cut_dir / "results.json").read_text())["rounds"] == \
        read_results(only_run_dir(tmp_path / "ref"))["rounds"]
    tables = disk_store_of(load_checkpoint(cut_dir / "checkpoint.pt"), cut_dir / "store")
    listed = [name for table in tables for name in table.listed_files()]
    assert sorted(p.name for p in (cut_dir / "store").iterdir()) == sorted(listed)  # nothing stale left


def test_two_processes_on_the_disk_store_match_one_process_on_the_memory_store(tmp_path):
    one = train_cli(*JOB, "trainer.devices=1", f"run.out_dir={tmp_path / 'one'}")
    two = train_cli(*JOB, *DISK, "trainer.devices=2", f"run.out_dir={tmp_path / 'two'}")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    res1, res2 = read_results(only_run_dir(tmp_path / "one")), read_results(only_run_dir(tmp_path / "two"))
    assert res2["world_size"] == 2
    assert [r["accuracy"] for r in res1["rounds"]] == [r["accuracy"] for r in res2["rounds"]]
    assert [r["loss"] for r in res1["rounds"]] == [r["loss"] for r in res2["rounds"]]
