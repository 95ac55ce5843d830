"""The benchmark scripts run end to end on the tiny backbone (their numbers are not checked: timings are not tests)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

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


def test_step_time_tables_one_client_step_at_the_old_and_the_new_checkout():
    """The old checkout is the commit before the method-seam rebuild of #10, in a temporary worktree: its worker
    trains through ``Orchestrator.train_client``, this checkout's through ``LocalTrainer.train``."""
    old = "0a20e8c"
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{old}^{{commit}}"]).returncode != 0:
        pytest.skip(f"this checkout has no git history with {old}")
    args = ["--old", old, "--backbones", "tiny", "--steps", "2", "--repeats", "2", "--warmup", "0"]
    done = subprocess.run([sys.executable, "benchmarks/step_time.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("machine: ") and f"old: {old} " in done.stdout
    rows = {line.split()[1]: [float(v.rstrip("x")) for v in line.split()[2:]]
            for line in done.stdout.splitlines() if line.startswith("tiny ")}
    assert set(rows) == {"pfedmoap", "promptfl"}
    for wall_old, wall_new, ratio, cpu_old, cpu_new, cpu_ratio in rows.values():
        assert min(wall_old, wall_new, cpu_old, cpu_new) > 0
        assert ratio == pytest.approx(wall_new / wall_old, rel=0.02, abs=0.01)
        assert cpu_ratio == pytest.approx(cpu_new / cpu_old, rel=0.02, abs=0.01)
    # The temporary worktree is gone again.
    listed = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "fedlit-old-" not in listed


def test_expert_poisoning_prints_the_capped_poisoned_weight_per_attack_fraction():
    args = ["fed.local_epochs=1", "--rounds", "2", "--attacks", "mislead", "--defences", "cap"]
    done = subprocess.run([sys.executable, "benchmarks/expert_poisoning.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    [row] = [line.split() for line in done.stdout.splitlines() if line.startswith("cap ")]
    clean, attacked = row[1], row[2:-1]
    assert 0 <= float(clean) <= 100 and len(attacked) == 3 * 3  # "acc / weight" for 10%, 20% and 40%
    weights = [float(attacked[i + 2]) for i in range(0, 9, 3)]
    assert all(0 < w <= 3 * 10 + 1e-6 for w in weights)  # K = 3 slots, each capped at 10%


def test_image_prompts_tables_every_variant_and_the_exact_ones_agree():
    from fedlit.algorithms import ALGORITHMS

    methods = [m for m in ("vpt", "maple") if m in ALGORITHMS]
    assert "vpt" in methods
    args = ["--methods", "vpt", "maple", "--backbone", "tiny", "--start-layer", "1", "--group", "2"]
    done = subprocess.run([sys.executable, "benchmarks/image_prompts.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("machine: ") and f"torch {torch.__version__}" in done.stdout
    if "maple" not in methods:
        assert "missing methods (not in this checkout): maple" in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    header, rows = lines[0], [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c.strip() for c in header.strip("|").split("|")][-2:] == ["same accuracies as", "same"]
    table = {(r[0], r[1]): r for r in rows}
    variants = ["uncached", "cached", "cached G", "cached ckpt", "uncached L", "cached L"]
    assert list(table) == [(m, v) for m in methods for v in variants]
    for m in methods:
        # start layer, G and checkpointing as each variant names them
        assert [tuple(table[m, v][2:5]) for v in variants] == [
            ("0", "1", "off"), ("0", "1", "off"), ("0", "2", "off"), ("0", "1", "on"), ("1", "1", "off"),
            ("1", "1", "off")]
        assert table[m, "uncached"][6] == "1.00x"
        # caching the frozen tokens (from block 0 or block 1) and recomputing activations change no number
        assert [table[m, v][-2:] for v in ("cached", "cached ckpt", "cached L")] == [
            ["uncached", "yes"], ["cached", "yes"], ["uncached L", "yes"]]
        assert table[m, "cached G"][-2] == "cached" and table[m, "uncached L"][-2:] == ["", ""]


def test_privacy_audit_tables_every_variant_and_setting():
    args = ["--rounds", "1", "--variants", "promptfl", "--epsilons", "1", "--", "backbone.name=tiny",
            "data.num_clients=4", "data.shots=4", "data.train_per_class=4", "data.test_per_class=4"]
    done = subprocess.run([sys.executable, "benchmarks/privacy_audit.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 clients (pathological, heldout: 0.5 never train)" in done.stdout
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| promptfl")]
    assert [r[1] for r in rows] == ["none", "ε = 1"]
    assert rows[0][10:12] == ["n/a", "n/a"] and rows[1][10] == "1.00"  # the accountant's epsilon of the DP row
    assert all(0.0 <= float(v) <= 1.0 for r in rows for v in r[3:8])  # four sample AUCs and the client AUC
    assert all(float(v) >= 0.0 for r in rows for v in r[8:10])  # the empirical epsilon lower bounds
