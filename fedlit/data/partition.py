"""Federated partitioners (iid, Dirichlet, pathological, domain) and their JSON manifests.

A partitioner sees only label (and domain) arrays, never images, and draws all its randomness from
``np.random.default_rng`` streams derived from the seed alone, so a partition is a pure function of
(labels, scheme, parameters, seed). The manifest stores the indices, a per-client label histogram and a
sha256 digest; reloading it checks the digest, so an edited manifest is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedlit.config import DataConfig
from fedlit.data.base import DatasetBundle
from fedlit.errors import UserError
from fedlit.io import atomic_write

MANIFEST_FORMAT = "fedlit-partition/1"


@dataclass(eq=False)
class Partition:
    """Which train and test samples each client holds.

    ``train_indices[i]`` / ``test_indices[i]`` are sorted int64 index arrays into the dataset's train / test
    split for client ``i``. ``client_domains[i]`` is client i's domain id (domain partitions only).
    Two partitions compare equal when their digests do.
    """

    scheme: str
    params: dict[str, Any]
    seed: int
    num_classes: int
    train_indices: list[np.ndarray]
    test_indices: list[np.ndarray]
    client_domains: list[int] | None = None

    def __post_init__(self) -> None:
        if len(self.train_indices) != len(self.test_indices):
            raise UserError(f"partition has {len(self.train_indices)} train but {len(self.test_indices)} "
                            "test index lists; every client needs one of each")
        if self.client_domains is not None and len(self.client_domains) != len(self.train_indices):
            raise UserError(f"client_domains has {len(self.client_domains)} entries for "
                            f"{len(self.train_indices)} clients")
        self.train_indices = [np.sort(np.asarray(idx, dtype=np.int64)) for idx in self.train_indices]
        self.test_indices = [np.sort(np.asarray(idx, dtype=np.int64)) for idx in self.test_indices]
        if self.client_domains is not None:
            self.client_domains = [int(d) for d in self.client_domains]

    @property
    def num_clients(self) -> int:
        return len(self.train_indices)

    def train_sizes(self) -> list[int]:
        """Number of train samples per client, length ``num_clients``."""
        return [len(idx) for idx in self.train_indices]

    def test_sizes(self) -> list[int]:
        """Number of test samples per client, length ``num_clients``."""
        return [len(idx) for idx in self.test_indices]

    def label_histograms(self, train_targets: np.ndarray, test_targets: np.ndarray) -> dict[str, np.ndarray]:
        """Per-client class counts: ``{"train": (N, C), "test": (N, C)}`` int64 arrays."""
        return {
            "train": _histogram(self.train_indices, _as_labels(train_targets, "train_targets"),
                                self.num_classes, "train"),
            "test": _histogram(self.test_indices, _as_labels(test_targets, "test_targets"),
                               self.num_classes, "test"),
        }

    def digest(self) -> str:
        """sha256 (hex) over scheme, params, seed, num_classes, client domains and every index.

        Canonical JSON for the header and little-endian int64 bytes for the indices make it identical
        across runs, platforms and numpy versions.
        """
        header = {
            "scheme": self.scheme, "params": self.params, "seed": self.seed,
            "num_classes": self.num_classes, "client_domains": self.client_domains,
            "train_sizes": self.train_sizes(), "test_sizes": self.test_sizes(),
        }
        h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        for idx in self.train_indices + self.test_indices:
            h.update(idx.astype("<i8").tobytes())
        return h.hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return self.digest() == other.digest()

    __hash__ = None  # type: ignore[assignment]  # mutable container


# ----------------------------------------------------------------------------------------------- helpers


def _as_labels(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise UserError(f"{name} must be a 1-D array of integer ids (got shape {arr.shape})")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{name} must hold integer ids (got dtype {arr.dtype})")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise UserError(f"{name} must be non-negative (found {arr.min()})")
    return arr


def _histogram(indices: list[np.ndarray], targets: np.ndarray, num_classes: int, split: str) -> np.ndarray:
    counts = np.zeros((len(indices), num_classes), dtype=np.int64)
    for i, idx in enumerate(indices):
        if idx.size and idx[-1] >= len(targets):
            raise UserError(f"client {i} holds {split} index {idx[-1]} but the {split} split has only "
                            f"{len(targets)} samples; the partition belongs to another dataset")
        labels = targets[idx]
        if labels.size and labels.max() >= num_classes:
            raise UserError(f"{split} label {labels.max()} is out of range for num_classes={num_classes}")
        counts[i] = np.bincount(labels, minlength=num_classes)
    return counts


def _num_classes(train: np.ndarray, test: np.ndarray, num_classes: int | None) -> int:
    seen = int(max(train.max(initial=-1), test.max(initial=-1))) + 1
    if num_classes is None:
        return seen
    if num_classes < seen:
        raise UserError(f"num_classes={num_classes} but the labels go up to {seen - 1}")
    return int(num_classes)


def _check_common(num_clients: int, seed: int) -> None:
    if num_clients < 1:
        raise UserError(f"num_clients must be >= 1 (got {num_clients})")
    if seed < 0:
        raise UserError(f"seed must be a non-negative integer (got {seed})")


def _dirichlet_split(
    train_by_class: list[np.ndarray],
    test_by_class: list[np.ndarray],
    num_clients: int,
    alpha: float,
    min_size: int,
    max_tries: int,
    rng: np.random.Generator,
    fix: str,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hsu et al.'s per-class Dirichlet split of train and test with the same proportions.

    Classes are visited in order; a client already holding >= total/N train samples gets no share of later
    classes. The whole split is redrawn until every client has >= ``min_size`` (>= 1) train and test samples.
    """
    if min_size < 1:
        raise UserError(f"data.min_size={min_size} would allow a client with no train sample; set data.min_size "
                        ">= 1 (default 10)")
    total_train = sum(len(c) for c in train_by_class)
    total_test = sum(len(c) for c in test_by_class)
    if min(total_train, total_test) < num_clients * min_size:
        raise UserError(f"{total_train} train / {total_test} test samples cannot give {num_clients} clients "
                        f">= {min_size} samples each; {fix}")
    cap = total_train / num_clients
    for _ in range(max_tries):
        train_parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        test_parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        held = np.zeros(num_clients, dtype=np.int64)
        for train_c, test_c in zip(train_by_class, test_by_class):
            open_ = held < cap
            shares = np.where(open_, rng.dirichlet(np.full(num_clients, alpha)), 0.0)
            if shares.sum() <= 0:  # tiny alpha can put all the mass on capped clients: spread over the open
                shares = open_.astype(np.float64) if open_.any() else np.ones(num_clients)
            # normalise the cumulative sum, not the shares: it then ends at exactly 1.0 and a zero share gets
            # exactly zero samples (normalised shares can sum to 0.999..., leaking one to a capped client)
            cum = np.cumsum(shares)
            cum /= cum[-1]
            shuffled = (rng.permutation(train_c), rng.permutation(test_c))
            for parts, idx in zip((train_parts, test_parts), shuffled):
                cuts = (cum[:-1] * len(idx)).astype(np.int64)
                for j, chunk in enumerate(np.split(idx, cuts)):
                    parts[j].append(chunk)
            held += [len(parts[-1]) for parts in train_parts]
        train = [np.sort(np.concatenate(parts)) for parts in train_parts]
        test = [np.sort(np.concatenate(parts)) for parts in test_parts]
        if min(len(t) for t in train) >= min_size and min(len(t) for t in test) >= min_size:
            return train, test
    raise UserError(f"no Dirichlet(alpha={alpha}) split gave all {num_clients} clients >= {min_size} train "
                    f"and test samples in {max_tries} draws; {fix}")


