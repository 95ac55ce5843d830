"""What clients train and are evaluated on: cached image features (or images), labels and the partition.

Test features are cached whenever ``perf.cache_features`` is on (the test transform is deterministic). Train
features are cached when the train transform is deterministic, or, as an explicit option that changes the
semantics, as ``perf.augmented_views`` pre-computed augmented views per image (each sample then draws one of its
views every epoch instead of a fresh augmentation).

When train images are loaded at every step (augmentation on, nothing cached), each sample's random transform is
seeded by the client's round generator and the sample's position in the epoch (:class:`SeededItems`), so the
batches are bitwise the same whatever ``data.num_workers`` is.

Features come in two kinds: one pooled feature ``(D,)`` per image (every method so far), or the per-token features
``(P+1, D)`` (pooled token first, then the patches) for a client module whose ``image_feature_kind`` is
``"patches"``. :func:`build_client_data` caches the kinds the run's modules ask for (pooled always) under separate
keys; :meth:`ClientData.for_module` is the view that serves a module its own kind.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fedlit.backbone import Backbone
from fedlit.config import Config, runnable_algorithms
from fedlit.data.base import DatasetBundle
from fedlit.data.features import (
    PATCHES,
    POOLED,
    TOKENS,
    FeatureCache,
    check_kind,
    encode_dataset,
    feature_key,
    sample_dims,
    token_kind,
)
from fedlit.data.partition import Partition
from fedlit.errors import UserError

AUGMENTED_VIEW_SEED = 4_099
SEED_MODULUS = 2**63  # torch.manual_seed takes a 64-bit seed


class SeededItems(Dataset):
    """Item ``k`` is ``dataset[indices[k]]`` computed with torch's global RNG seeded by ``base_seed + k``: random
    transforms (torchvision's draw from that RNG) give the same result in the main process and in any DataLoader
    worker. The caller's RNG state is restored after each item."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], base_seed: int):
        self.dataset = dataset
        self.indices = list(indices)
        self.base_seed = int(base_seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.base_seed + k) % SEED_MODULUS)
            return self.dataset[self.indices[k]]


