"""Base-to-novel evaluation (#11): clients train on the first half of the classes; base accuracy on their own
test split over the base class names, novel accuracy on every novel test sample over the novel class names."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from fedlit.data.partition import base_classes
from fedlit.federation.experiment import build_job, run_experiment
from fedlit.metrics import base_novel_metrics, harmonic_mean
from tests.helpers import fast_config, only_run_dir


def test_base_classes_are_the_first_half_rounded_up():
    assert base_classes(10) == [0, 1, 2, 3, 4] and base_classes(7) == [0, 1, 2, 3]


def test_harmonic_means_by_hand():
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    row = base_novel_metrics([0.8, 0.6, None], [0.4, 0.2, 0.9], 0.7, 0.3)
    assert row["acc_novel_mean"] == pytest.approx(0.3)  # the client without base test samples is skipped
    assert row["acc_hm_mean"] == pytest.approx((harmonic_mean(0.8, 0.4) + harmonic_mean(0.6, 0.2)) / 2)
    assert row["hm_of_means"] == pytest.approx(harmonic_mean(0.7, 0.3))
    assert row["acc_global_hm"] == pytest.approx(harmonic_mean(0.7, 0.3))


def test_clients_hold_base_classes_only(tmp_path):
    job = build_job(fast_config(tmp_path, "eval.protocol=base2novel"))
    train, test = np.asarray(job.bundle.train.targets), np.asarray(job.bundle.test.targets)
    base = set(base_classes(job.bundle.num_classes))
    for cid in range(job.partition.num_clients):
        assert set(train[job.partition.train_indices[cid]]) <= base
        assert set(test[job.partition.test_indices[cid]]) <= base
    assert sum(len(ix) for ix in job.partition.train_indices) > 0


@pytest.mark.parametrize("algorithm", ["promptfl", "pfedmoap"])
def test_base_to_novel_run_reports_base_novel_and_hm(tmp_path, algorithm):
    cfg = fast_config(tmp_path, f"algorithm={algorithm}", "fed.rounds=2", "eval.protocol=base2novel")
    [res] = run_experiment(cfg)
    last = res["rounds"][-1]
    base, novel = last["accuracy"], last["novel"]
    assert len(base) == len(novel) == 4
    assert last["acc_mean"] == pytest.approx(np.mean(base))
    assert last["acc_novel_mean"] == pytest.approx(np.mean(novel))
    assert last["acc_hm_mean"] == pytest.approx(np.mean([harmonic_mean(b, n) for b, n in zip(base, novel)]))
    assert res["final"]["acc_novel_mean"]["last_round"] == last["acc_novel_mean"]
    rows = list(csv.DictReader((only_run_dir(tmp_path) / "metrics.csv").open()))
    assert float(rows[-1]["hm_of_means"]) == pytest.approx(last["hm_of_means"])
    if algorithm == "promptfl":  # a global prompt: base and novel accuracy of the global model too
        assert 0.0 <= last["acc_global_novel"] <= 1.0 and "acc_global_hm" in last