def _by_class(labels: np.ndarray, num_classes: int, mask: np.ndarray | None = None) -> list[np.ndarray]:
    idx = np.arange(len(labels), dtype=np.int64)
    if mask is not None:
        idx, labels = idx[mask], labels[mask]
    return [idx[labels == c] for c in range(num_classes)]


# ---------------------------------------------------------------------------------------------- schemes


def partition_iid(
    train_targets: np.ndarray,
    test_targets: np.ndarray,
    num_clients: int,
    seed: int,
    *,
    num_classes: int | None = None,
) -> Partition:
    """Uniform random split of train and of test into ``num_clients`` parts whose sizes differ by <= 1."""
    _check_common(num_clients, seed)
    train, test = _as_labels(train_targets, "train_targets"), _as_labels(test_targets, "test_targets")
    if num_clients > min(len(train), len(test)):
        raise UserError(f"num_clients={num_clients} exceeds the {len(train)} train / {len(test)} test "
                        "samples; lower data.num_clients")
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    return Partition(
        scheme="iid",
        params={"num_clients": int(num_clients)},
        seed=int(seed),
        num_classes=_num_classes(train, test, num_classes),
        train_indices=np.array_split(train_rng.permutation(len(train)), num_clients),
        test_indices=np.array_split(test_rng.permutation(len(test)), num_clients),
    )


