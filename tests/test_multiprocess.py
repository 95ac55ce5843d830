"""Real multi-process runs (Fabric DDP over gloo on CPU) and interruption: world-size invariance, SIGKILL +
resume, SIGUSR1 stop + resume, refusal of a foreign checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fedlit.federation.checkpoint import load_checkpoint
from tests.helpers import FAST, ROOT, cache_dir, only_run_dir, read_results, train_cli

pytestmark = pytest.mark.multiprocess

LONG_ROUNDS = 16  # interrupted runs: enough rounds that the signal always lands while the run still trains

JOB = FAST + [f"backbone.cache_dir={cache_dir()}", "algorithm=pfedmoap", "data.num_clients=5", "fed.frac=0.6",
              "fed.rounds=3", "method.num_experts=3", "optim.persistent_state=true"]


def test_one_and_two_processes_give_bitwise_identical_results(tmp_path):
    for devices in (1, 2):
        done = train_cli(*JOB, f"trainer.devices={devices}", f"run.out_dir={tmp_path / str(devices)}")
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (only_run_dir(tmp_path / d) for d in ("1", "2"))
    res1, res2 = read_results(one), read_results(two)
    assert (res1["world_size"], res2["world_size"]) == (1, 2)
    assert [r["accuracy"] for r in res1["rounds"]] == [r["accuracy"] for r in res2["rounds"]]
    assert [r["loss"] for r in res1["rounds"]] == [r["loss"] for r in res2["rounds"]]
    ck1, ck2 = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(two / "checkpoint.pt")
    assert torch.equal(ck1["server"]["global_state"]["ctx"], ck2["server"]["global_state"]["ctx"])
    assert sorted(ck1["store"]) == sorted(ck2["store"])
    for cid, entry in ck1["store"].items():
        for name, value in entry["state"].items():  # prompts, private gates and momentum buffers
            assert torch.equal(value, ck2["store"][cid]["state"][name]), (cid, name)


def _start(out_dir, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, str(ROOT / "experiments" / "train.py"), *JOB, f"fed.rounds={LONG_ROUNDS}",
            f"run.out_dir={out_dir}", *extra]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_round(out_dir, target, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        found = list(out_dir.rglob("checkpoint.pt"))
        if found:
            try:
                if load_checkpoint(found[0])["server"]["round"] >= target:
                    return
            except ValueError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"round {target} not reached in {timeout} s")


def test_sigkill_mid_run_then_resume_ends_with_identical_results(tmp_path):
    reference = train_cli(*JOB, f"fed.rounds={LONG_ROUNDS}", f"run.out_dir={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    proc = _start(tmp_path / "cut")
    _wait_for_round(tmp_path / "cut", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut_dir = only_run_dir(tmp_path / "cut")
    assert load_checkpoint(cut_dir / "checkpoint.pt")["server"]["round"] < LONG_ROUNDS
    resumed = train_cli(*JOB, f"fed.rounds={LONG_ROUNDS}", f"run.out_dir={tmp_path / 'cut'}", "run.resume=auto",
                        "run.quiet=false")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after round" in resumed.stdout
    assert only_run_dir(tmp_path / "cut") == cut_dir  # continued the same directory
    assert json.loads((cut_dir / "results.json").read_text()) == read_results(only_run_dir(tmp_path / "ref"))


def test_sigusr1_stops_at_a_round_boundary_and_resume_finishes(tmp_path):
    proc = _start(tmp_path)
    _wait_for_round(tmp_path, 1, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    assert "resume with run.resume=auto" in err
    run_dir = only_run_dir(tmp_path)
    stopped_at = load_checkpoint(run_dir / "checkpoint.pt")["server"]["round"]
    assert 1 <= stopped_at < LONG_ROUNDS
    assert len(read_results(run_dir)["rounds"]) == stopped_at
    resumed = train_cli(*JOB, f"fed.rounds={LONG_ROUNDS}", f"run.out_dir={tmp_path}", "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["round"] for r in read_results(run_dir)["rounds"]] == list(range(1, LONG_ROUNDS + 1))


def test_a_checkpoint_from_another_configuration_is_refused(tmp_path):
    first = train_cli(*JOB, "fed.rounds=1", f"run.out_dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-3000:]
    other = train_cli(*JOB, "fed.rounds=1", "fed.local_epochs=2", f"run.out_dir={tmp_path}", "run.resume=auto")
    assert other.returncode == 2
    assert "different configuration" in other.stderr.strip().splitlines()[-1]
