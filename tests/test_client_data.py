"""Client training batches: augmented image batches independent of data.num_workers, and data.drop_last."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlit.backbone import load_backbone
from fedlit.config import DataConfig, load_config
from fedlit.data.features import FeatureCache
from fedlit.data.partition import Partition, partition_iid
from fedlit.data.shapes import build_shapes
from fedlit.errors import UserError
from fedlit.federation.client_data import ClientData, SeededItems, build_client_data
from fedlit.federation.sampling import client_generator
from fedlit.pretrain import SHAPES_CLIP_PREPROCESS

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def augmented_shapes():
    """Shapes with data.augment=true: 64 train images (2 per class), random-resized-crop + flip per access."""
    bundle = build_shapes(DataConfig(train_per_class=2, test_per_class=1, augment=True), SHAPES_CLIP_PREPROCESS)
    assert bundle.augmented
    return bundle, partition_iid(bundle.train.targets, bundle.test.targets, 2, seed=0)


def _epochs(data: ClientData, cid: int, epochs: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = client_generator(0, 3, cid)
    return [batch for _ in range(epochs) for batch in data.train_batches(cid, generator, CPU)]


def test_augmented_batches_are_bitwise_identical_for_any_num_workers(augmented_shapes):
    bundle, part = augmented_shapes
    labels = torch.as_tensor(bundle.train.targets)

    def batches(workers: int):
        data = ClientData(part, labels, torch.as_tensor(bundle.test.targets), bundle=bundle, batch_size=12,
                          num_workers=workers)
        return _epochs(data, cid=1)

    rng_before = torch.get_rng_state()
    reference = batches(0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's global RNG is left alone
    assert [len(y) for _, y in reference] == [12, 12, 8] * 2  # 32 samples per epoch
    for workers in (1, 2):
        other = batches(workers)
        assert len(other) == len(reference)
        for (x, y), (x0, y0) in zip(other, reference):
            assert torch.equal(x, x0) and torch.equal(y, y0), workers
    # the batches really are augmented: not the plain images, and a new draw every epoch
    first = reference[0]
    plain = torch.stack([bundle.test.transform(bundle.train.load_image(i)) for i in range(len(bundle.train))])
    assert not any(torch.equal(first[0][0], image) for image in plain)
    epoch1, epoch2 = torch.cat([x for x, _ in reference[:3]]), torch.cat([x for x, _ in reference[3:]])
    assert not torch.equal(epoch1, epoch2)


def test_seeded_items_seed_each_position():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.rand(3) + i

    items = SeededItems(Noise(), [4, 2, 0], base_seed=10)
    torch.manual_seed(10)
    expected = torch.rand(3) + 4  # position 0 draws from seed 10 + 0
    assert torch.equal(items[0], expected)
    assert torch.equal(items[1], items[1]) and not torch.equal(items[1] - 2, items[0] - 4)
    assert len(items) == 3


def _cached(drop_last: bool, views: int = 0) -> ClientData:
    features = torch.arange(10 * 2, dtype=torch.float32).reshape(10, 2)
    if views:
        features = torch.stack([features + 100 * v for v in range(views)])
    part = Partition("iid", {}, 0, 10, [np.arange(10)], [np.arange(1)])
    return ClientData(part, torch.arange(10), torch.zeros(1, dtype=torch.long), train_features=features,
                      batch_size=4, drop_last=drop_last)


@pytest.mark.parametrize("views", [0, 3])
def test_drop_last_drops_the_partial_batch_of_every_epoch(views):
    kept = _epochs(_cached(True, views), cid=0)
    full = _epochs(_cached(False, views), cid=0)
    assert [len(y) for _, y in full] == [4, 4, 2] * 2
    assert [len(y) for _, y in kept] == [4, 4] * 2
    for (x, y), (x_full, y_full) in zip(kept, full[:2] + full[3:5]):  # same order and views, last batch gone
        assert torch.equal(x, x_full) and torch.equal(y, y_full)


def test_drop_last_on_augmented_images(augmented_shapes):
    bundle, part = augmented_shapes
    args = (part, torch.as_tensor(bundle.train.targets), torch.as_tensor(bundle.test.targets))
    kept = _epochs(ClientData(*args, bundle=bundle, batch_size=12, drop_last=True), cid=0, epochs=1)
    full = _epochs(ClientData(*args, bundle=bundle, batch_size=12), cid=0, epochs=1)
    assert [len(y) for _, y in kept] == [12, 12] and [len(y) for _, y in full] == [12, 12, 8]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(kept, full))


def test_build_client_data_plumbs_drop_last_and_refuses_a_client_without_a_full_batch():
    backbone = load_backbone("tiny")
    overrides = ["data.train_per_class=2", "data.test_per_class=1", "data.num_clients=4", "method.num_experts=3",
                 "data.partition=iid",
                 "data.drop_last=true"]
    cfg = load_config(None, overrides + ["data.batch_size=16"])  # 64 samples: 16 per client
    bundle = build_shapes(cfg.data, backbone.preprocess)
    part = partition_iid(bundle.train.targets, bundle.test.targets, 4, seed=0)
    data = build_client_data(cfg, backbone, bundle, part, CPU, FeatureCache(None))
    assert data.drop_last is True
    assert [len(y) for _, y in _epochs(data, cid=2, epochs=1)] == [16]
    cfg = load_config(None, overrides + ["data.batch_size=17"])
    with pytest.raises(UserError, match=r"data.drop_last=true but client 0 has 16 train samples, fewer than "
                                        r"data.batch_size=17 \(4 client\(s\) would never train\)") as err:
        build_client_data(cfg, backbone, bundle, part, CPU, FeatureCache(None))
    assert "\n" not in str(err.value)