def partition_dirichlet(
    train_targets: np.ndarray,
    test_targets: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 1000,
    *,
    num_classes: int | None = None,
) -> Partition:
    """Label-skewed split (Hsu et al.): per class, Dirichlet(alpha) shares over clients, capped at total/N.

    Each class's train and test indices are split with the same proportions; redrawn until every client
    has >= ``min_size`` train and test samples (UserError after ``max_tries`` draws, or if ``min_size < 1``).
    """
    _check_common(num_clients, seed)
    if alpha <= 0:
        raise UserError(f"Dirichlet alpha must be > 0 (got {alpha})")
    train, test = _as_labels(train_targets, "train_targets"), _as_labels(test_targets, "test_targets")
    n_cls = _num_classes(train, test, num_classes)
    train_idx, test_idx = _dirichlet_split(
        _by_class(train, n_cls), _by_class(test, n_cls), num_clients, float(alpha), min_size, max_tries,
        np.random.default_rng(np.random.SeedSequence(seed)),
        fix="lower data.num_clients or data.min_size, or raise data.alpha",
    )
    return Partition(
        scheme="dirichlet",
        params={"num_clients": int(num_clients), "alpha": float(alpha), "min_size": int(min_size)},
        seed=int(seed), num_classes=n_cls, train_indices=train_idx, test_indices=test_idx,
    )


def partition_pathological(
    train_targets: np.ndarray,
    test_targets: np.ndarray,
    num_clients: int,
    seed: int,
    shots: int | None = 16,
    *,
    num_classes: int | None = None,
    classnames: Sequence[str] | None = None,
) -> Partition:
    """Disjoint classes per client: ``k = round(C/N)`` shuffled classes each, the last client the rest.

    Client i owns slice ``[i*k, (i+1)*k)`` of the shuffled class list, the last client ``[(N-1)*k, C)``.
    Train: ``shots`` random images per owned class (None = all); test: all test images of owned classes.
    The class order and the few-shot draw use separate streams, so changing ``shots`` keeps the owners.
    """
    _check_common(num_clients, seed)
    if shots is not None and shots < 1:
        raise UserError(f"data.shots must be >= 1 or None (got {shots})")
    train, test = _as_labels(train_targets, "train_targets"), _as_labels(test_targets, "test_targets")
    n_cls = _num_classes(train, test, num_classes)
    k = round(n_cls / num_clients)  # Python rounds halves to even: round(2.5) == 2
    if k == 0 or (num_clients - 1) * k >= n_cls:
        raise UserError(f"pathological split of {n_cls} classes over {num_clients} clients gives "
                        f"k=round({n_cls}/{num_clients})={k} classes per client, which leaves a client "
                        "without a class; lower data.num_clients")
    order_ss, shots_ss = np.random.SeedSequence(seed).spawn(2)
    order = np.random.default_rng(order_ss).permutation(n_cls)
    owned = [order[i * k:(i + 1) * k] for i in range(num_clients - 1)] + [order[(num_clients - 1) * k:]]

    shot_rng = np.random.default_rng(shots_ss)
    train_by_class, test_by_class = _by_class(train, n_cls), _by_class(test, n_cls)
    picked: list[np.ndarray] = []
    for c in range(n_cls):  # label order, so the draw of class c does not depend on the class shuffle
        pool = train_by_class[c]
        if shots is not None and len(pool) < shots:
            name = f"'{classnames[c]}' (id {c})" if classnames is not None else f"id {c}"
            raise UserError(f"data.shots={shots} but class {name} has only {len(pool)} train images; "
                            "lower data.shots")
        picked.append(pool if shots is None else shot_rng.choice(pool, size=shots, replace=False))
    train_indices = [np.concatenate([picked[c] for c in cls]) for cls in owned]
    for i, (idx, cls) in enumerate(zip(train_indices, owned)):
        if idx.size == 0:  # only with data.shots=null: every class the client owns has no train image
            names = [classnames[c] if classnames is not None else f"id {c}" for c in cls.tolist()]
            raise UserError(f"pathological split: client {i} owns only classes without train images "
                            f"({', '.join(names)}); use a dataset whose classes all have train images, or lower "
                            "data.num_clients")
    return Partition(
        scheme="pathological",
        params={"num_clients": int(num_clients), "shots": None if shots is None else int(shots)},
        seed=int(seed),
        num_classes=n_cls,
        train_indices=train_indices,
        test_indices=[np.concatenate([test_by_class[c] for c in cls]) for cls in owned],
    )


