from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedlit.config import DataConfig
from fedlit.data.base import DatasetBundle, LabeledImages
from fedlit.data.partition import (
    Partition,
    load_manifest,
    make_partition,
    partition_dirichlet,
    partition_domain,
    partition_iid,
    partition_pathological,
    save_manifest,
)
from fedlit.errors import UserError


def labels(num_classes: int, per_class: int) -> np.ndarray:
    """Class-sorted labels ``[0]*per_class + [1]*per_class + ...`` (int64)."""
    return np.repeat(np.arange(num_classes, dtype=np.int64), per_class)


def shuffled_labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(labels(num_classes, per_class))


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    """The parts are sorted int64, pairwise disjoint, and their union is exactly range(n)."""
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


# ------------------------------------------------------------------------------------------------ iid


def test_iid_is_a_near_equal_disjoint_cover():
    train, test = shuffled_labels(5, 41, 0), shuffled_labels(5, 9, 1)  # 205 train, 45 test
    part = partition_iid(train, test, num_clients=4, seed=0)
    assert_disjoint_cover(part.train_indices, 205)
    assert_disjoint_cover(part.test_indices, 45)
    assert sorted(part.train_sizes()) == [51, 51, 51, 52]
    assert sorted(part.test_sizes()) == [11, 11, 11, 12]
    assert part.num_clients == 4 and part.num_classes == 5 and part.client_domains is None


def test_iid_rejects_more_clients_than_samples():
    with pytest.raises(ValueError, match="lower data.num_clients"):
        partition_iid(labels(2, 3), labels(2, 1), num_clients=3, seed=0)


# ------------------------------------------------------------------------------------------ dirichlet


def test_dirichlet_cover_min_size_and_same_proportions():
    # equal per-class train and test counts: the same proportions must give identical histograms
    train, test = shuffled_labels(10, 60, 0), shuffled_labels(10, 60, 1)
    part = partition_dirichlet(train, test, num_clients=8, alpha=0.5, seed=3, min_size=10)
    assert_disjoint_cover(part.train_indices, 600)
    assert_disjoint_cover(part.test_indices, 600)
    assert min(part.train_sizes()) >= 10 and min(part.test_sizes()) >= 10
    hist = part.label_histograms(train, test)
    assert hist["train"].shape == (8, 10)
    assert np.array_equal(hist["train"], hist["test"])
    assert hist["train"].sum(axis=0).tolist() == [60] * 10
    assert part.params == {"num_clients": 8, "alpha": 0.5, "min_size": 10}


def test_dirichlet_test_split_follows_train_proportions():
    # test has half as many samples per class: each cell is within floor-rounding of train / 2
    train, test = labels(6, 80), labels(6, 40)
    part = partition_dirichlet(train, test, num_clients=5, alpha=1.0, seed=0, min_size=5)
    hist = part.label_histograms(train, test)
    assert np.abs(hist["test"] - hist["train"] / 2).max() < 1.5
    assert hist["test"].sum() == 240


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_cap_stops_clients_at_total_over_n(seed):
    # classes are dealt in label order; a client holding >= total/N train samples before class c
    # must get nothing of class c (train and test)
    train, test = labels(20, 50), labels(20, 20)
    num_clients = 5
    part = partition_dirichlet(train, test, num_clients, alpha=0.1, seed=seed, min_size=1)
    hist = part.label_histograms(train, test)
    cap = len(train) / num_clients
    held_before = np.cumsum(hist["train"], axis=1) - hist["train"]  # (N, C) train held before class c
    capped = held_before >= cap
    assert capped.any()  # the scenario does exercise the cap
    assert np.all(hist["train"][capped] == 0)
    assert np.all(hist["test"][capped] == 0)
    assert max(part.train_sizes()) < cap + 50  # at most one class beyond the cap


def test_dirichlet_raises_when_min_size_is_unreachable():
    train, test = labels(10, 30), labels(10, 30)
    with pytest.raises(ValueError, match=r"in 3 draws; lower data.num_clients or data.min_size, or raise"):
        partition_dirichlet(train, test, num_clients=10, alpha=0.01, seed=0, min_size=25, max_tries=3)
    with pytest.raises(ValueError, match="cannot give 10 clients >= 40"):  # impossible on counts alone
        partition_dirichlet(train, test, num_clients=10, alpha=0.5, seed=0, min_size=40)


