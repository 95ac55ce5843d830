"""What clients train and are evaluated on: cached image features (or images), labels and the partition.

Test features are cached whenever ``perf.cache_features`` is on (the test transform is deterministic). Train
features are cached when the train transform is deterministic, or, as an explicit option that changes the
semantics, as ``perf.augmented_views`` pre-computed augmented views per image (each sample then draws one of its
views every epoch instead of a fresh augmentation).

When train images are loaded at every step (augmentation on, nothing cached), each sample's random transform is
seeded by the client's round generator and the sample's position in the epoch (:class:`SeededItems`), so the
batches are bitwise the same whatever ``data.num_workers`` is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fedlit.backbone import Backbone
from fedlit.config import Config
from fedlit.data.base import DatasetBundle
from fedlit.data.features import FeatureCache, encode_dataset, feature_key
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
    that epoch's order are skipped)."""

    partition: Partition
    train_labels: Tensor
    test_labels: Tensor
    train_features: Tensor | None = None
    test_features: Tensor | None = None
    bundle: DatasetBundle | None = None
    batch_size: int = 32
    num_workers: int = 0
    drop_last: bool = False

    def train_size(self, cid: int) -> int:
        """Number of train samples of client ``cid``."""
        return len(self.partition.train_indices[cid])

    def train_batches(self, cid: int, generator: torch.Generator, device: torch.device) -> Iterator:
        """One epoch of shuffled ``(x, y)`` batches of client ``cid``: features, or images when not cached.
        All randomness (order, augmented view, random transforms) comes from ``generator``."""
        index = torch.as_tensor(self.partition.train_indices[cid], dtype=torch.long)
        order = index[torch.randperm(len(index), generator=generator)]
        if self.train_features is None:
            yield from self._image_batches(order, int(torch.randint(2**62, (1,), generator=generator)), device)
            return
        views = None
        if self.train_features.dim() == 3:
            views = torch.randint(self.train_features.shape[0], (len(order),), generator=generator)
        for start in range(0, self._epoch_length(len(order)), self.batch_size):
            batch = order[start : start + self.batch_size]
            if views is None:
                x = self.train_features[batch]
            else:
                x = self.train_features[views[start : start + self.batch_size], batch]
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
        if self.test_features is not None:
            return self.test_features if index is None else self.test_features[index]
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


def build_client_data(cfg: Config, backbone: Backbone, bundle: DatasetBundle, partition: Partition,
                      device: torch.device, cache: FeatureCache) -> ClientData:
    """Features as ``cfg.perf`` asks: cached test features, cached train features (or augmented views).
    UserError when ``data.drop_last`` would leave a client without a single batch."""
    if cfg.data.drop_last:
        check_drop_last(partition, cfg.data.batch_size)

    def features(split: str, dataset, views: int = 0) -> Tensor:
        key = feature_key(backbone, bundle.name, split, bundle.transform_id, len(dataset), views)
        if not views:
            return cache.get_or_compute(key, lambda: encode_dataset(backbone, dataset, device=device,
                                                                    num_workers=cfg.data.num_workers))

        def compute_views() -> Tensor:
            out = []
            for v in range(views):
                with torch.random.fork_rng(devices=[]):  # the random train transform draws from torch's global RNG
                    torch.manual_seed(AUGMENTED_VIEW_SEED + v)
                    out.append(encode_dataset(backbone, dataset, device=device, num_workers=0))
            return torch.stack(out)

        return cache.get_or_compute(key, compute_views)

    train_features = None
    if cfg.perf.cache_features and not bundle.augmented:
        train_features = features("train", bundle.train)
    elif cfg.perf.cache_features and cfg.perf.augmented_views > 0:
        train_features = features("train", bundle.train, cfg.perf.augmented_views)
    return ClientData(
        partition=partition,
        train_labels=torch.as_tensor(bundle.train.targets, dtype=torch.long),
        test_labels=torch.as_tensor(bundle.test.targets, dtype=torch.long),
        train_features=train_features,
        test_features=features("test", bundle.test) if cfg.perf.cache_features else None,
        bundle=bundle,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        drop_last=cfg.data.drop_last,
    )
