"""The synchronous mode on 1 and 2 gloo processes (Fabric DDP on CPU): DP-FPL with central DP and client sampling
gives bitwise identical results and checkpoints, and a run resumed at a round boundary on 2 processes ends as a
straight one."""

from __future__ import annotations

import pytest
import torch

from fedlit.federation.checkpoint import load_checkpoint
from tests.helpers import FAST, cache_dir, only_run_dir, read_results, train_cli

pytestmark = pytest.mark.multiprocess

JOB = [*FAST, f"backbone.cache_dir={cache_dir()}", "algorithm=dpfpl", "data.num_clients=5", "fed.frac=0.6",
       "fed.rounds=2", "fed.local_epochs=2", "data.batch_size=16", "privacy.clip=0.5",
       "privacy.noise_multiplier=0.8", "optim.persistent_state=true"]


def test_synchronous_rounds_are_bitwise_identical_on_one_and_two_processes(tmp_path):
    for devices in (1, 2):
        done = train_cli(*JOB, f"trainer.devices={devices}", f"run.out_dir={tmp_path / str(devices)}")
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (only_run_dir(tmp_path / d) for d in ("1", "2"))
    res1, res2 = read_results(one), read_results(two)
    assert (res1["world_size"], res2["world_size"]) == (1, 2)
    assert res1["rounds"] == res2["rounds"]  # accuracies, losses and epsilon
    assert all(r["epsilon"] > 0 for r in res1["rounds"])
    ck1, ck2 = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(two / "checkpoint.pt")
    assert torch.equal(ck1["server"]["global_state"]["ctx"], ck2["server"]["global_state"]["ctx"])
    assert sorted(ck1["store"]) == sorted(ck2["store"])
    for cid, entry in ck1["store"].items():
        for name, value in entry["state"].items():  # global copy, local prompt, momentum
            assert torch.equal(value, ck2["store"][cid]["state"][name]), (cid, name)


def test_synchronous_run_resumed_on_two_processes_ends_as_a_straight_one(tmp_path):
    straight = train_cli(*JOB, "trainer.devices=2", f"run.out_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = train_cli(*JOB, "trainer.devices=2", "fed.rounds=1", f"run.out_dir={tmp_path / 'resumed'}")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train_cli(*JOB, "trainer.devices=1", f"run.out_dir={tmp_path / 'resumed'}", "run.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = only_run_dir(tmp_path / "straight"), only_run_dir(tmp_path / "resumed")
    assert read_results(a)["rounds"] == read_results(b)["rounds"]
    ck1, ck2 = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert torch.equal(ck1["server"]["global_state"]["ctx"], ck2["server"]["global_state"]["ctx"])