@pytest.mark.parametrize("min_size", [0, -3])
def test_dirichlet_and_domain_refuse_a_min_size_that_allows_empty_clients(min_size):
    train, test = labels(10, 30), labels(10, 30)
    with pytest.raises(UserError, match=f"data.min_size={min_size} would allow a client with no train sample"):
        partition_dirichlet(train, test, num_clients=10, alpha=0.5, seed=0, min_size=min_size)
    d_train, d_test, d_train_dom, d_test_dom = domain_data()
    with pytest.raises(UserError, match="set data.min_size >= 1"):
        partition_domain(d_train, d_test, d_train_dom, d_test_dom, num_clients=6, min_size=min_size)


def test_dirichlet_with_min_size_one_gives_every_client_a_train_sample():
    # alpha = 0.05 puts nearly all of a class on one client: some draws leave a client empty (1 first draw in
    # these 10 seeds) and are redrawn
    train, test = labels(10, 30), labels(10, 30)
    smallest = []
    for seed in range(10):
        part = partition_dirichlet(train, test, num_clients=10, alpha=0.05, seed=seed, min_size=1)
        assert_disjoint_cover(part.train_indices, 300)
        smallest.append(min(part.train_sizes()))
        assert min(part.test_sizes()) >= 1
    assert min(smallest) >= 1
    assert min(smallest) < 10  # the skew is real: some client is down to a handful of samples


# --------------------------------------------------------------------------------------- pathological


def owned_classes(part: Partition, train: np.ndarray) -> list[list[int]]:
    return [sorted(set(train[idx].tolist())) for idx in part.train_indices]


@pytest.mark.parametrize(
    ("num_classes", "num_clients", "sizes"),
    [
        (10, 3, [3, 3, 4]),  # k = round(3.33) = 3, last gets 10 - 6 = 4
        (37, 10, [4] * 9 + [1]),  # k = round(3.7) = 4, last gets 37 - 36 = 1
        (10, 4, [2, 2, 2, 4]),  # k = round(2.5) = 2 (halves round to even), last gets 4
        (10, 1, [10]),
    ],
)
def test_pathological_classes_per_client_and_remainder(num_classes, num_clients, sizes):
    train, test = shuffled_labels(num_classes, 20, 0), shuffled_labels(num_classes, 7, 1)
    part = partition_pathological(train, test, num_clients, seed=0, shots=5)
    owned = owned_classes(part, train)
    assert [len(c) for c in owned] == sizes
    assert sorted(c for cls in owned for c in cls) == list(range(num_classes))  # disjoint, all owned
    train_hist = part.label_histograms(train, test)["train"]
    test_hist = part.label_histograms(train, test)["test"]
    for i, cls in enumerate(owned):
        assert train_hist[i, cls].tolist() == [5] * len(cls)  # exactly `shots` per owned class
        assert test_hist[i, cls].tolist() == [7] * len(cls)  # all test samples of the owned classes
        expected_test = np.flatnonzero(np.isin(test, cls))
        assert np.array_equal(part.test_indices[i], expected_test)
    assert train_hist.sum() == 5 * num_classes and test_hist.sum() == len(test)


@pytest.mark.parametrize(("num_classes", "num_clients"), [(15, 10), (4, 10), (9, 10)])
def test_pathological_rejects_a_client_without_class(num_classes, num_clients):
    with pytest.raises(ValueError, match="leaves a client without a class; lower data.num_clients"):
        partition_pathological(labels(num_classes, 4), labels(num_classes, 2), num_clients, seed=0, shots=2)


def test_pathological_shuffles_classes_and_keeps_owners_when_shots_change():
    train, test = labels(12, 10), labels(12, 3)
    by_seed = [owned_classes(partition_pathological(train, test, 4, s, shots=2), train) for s in range(4)]
    assert any(o != [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]] for o in by_seed)
    assert len({str(o) for o in by_seed}) > 1
    few = partition_pathological(train, test, 4, seed=1, shots=2)
    more = partition_pathological(train, test, 4, seed=1, shots=8)
    assert owned_classes(few, train) == owned_classes(more, train)
    assert few.train_sizes() == [6, 6, 6, 6] and more.train_sizes() == [24, 24, 24, 24]


def test_pathological_all_shots():
    train, test = labels(6, 11), labels(6, 2)
    part = partition_pathological(train, test, 3, seed=0, shots=None)
    assert_disjoint_cover(part.train_indices, 66)
    assert_disjoint_cover(part.test_indices, 12)
    assert part.params == {"num_clients": 3, "shots": None}