def partition_domain(
    train_targets: np.ndarray,
    test_targets: np.ndarray,
    train_domains: np.ndarray,
    test_domains: np.ndarray,
    num_clients: int,
    alpha: float = 0.3,
    seed: int = 0,
    min_size: int = 10,
    max_tries: int = 1000,
    *,
    num_classes: int | None = None,
) -> Partition:
    """``N / D`` clients per domain; inside each domain a per-class Dirichlet(alpha) split (as dirichlet).

    Domains are the distinct ids of ``train_domains`` / ``test_domains`` in ascending order; clients
    ``[d*N/D, (d+1)*N/D)`` belong to the d-th domain. Each domain draws from its own stream.
    """
    _check_common(num_clients, seed)
    if alpha <= 0:
        raise UserError(f"Dirichlet alpha must be > 0 (got {alpha})")
    train, test = _as_labels(train_targets, "train_targets"), _as_labels(test_targets, "test_targets")
    train_dom = _as_labels(train_domains, "train_domains")
    test_dom = _as_labels(test_domains, "test_domains")
    if len(train_dom) != len(train) or len(test_dom) != len(test):
        raise UserError("domain arrays must have one entry per sample "
                        f"(train {len(train_dom)} vs {len(train)}, test {len(test_dom)} vs {len(test)})")
    n_cls = _num_classes(train, test, num_classes)
    domains = np.union1d(train_dom, test_dom)
    if num_clients % len(domains) != 0:
        raise UserError(f"data.num_clients={num_clients} must be a multiple of the {len(domains)} domains")
    per_domain = num_clients // len(domains)
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for d, ss in zip(domains, np.random.SeedSequence(seed).spawn(len(domains))):
        tr, te = _dirichlet_split(
            _by_class(train, n_cls, train_dom == d), _by_class(test, n_cls, test_dom == d), per_domain,
            float(alpha), min_size, max_tries, np.random.default_rng(ss),
            fix=f"(domain {d}) lower data.num_clients or data.min_size, or raise data.domain_alpha",
        )
        train_idx += tr
        test_idx += te
    return Partition(
        scheme="domain",
        params={"num_clients": int(num_clients), "alpha": float(alpha), "min_size": int(min_size)},
        seed=int(seed), num_classes=n_cls, train_indices=train_idx, test_indices=test_idx,
        client_domains=[int(d) for d in domains for _ in range(per_domain)],
    )


def base_classes(num_classes: int) -> list[int]:
    """The base classes of the base-to-novel protocol: the first half, ``ceil(C / 2)``, as CoOp splits them."""
    return list(range(math.ceil(num_classes / 2)))


def make_partition(bundle: DatasetBundle, cfg: DataConfig, seed: int, classes: list[int] | None = None) -> Partition:
    """The partition ``cfg.partition`` of ``bundle`` (params recorded with the dataset name). With ``classes``,
    only the samples of those classes are dealt to the clients (base-to-novel: the base classes); labels keep
    their ids and the indices point into the whole dataset."""
    if classes is None:
        return _make_partition(bundle, cfg, seed)
    keep = np.asarray(sorted(classes))
    train_map = np.flatnonzero(np.isin(np.asarray(bundle.train.targets), keep))
    test_map = np.flatnonzero(np.isin(np.asarray(bundle.test.targets), keep))
    part = _make_partition(bundle, cfg, seed, train_map, test_map, keep)
    return replace(part, params={**part.params, "classes": [int(c) for c in keep]},
                   train_indices=[train_map[i] for i in part.train_indices],
                   test_indices=[test_map[i] for i in part.test_indices])