@dataclass
class ClientData:
    """Both splits for every client. ``train_features``: ``(N, D)``, ``(V, N, D)`` (augmented views) or None
    (images are loaded and encoded at every step); ``test_features``: ``(N_test, D)`` or None (encode at eval).
    ``drop_last``: every epoch ends with the last full batch (a client's remaining ``size % batch_size`` samples of
    that epoch's order are skipped). ``train_kinds`` / ``test_kinds``: features of the other kinds a module of the
    run asks for (kind -> tensor): per-token features ``(N, P+1, D)`` (``"patches"``) or frozen image-tower tokens
    ``(N, 1+P, W)`` (``token_kind(L)``), a leading ``V`` for augmented views; ``feature_kind`` says which kind
    :meth:`train_batches` and :meth:`test_inputs` serve."""

    partition: Partition
    train_labels: Tensor
    test_labels: Tensor
    train_features: Tensor | None = None
    test_features: Tensor | None = None
    bundle: DatasetBundle | None = None
    batch_size: int = 32
    num_workers: int = 0
    drop_last: bool = False
    train_kinds: dict[str, Tensor] = field(default_factory=dict)
    test_kinds: dict[str, Tensor] = field(default_factory=dict)
    feature_kind: str = POOLED

    @property
    def train_patches(self) -> Tensor | None:
        """Cached per-token train features ``(N, P+1, D)`` (or ``(V, N, P+1, D)``); None when not cached."""
        return self.train_kinds.get(PATCHES)

    @property
    def test_patches(self) -> Tensor | None:
        """Cached per-token test features ``(N_test, P+1, D)``; None when not cached."""
        return self.test_kinds.get(PATCHES)

    def for_kind(self, kind: str) -> ClientData:
        """The same data serving features of ``kind`` (tensors shared). ValueError when features are cached but
        not of that kind (the run was built without a module that asks for it)."""
        check_kind(kind)
        view = replace(self, feature_kind=kind)
        cached = self.test_features is not None or self.train_features is not None
        if kind != self.feature_kind and cached and view._test_source() is None and view._train_source() is None:
            raise ValueError(f"no cached {kind} features: build the client data with kinds including {kind!r}")
        return view

    def cached_bytes(self) -> int:
        """Bytes of every cached feature tensor this view serves (pooled features, patches or tokens)."""
        return sum(int(t.numel() * t.element_size()) for t in (self._train_source(), self._test_source())
                   if t is not None)

    def for_module(self, module) -> ClientData:
        """The view serving ``module`` the kind its ``image_feature_kind`` names (``"pooled"`` when it has none)."""
        return self.for_kind(getattr(module, "image_feature_kind", POOLED))

    def _train_source(self) -> Tensor | None:
        return self.train_features if self.feature_kind == POOLED else self.train_kinds.get(self.feature_kind)

    def _test_source(self) -> Tensor | None:
        return self.test_features if self.feature_kind == POOLED else self.test_kinds.get(self.feature_kind)

    def train_size(self, cid: int) -> int:
        """Number of train samples of client ``cid``."""
        return len(self.partition.train_indices[cid])

    def train_classes(self, cid: int, label_map: Tensor | None = None) -> list[int]:
        """The sorted classes of client ``cid``'s train labels (mapped by ``label_map (C,)`` first when given)."""
        labels = self.train_labels[torch.as_tensor(self.partition.train_indices[cid], dtype=torch.long)]
        return torch.unique(labels if label_map is None else label_map.to(labels.device)[labels]).tolist()

    def batches_per_epoch(self, cid: int) -> int:
        """Number of batches :meth:`train_batches` yields per epoch for client ``cid`` (known without drawing)."""
        return -(-self._epoch_length(self.train_size(cid)) // self.batch_size)

    def train_batches(self, cid: int, generator: torch.Generator, device: torch.device) -> Iterator:
        """One epoch of shuffled ``(x, y)`` batches of client ``cid``: features, or images when not cached.
        All randomness (order, augmented view, random transforms) comes from ``generator``."""
        index = torch.as_tensor(self.partition.train_indices[cid], dtype=torch.long)
        order = index[torch.randperm(len(index), generator=generator)]
        features = self._train_source()
        if features is None:
            yield from self._image_batches(order, int(torch.randint(2**62, (1,), generator=generator)), device)
            return
        views = None
        if features.dim() == sample_dims(self.feature_kind) + 2:
            views = torch.randint(features.shape[0], (len(order),), generator=generator)
        for start in range(0, self._epoch_length(len(order)), self.batch_size):
            batch = order[start : start + self.batch_size]
            if views is None:
                x = features[batch]
            else:
                x = features[views[start : start + self.batch_size], batch]
            yield x.to(device), self.train_labels[batch].to(device)

    def _epoch_length(self, size: int) -> int:
        """How many of an epoch's ``size`` samples are used: all, or the full batches' under ``drop_last``."""
        return size - size % self.batch_size if self.drop_last else size

    def _image_batches(self, order: Tensor, seed: int, device: torch.device) -> Iterator:
        """Batches of preprocessed images in ``order``; the random transform of the sample at position ``k`` is
        seeded by ``seed + k``, so the batches do not depend on ``num_workers``."""
        loader = DataLoader(SeededItems(self.bundle.train, order.tolist(), seed), batch_size=self.batch_size,
                            shuffle=False, drop_last=self.drop_last, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(seed))  # keeps the global RNG untouched
        for x, y in loader:
            yield x.to(device), y.to(device)

    def test_inputs(self, index: Tensor | None = None) -> Tensor:
        """Test features (or preprocessed images when not cached) of ``index`` (all test samples when None)."""
        features = self._test_source()
        if features is not None:
            return features if index is None else features[index]
        items = range(len(self.bundle.test)) if index is None else index.tolist()
        return torch.stack([self.bundle.test[i][0] for i in items])


def check_drop_last(partition: Partition, batch_size: int) -> None:
    """Refuse ``data.drop_last`` when a client holds fewer train samples than one batch: it would take no step
    at all (the reference code's DataLoader would silently train it on nothing)."""
    sizes = partition.train_sizes()
    small = [cid for cid, size in enumerate(sizes) if size < batch_size]
    if small:
        cid = small[0]
        raise UserError(f"data.drop_last=true but client {cid} has {sizes[cid]} train samples, fewer than "
                        f"data.batch_size={batch_size} ({len(small)} client(s) would never train); lower "
                        "data.batch_size or set data.drop_last=false")


def run_feature_kinds(cfg: Config) -> list[str]:
    """The image feature kind of every algorithm the run of ``cfg`` runs (:func:`~fedlit.config.runnable_algorithms`):
    the ``image_feature_kind`` its class declares for its client module (``"pooled"`` when it declares none; an
    image-side method's ``"tokens"`` as :func:`token_kind` of ``prompt.vision_start_layer``); nothing is built."""
    from fedlit.algorithms import algorithm_class  # the algorithms import the modules, which import this package

    kinds = [getattr(algorithm_class(name), "image_feature_kind", POOLED) for name in runnable_algorithms(cfg)]
    return [token_kind(cfg.prompt.vision_start_layer) if kind == TOKENS else kind for kind in kinds]


def cached_features(cache: FeatureCache, backbone: Backbone, bundle: DatasetBundle, split: str,
                    device: torch.device, views: int = 0, kind: str = POOLED, num_workers: int = 0,
                    progress: bool = False) -> Tensor:
    """The image features of ``bundle``'s ``split`` (``"train"`` or ``"test"``) from ``cache``, computed on a miss:
    ``(N, D)`` pooled or ``(N, P+1, D)`` patches (``kind``), or ``(V, N, ...)`` for ``views`` > 0 augmented views
    (view ``v`` drawn with torch's global RNG seeded by ``AUGMENTED_VIEW_SEED + v``). ``progress``: a bar per
    feature set computed (on a terminal)."""
    dataset = bundle.train if split == "train" else bundle.test
    key = feature_key(backbone, bundle.name, split, bundle.transform_id, len(dataset), views, kind)
    what = {POOLED: "image features", PATCHES: "patch features"}.get(kind, f"image-tower tokens ({kind})")
    desc = f"{bundle.name} {split} {what}"
    if not views:
        return cache.get_or_compute(key, lambda: encode_dataset(backbone, dataset, device=device,
                                                                num_workers=num_workers, kind=kind,
                                                                progress=progress, desc=desc))

    def compute_views() -> Tensor:
        out = []
        for v in range(views):
            with torch.random.fork_rng(devices=[]):  # the random train transform draws from torch's global RNG
                torch.manual_seed(AUGMENTED_VIEW_SEED + v)
                out.append(encode_dataset(backbone, dataset, device=device, num_workers=0, kind=kind,
                                          progress=progress, desc=f"{desc}, view {v + 1}/{views}"))
        return torch.stack(out)

    return cache.get_or_compute(key, compute_views)


def build_client_data(cfg: Config, backbone: Backbone, bundle: DatasetBundle, partition: Partition,
                      device: torch.device, cache: FeatureCache, kinds: Sequence[str] | None = None,
                      progress: bool = False) -> ClientData:
    """Features as ``cfg.perf`` asks: cached test features, cached train features (or augmented views) of every
    kind in ``kinds`` (default: :func:`run_feature_kinds`): pooled always,
    per-token patches, image-tower tokens. The data serves the kinds' one kind when they agree, else pooled
    features (:meth:`ClientData.for_module` switches).
    UserError when ``data.drop_last`` would leave a client without a single batch. ``progress``: a bar per feature
    set computed (on a terminal)."""
    if cfg.data.drop_last:
        check_drop_last(partition, cfg.data.batch_size)
    kinds = list(kinds) if kinds is not None else run_feature_kinds(cfg)

    def features(split: str, views: int = 0, kind: str = POOLED) -> Tensor:
        return cached_features(cache, backbone, bundle, split, device, views=views, kind=kind,
                               num_workers=cfg.data.num_workers, progress=progress)

    def train(kind: str) -> Tensor | None:
        if cfg.perf.cache_features and not bundle.augmented:
            return features("train", kind=kind)
        if cfg.perf.cache_features and cfg.perf.augmented_views > 0:
            return features("train", cfg.perf.augmented_views, kind)
        return None

    others = list(dict.fromkeys(k for k in kinds if k != POOLED)) if cfg.perf.cache_features else []
    train_kinds = {kind: train(kind) for kind in others}
    return ClientData(
        partition=partition,
        train_labels=torch.as_tensor(bundle.train.targets, dtype=torch.long),
        test_labels=torch.as_tensor(bundle.test.targets, dtype=torch.long),
        train_features=train(POOLED),
        test_features=features("test") if cfg.perf.cache_features else None,
        bundle=bundle,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        drop_last=cfg.data.drop_last,
        train_kinds={k: v for k, v in train_kinds.items() if v is not None},
        test_kinds={kind: features("test", kind=kind) for kind in others},
        feature_kind=kinds[0] if kinds and all(k == kinds[0] for k in kinds) else POOLED,
    )
