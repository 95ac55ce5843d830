"""Cached image features, the straightforward path, augmented views and the compare script."""

from __future__ import annotations

import json

import numpy as np
import torch

from fedlit.backbone import load_backbone
from fedlit.data.features import FeatureCache, encode_dataset
from fedlit.data.partition import Partition
from fedlit.federation.client_data import ClientData
from fedlit.federation.experiment import run_experiment
from fedlit.federation.sampling import client_generator
from tests.helpers import fast_config


class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0


def test_encode_dataset_equals_per_batch_encoding():
    backbone = load_backbone("tiny")
    images = torch.rand(10, 3, 32, 32)
    features = encode_dataset(backbone, _Images(images), batch_size=4)
    assert features.shape == (10, 64) and features.dtype == torch.float32
    torch.testing.assert_close(features, backbone.encode_image(images), atol=1e-6, rtol=0)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(10))


def test_disk_cache_computes_once(tmp_path):
    value = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(FeatureCache(tmp_path).get_or_compute("k", lambda: value), value)

    def must_not_run():
        raise AssertionError("recomputed although cached on disk")

    assert torch.equal(FeatureCache(tmp_path).get_or_compute("k", must_not_run), value)
    memory = FeatureCache(None)
    assert memory.get_or_compute("k", lambda: value) is memory.get_or_compute("k", must_not_run)


def test_straightforward_and_optimised_paths_give_identical_accuracies(tmp_path):
    common = ("algorithm=pfedmoap", "fed.rounds=2")
    [fast] = run_experiment(fast_config(tmp_path / "b", *common))
    [slow] = run_experiment(fast_config(tmp_path / "a", *common, "perf.cache_features=false",
                                        "perf.cut_text=false"))
    assert [r["accuracy"] for r in slow["rounds"]] == [r["accuracy"] for r in fast["rounds"]]
    for a, b in zip(slow["rounds"], fast["rounds"]):  # features agree to ~1e-7, so the losses nearly do
        assert abs(a["loss"] - b["loss"]) < 1e-5
    assert fast["memory_per_client_bytes"]["features_share_bytes"] > 0
    assert slow["memory_per_client_bytes"]["features_share_bytes"] == 0


def test_augmented_views_draw_one_precomputed_view_per_sample_and_epoch():
    views = torch.arange(3 * 6 * 2, dtype=torch.float32).reshape(3, 6, 2)  # (V, N, D)
    part = Partition("iid", {}, 0, 2, [np.array([0, 2, 3, 5])], [np.array([1])])
    data = ClientData(part, train_labels=torch.arange(6), test_labels=torch.zeros(6, dtype=torch.long),
                      train_features=views, batch_size=3)
    first = list(data.train_batches(0, client_generator(0, 1, 0), torch.device("cpu")))
    again = list(data.train_batches(0, client_generator(0, 1, 0), torch.device("cpu")))
    assert [len(y) for _, y in first] == [3, 1]
    for (x, y), (x2, y2) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
        for row, label in zip(x, y):  # each row is one of the three views of its own sample
            assert any(torch.equal(row, views[v, label]) for v in range(3))
    seen = torch.cat([y for _, y in first]).sort().values
    assert torch.equal(seen, torch.tensor([0, 2, 3, 5]))


def test_compare_reads_results_written_before_the_config_was_stored(tmp_path, capsys):
    from fedlit.command import main

    for seed, acc in ((0, 0.5), (1, 0.7)):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"dataset": "shapes", "algorithm": "pfedmoap", "seed": seed,
                                                    "final": {"last_round": acc, "mean_last_5": acc - 0.1}}))
    assert main(["compare", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # grouped by (dataset, algorithm) only; mean ± sample std over the two seeds
    assert "2 runs" in out and "60.00 ± 14.14" in out and "50.00 ± 14.14" in out
