"""The benchmark scripts run end to end on the tiny backbone (their numbers are not checked: timings are not tests)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_round_time_prints_the_three_paths_with_equal_accuracies():
    done = subprocess.run([sys.executable, "benchmarks/round_time.py", "--configs", "tiny", "--rounds", "1",
                           "--group", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[1] + (" " + line.split()[2] if "G=" in line else ""): line.split()
            for line in done.stdout.splitlines() if line.startswith("tiny ")}
    assert set(rows) == {"straightforward", "optimised", "optimised G=4"}
    # Optimisations change no accuracy: the last column compares each optimised path with the straightforward one.
    assert rows["optimised"][-1] == "True" and rows["optimised G=4"][-1] == "True"
    assert "1000 simulated clients of the CIFAR-100 setting" in done.stdout


def test_text_encoder_counts_less_work_for_the_shared_prefix():
    args = ["--backbone", "tiny", "--classes", "40", "--groups", "1", "3", "--repeats", "1"]
    done = subprocess.run([sys.executable, "benchmarks/text_encoder.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    gflop = {}
    for line in done.stdout.splitlines():
        if line.startswith(("per class", "shared prefix")):
            *label, groups, _, flops, _, _ = line.split()
            gflop[" ".join(label), int(groups)] = float(flops)
    assert set(gflop) == {(p, g) for p in ("per class", "shared prefix") for g in (1, 3)}
    for g in (1, 3):  # n_ctx 16: 17 of the ~21 positions run once per prompt instead of once per class
        assert gflop["shared prefix", g] < 0.5 * gflop["per class", g]


def test_cocoop_cost_counts_batch_times_the_text_work_of_coop():
    args = ["--classes", "6", "--batch", "4", "--chunks", "0", "1", "--repeats", "1"]
    done = subprocess.run([sys.executable, "benchmarks/cocoop_cost.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {(line.split()[0], line.split()[1]): line.split() for line in done.stdout.splitlines()
            if line.startswith(("coop ", "cocoop "))}
    assert set(rows) == {("coop", "all"), ("cocoop", "all"), ("cocoop", "1")}
    assert [rows[k][2] for k in sorted(rows)] == ["24", "24", "6"]  # text sequences: B x C against C
    gflop = {k: float(v[4]) for k, v in rows.items()}
    # the image-conditioned text pass is about B times CoOp's; chunks recompute each forward once in backward
    assert 3.5 * gflop["coop", "all"] < gflop["cocoop", "all"] < gflop["cocoop", "1"]