def test_pathological_too_few_images_for_shots():
    train = np.concatenate([labels(3, 20), np.full(5, 3)])  # class 3 has 5 train images
    test = labels(4, 2)
    msg = "data.shots=16 but class 'dog' (id 3) has only 5 train images"
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        partition_pathological(train, test, 2, seed=0, shots=16, classnames=["a", "b", "c", "dog"])
    with pytest.raises(ValueError, match="data.shots=16 but class id 3 has only 5 train images"):
        partition_pathological(train, test, 2, seed=0, shots=16)


def test_pathological_refuses_a_client_whose_classes_have_no_train_image():
    # 4 classes over 2 clients (2 each), only class 0 has train images: the client without class 0 gets nothing
    train, test = labels(1, 10), labels(4, 2)
    with pytest.raises(UserError, match=r"pathological split: client [01] owns only classes without train images "
                                        r"\((b|c|d), (b|c|d)\)"):
        partition_pathological(train, test, 2, seed=0, shots=None, num_classes=4, classnames=["a", "b", "c", "d"])


# --------------------------------------------------------------------------------------------- domain


def domain_data(num_domains: int = 3, num_classes: int = 5):
    """Per domain d and class c: 30 train and 12 test samples, shuffled."""
    rng = np.random.default_rng(7)
    tr_lab, tr_dom = np.meshgrid(np.arange(num_classes), np.arange(num_domains))
    train_labels, train_domains = np.repeat(tr_lab.ravel(), 30), np.repeat(tr_dom.ravel(), 30)
    test_labels, test_domains = np.repeat(tr_lab.ravel(), 12), np.repeat(tr_dom.ravel(), 12)
    p, q = rng.permutation(len(train_labels)), rng.permutation(len(test_labels))
    return train_labels[p], test_labels[q], train_domains[p], test_domains[q]


def test_domain_clients_hold_only_their_domain():
    train, test, train_dom, test_dom = domain_data()
    part = partition_domain(train, test, train_dom, test_dom, num_clients=6, alpha=0.3, seed=0, min_size=10)
    assert part.client_domains == [0, 0, 1, 1, 2, 2]
    assert_disjoint_cover(part.train_indices, len(train))
    assert_disjoint_cover(part.test_indices, len(test))
    for i, d in enumerate(part.client_domains):
        assert np.all(train_dom[part.train_indices[i]] == d)
        assert np.all(test_dom[part.test_indices[i]] == d)
    for d in range(3):  # the two clients of a domain share all of that domain's samples
        mine = [i for i, cd in enumerate(part.client_domains) if cd == d]
        assert sum(part.train_sizes()[i] for i in mine) == 150
        assert sum(part.test_sizes()[i] for i in mine) == 60
    assert min(part.train_sizes()) >= 10 and min(part.test_sizes()) >= 10


def test_domain_requires_a_multiple_of_the_domains():
    train, test, train_dom, test_dom = domain_data()
    with pytest.raises(ValueError, match="data.num_clients=4 must be a multiple of the 3 domains"):
        partition_domain(train, test, train_dom, test_dom, num_clients=4)


# ---------------------------------------------------------------------------------------- determinism


def all_schemes(seed: int) -> list[Partition]:
    train, test = shuffled_labels(8, 40, 0), shuffled_labels(8, 20, 1)
    d_train, d_test, d_train_dom, d_test_dom = domain_data()
    return [
        partition_iid(train, test, 4, seed),
        partition_dirichlet(train, test, 4, 0.5, seed),
        partition_pathological(train, test, 4, seed, shots=4),
        partition_domain(d_train, d_test, d_train_dom, d_test_dom, 6, 0.3, seed),
    ]


def test_same_seed_same_partition_other_seed_different():
    for a, b, c in zip(all_schemes(0), all_schemes(0), all_schemes(1)):
        assert a.digest() == b.digest() and a == b
        assert all(np.array_equal(x, y) for x, y in zip(a.train_indices + a.test_indices,
                                                         b.train_indices + b.test_indices))
        assert a.digest() != c.digest() and a != c
        assert any(not np.array_equal(x, y) for x, y in zip(a.train_indices, c.train_indices))


def test_digest_format_is_fixed():
    # a hand-built partition pins the hash format (canonical JSON header + little-endian int64 indices)
    part = Partition("iid", {"num_clients": 2}, 0, 2, [np.array([2, 0]), np.array([1])],
                     [np.array([0]), np.array([1])])
    assert part.train_indices[0].tolist() == [0, 2]  # sorted on construction
    assert part.digest() == "e4b357aceb416bca58c8221b5dbc38fdf38e4d00266d767e25d89419e5c43f29"