def _make_partition(bundle: DatasetBundle, cfg: DataConfig, seed: int, train_map: np.ndarray | None = None,
                    test_map: np.ndarray | None = None, keep: np.ndarray | None = None) -> Partition:
    """The partition of the samples ``train_map``/``test_map`` of ``bundle`` (all when None), labels relabelled
    to ``0..len(keep)-1``; indices are positions in the maps."""
    train, test = np.asarray(bundle.train.targets), np.asarray(bundle.test.targets)
    n_cls = bundle.num_classes
    classnames = bundle.classnames
    train_domains, test_domains = bundle.train.domains, bundle.test.domains
    if keep is not None:
        relabel = {int(c): i for i, c in enumerate(keep)}
        train = np.asarray([relabel[int(t)] for t in train[train_map]], dtype=np.int64)
        test = np.asarray([relabel[int(t)] for t in test[test_map]], dtype=np.int64)
        n_cls, classnames = len(keep), [bundle.classnames[int(c)] for c in keep]
        if train_domains is not None and test_domains is not None:
            train_domains, test_domains = np.asarray(train_domains)[train_map], np.asarray(test_domains)[test_map]
    if cfg.partition == "iid":
        part = partition_iid(train, test, cfg.num_clients, seed, num_classes=n_cls)
    elif cfg.partition == "dirichlet":
        part = partition_dirichlet(train, test, cfg.num_clients, cfg.alpha, seed, cfg.min_size,
                                   num_classes=n_cls)
    elif cfg.partition == "pathological":
        part = partition_pathological(train, test, cfg.num_clients, seed, cfg.shots, num_classes=n_cls,
                                      classnames=classnames)
    elif cfg.partition == "domain":
        if train_domains is None or test_domains is None:
            raise UserError("data.partition=domain needs a dataset with domains (DomainNet, "
                            f"Office-Caltech10); '{bundle.name}' has none, use dirichlet or iid")
        part = partition_domain(train, test, train_domains, test_domains, cfg.num_clients,
                                cfg.domain_alpha, seed, cfg.min_size, num_classes=n_cls)
    else:
        raise UserError(f"unknown data.partition '{cfg.partition}'; "
                        "choose iid, dirichlet, pathological or domain")
    return replace(part, params={"dataset": bundle.name, **part.params})


# --------------------------------------------------------------------------------------------- manifests


def _dumps(record: dict[str, Any]) -> str:
    """JSON with one line per top-level key, and one line per client for lists of lists."""
    lines = []
    for key, value in record.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            rows = ",\n    ".join(json.dumps(row, separators=(",", ":")) for row in value)
            lines.append(f"  {json.dumps(key)}: [\n    {rows}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def save_manifest(partition: Partition, path: str | Path, train_targets: np.ndarray,
                  test_targets: np.ndarray) -> None:
    """Write ``partition`` as JSON (scheme, params, seed, digest, label histograms, indices), atomically."""
    path = Path(path)
    hist = partition.label_histograms(train_targets, test_targets)
    record = {
        "format": MANIFEST_FORMAT,
        "scheme": partition.scheme,
        "params": partition.params,
        "seed": partition.seed,
        "num_classes": partition.num_classes,
        "num_clients": partition.num_clients,
        "client_domains": partition.client_domains,
        "digest": partition.digest(),
        "train_sizes": partition.train_sizes(),
        "test_sizes": partition.test_sizes(),
        "train_label_histogram": hist["train"].tolist(),
        "test_label_histogram": hist["test"].tolist(),
        "train_indices": [idx.tolist() for idx in partition.train_indices],
        "test_indices": [idx.tolist() for idx in partition.test_indices],
    }
    atomic_write(path, _dumps(record))


def load_manifest(path: str | Path, train_targets: np.ndarray | None = None,
                  test_targets: np.ndarray | None = None) -> Partition:
    """Read a manifest written by :func:`save_manifest`; UserError if it is missing, unreadable, or its digest
    does not match.

    With ``train_targets`` and ``test_targets`` given, also checks that the stored label histograms match
    those labels (i.e. the manifest belongs to this dataset).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"partition manifest not found: {path}")
    try:
        record = json.loads(path.read_text())
        if record.get("format") != MANIFEST_FORMAT:
            raise UserError(f"not a {MANIFEST_FORMAT} manifest (format={record.get('format')!r})")
        partition = Partition(
            scheme=record["scheme"], params=record["params"], seed=record["seed"],
            num_classes=record["num_classes"], train_indices=record["train_indices"],
            test_indices=record["test_indices"], client_domains=record["client_domains"],
        )
        stored = record["digest"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"cannot read partition manifest {path}: {err}; delete it to re-partition") from None
    if partition.digest() != stored:
        raise UserError(f"partition manifest {path} does not match its digest (edited or corrupted); "
                        "delete it to re-partition")
    if train_targets is not None and test_targets is not None:
        hist = partition.label_histograms(train_targets, test_targets)
        for split in ("train", "test"):
            if not np.array_equal(hist[split], np.asarray(record[f"{split}_label_histogram"])):
                raise UserError(f"partition manifest {path} was made from other {split} labels than this "
                                "dataset's; delete it to re-partition, or point data.root at the original")
    return partition
