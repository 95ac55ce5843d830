"""Every method on 1 and 2 gloo processes (Fabric DDP on CPU): bitwise identical results and checkpoints, and a
resumed run equal to a straight one. The original five methods' invariance tests are tests/test_multiprocess.py."""

from __future__ import annotations

import pytest
import torch

from fedlit.federation.checkpoint import load_checkpoint
from tests.helpers import FAST, cache_dir, only_run_dir, read_results, train_cli

pytestmark = pytest.mark.multiprocess

JOB = [*FAST, f"backbone.cache_dir={cache_dir()}", "algorithm=all", "data.num_clients=5", "fed.frac=0.6",
       "fed.rounds=2", "method.num_experts=3", "eval.diagnostics=true"]


def test_every_method_is_bitwise_identical_on_one_and_two_processes(tmp_path):
    for devices in (1, 2):
        done = train_cli(*JOB, f"trainer.devices={devices}", f"run.out_dir={tmp_path / str(devices)}", timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (only_run_dir(tmp_path / d) for d in ("1", "2"))
    methods = sorted(p.name for p in one.iterdir() if p.is_dir())
    assert len(methods) >= 11 and methods == sorted(p.name for p in two.iterdir() if p.is_dir())
    for name in methods:
        res1, res2 = read_results(one / name), read_results(two / name)
        assert [r["accuracy"] for r in res1["rounds"]] == [r["accuracy"] for r in res2["rounds"]], name
        assert [r["loss"] for r in res1["rounds"]] == [r["loss"] for r in res2["rounds"]], name
        assert [r.get("diagnostics") for r in res1["rounds"]] == [r.get("diagnostics") for r in res2["rounds"]]
        ck1, ck2 = load_checkpoint(one / name / "checkpoint.pt"), load_checkpoint(two / name / "checkpoint.pt")
        for key, value in ck1["server"]["global_state"].items():
            assert torch.equal(value, ck2["server"]["global_state"][key]), (name, key)
        for cid, entry in ck1["store"].items():
            for key, value in entry["state"].items():
                assert torch.equal(value, ck2["store"][cid]["state"][key]), (name, cid, key)


def test_every_method_resumes_to_the_straight_results(tmp_path):
    straight = train_cli(*JOB, f"run.out_dir={tmp_path / 'straight'}", timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = train_cli(*JOB, "fed.rounds=1", f"run.out_dir={tmp_path / 'resumed'}", timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train_cli(*JOB, f"run.out_dir={tmp_path / 'resumed'}", "run.resume=auto", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = only_run_dir(tmp_path / "straight"), only_run_dir(tmp_path / "resumed")
    for method in sorted(p.name for p in a.iterdir() if p.is_dir()):
        assert read_results(a / method) == read_results(b / method), method