# ------------------------------------------------------------------------------------------ manifests


def test_manifest_round_trip(tmp_path):
    train, test, train_dom, test_dom = domain_data()
    part = partition_domain(train, test, train_dom, test_dom, num_clients=3, seed=4)
    path = tmp_path / "run" / "partition.json"
    save_manifest(part, path, train, test)
    assert [p.name for p in path.parent.iterdir()] == ["partition.json"]  # no temp file left behind
    record = json.loads(path.read_text())
    assert record["digest"] == part.digest() and record["scheme"] == "domain"
    assert record["train_label_histogram"] == part.label_histograms(train, test)["train"].tolist()
    loaded = load_manifest(path, train, test)
    assert loaded.digest() == part.digest()
    assert loaded.client_domains == [0, 1, 2] and loaded.params == part.params and loaded.seed == 4
    for x, y in zip(loaded.train_indices + loaded.test_indices, part.train_indices + part.test_indices):
        assert x.dtype == np.int64 and np.array_equal(x, y)


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r["train_indices"][0].__setitem__(0, r["train_indices"][1][0]),
        lambda r: r.__setitem__("seed", 1),
        lambda r: r["params"].__setitem__("alpha", 0.6),
        lambda r: r["test_indices"][1].pop(),
    ],
)
def test_edited_manifest_is_refused(tmp_path, edit):
    train, test = shuffled_labels(5, 30, 0), shuffled_labels(5, 20, 1)
    path = tmp_path / "partition.json"
    save_manifest(partition_dirichlet(train, test, 3, 0.5, seed=0), path, train, test)
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not match its digest"):
        load_manifest(path)


def test_manifest_from_other_labels_or_missing_is_refused(tmp_path):
    train, test = shuffled_labels(5, 30, 0), shuffled_labels(5, 20, 1)
    path = tmp_path / "partition.json"
    save_manifest(partition_iid(train, test, 3, seed=0), path, train, test)
    with pytest.raises(ValueError, match="made from other train labels"):
        load_manifest(path, shuffled_labels(5, 30, 9), test)
    with pytest.raises(UserError, match="partition manifest not found"):
        load_manifest(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read partition manifest"):
        load_manifest(path)


# ------------------------------------------------------------------------------------- make_partition


class ArrayImages(LabeledImages):
    def __init__(self, targets: np.ndarray, domains: np.ndarray | None = None):
        self.targets, self.domains = targets, domains

    def load_image(self, index: int) -> torch.Tensor:
        return torch.zeros(3, 4, 4)


def bundle(domains: bool = False) -> DatasetBundle:
    train, test, train_dom, test_dom = domain_data(num_domains=2, num_classes=4)
    return DatasetBundle(
        name="toy", classnames=["ant", "bee", "cat", "dog"],
        train=ArrayImages(train, train_dom if domains else None),
        test=ArrayImages(test, test_dom if domains else None),
        domain_names=["real", "sketch"] if domains else None,
    )


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological", "domain"])
def test_make_partition_dispatches_on_config(scheme):
    b = bundle(domains=True)
    cfg = DataConfig(partition=scheme, num_clients=4, alpha=0.7, domain_alpha=0.2, shots=3, min_size=5)
    part = make_partition(b, cfg, seed=2)
    tr, te, tr_dom, te_dom = b.train.targets, b.test.targets, b.train.domains, b.test.domains
    direct = {
        "iid": lambda: partition_iid(tr, te, 4, 2),
        "dirichlet": lambda: partition_dirichlet(tr, te, 4, 0.7, 2, min_size=5),
        "pathological": lambda: partition_pathological(tr, te, 4, 2, shots=3),
        "domain": lambda: partition_domain(tr, te, tr_dom, te_dom, 4, alpha=0.2, seed=2, min_size=5),
    }[scheme]()
    assert part.scheme == scheme and part.params == {"dataset": "toy", **direct.params}
    assert part == replace(direct, params=part.params)


def test_make_partition_errors():
    with pytest.raises(ValueError, match="data.partition=domain needs a dataset with domains"):
        make_partition(bundle(domains=False), DataConfig(partition="domain", num_clients=2), seed=0)
    with pytest.raises(ValueError, match=r"data.shots=100 but class 'ant' \(id 0\) has only 60 train images"):
        make_partition(bundle(), DataConfig(partition="pathological", num_clients=2, shots=100), seed=0)
