"""The real offline datasets (Fashion-MNIST, scikit-learn's digits), the per-class caps of real datasets, and the
``fashion-clip`` recipe: loaders on idx files written here in the release's format, the Debian package's own files,
the one-line refusal of a missing dataset, the recipe's hash and cache, and a short run on real digits."""

from __future__ import annotations

import dataclasses
import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlit import pretrain
from fedlit.cli import main
from fedlit.config import DataConfig
from fedlit.data import fashion_mnist
from fedlit.data.base import Preprocess, cap_per_class, first_per_class
from fedlit.data.digits import DIGITS_CLASSNAMES, build_digits, digits_split, load_digits_arrays
from fedlit.data.fashion_mnist import FASHION_CLASSNAMES, build_fashion_mnist, read_idx
from fedlit.data.registry import build_dataset
from fedlit.errors import UserError
from fedlit.pretrain import DEFAULT_RECIPE, FASHION_RECIPE, FashionClipRecipe, build_clip, clip_path, recipe_hash
from tests.debian_data import fashion_mnist_unavailable
from tests.helpers import FAST, cache_dir, only_run_dir, read_results

IDENTITY = Preprocess(28, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def write_idx(path: Path, array: np.ndarray) -> Path:
    """``array`` (uint8) as an idx-ubyte file (gzipped when ``path`` ends in .gz), as the release stores it."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def fake_split(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_class`` random uint8 28x28 images of each of the 10 classes, labels cycling 0..9."""
    labels = np.tile(np.arange(10, dtype=np.uint8), n_per_class)
    images = np.random.default_rng(seed).integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    return images, labels


def write_fashion(folder: Path, n_train: int = 6, n_test: int = 3, gz: bool = True) -> dict:
    """The four release files in ``folder``; returns the arrays written."""
    arrays = {"train": fake_split(n_train, 1), "test": fake_split(n_test, 2)}
    suffix = ".gz" if gz else ""
    for split, (images_stem, labels_stem) in fashion_mnist.FILES.items():
        write_idx(folder / f"{images_stem}{suffix}", arrays[split][0])
        write_idx(folder / f"{labels_stem}{suffix}", arrays[split][1])
    return arrays


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Pretend the Debian package is not installed (its folder moved to an empty path)."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FOLDER", tmp_path / "no-debian")


# ------------------------------------------------------------------------------------------------ idx files
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_read_idx_reads_what_was_written(tmp_path, suffix):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    assert np.array_equal(read_idx(write_idx(tmp_path / f"x-idx3-ubyte{suffix}", images)), images)
    labels = np.array([9, 0, 3], dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / f"y-idx1-ubyte{suffix}", labels)), labels)


def test_read_idx_refuses_a_foreign_or_truncated_file(tmp_path):
    (tmp_path / "bad").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="is not an idx file"):
        read_idx(tmp_path / "bad")
    good = write_idx(tmp_path / "t", np.zeros((3, 28, 28), np.uint8)).read_bytes()
    (tmp_path / "short").write_bytes(good[:-5])
    with pytest.raises(ValueError, match=r"short: 2363 bytes, but its header \(3, 28, 28\) needs 2368"):
        read_idx(tmp_path / "short")


# ------------------------------------------------------------------------------------------- Fashion-MNIST
def test_fashion_mnist_from_torchvisions_layout(tmp_path, no_debian):
    arrays = write_fashion(tmp_path / "FashionMNIST" / "raw")
    bundle = build_fashion_mnist(DataConfig(name="fashion_mnist", root=str(tmp_path)), IDENTITY)
    assert bundle.classnames == FASHION_CLASSNAMES and bundle.num_classes == 10 and not bundle.augmented
    assert (len(bundle.train), len(bundle.test)) == (60, 30)
    assert np.array_equal(bundle.train.targets, arrays["train"][1]) and bundle.train.targets.dtype == np.int64
    image, label = bundle.test[7]
    assert label == arrays["test"][1][7] == 7 and image.shape == (3, 28, 28)
    expected = torch.from_numpy(arrays["test"][0][7]).float() / 255  # gray repeated on 3 channels, scaled only
    assert torch.equal(image, expected.expand(3, 28, 28))


def test_fashion_mnist_from_the_release_folder_uncompressed_and_resized(tmp_path, no_debian):
    arrays = write_fashion(tmp_path / "fashion-mnist", gz=False)
    bundle = build_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)), DEFAULT_RECIPE.preprocess())
    assert bundle.test[0][0].shape == (3, 32, 32)  # resized to the backbone's 32 px
    assert torch.equal(bundle.train.load_image(4), torch.from_numpy(arrays["train"][0][4]).expand(3, 28, 28))


def test_a_missing_fashion_mnist_is_one_line_naming_the_install(tmp_path, no_debian):
    with pytest.raises(UserError) as err:
        build_fashion_mnist(DataConfig(name="fashion_mnist", root=str(tmp_path)), IDENTITY)
    message = str(err.value)
    assert "\n" not in message and message.startswith("Fashion-MNIST not found (looked in ")
    assert "apt-get install dataset-fashion-mnist" in message and str(tmp_path / "FashionMNIST" / "raw") in message


def test_the_cli_refuses_a_missing_fashion_mnist_before_writing(tmp_path, capsys, no_debian):
    out_dir = tmp_path / "runs"
    code = main(FAST + [f"run.out_dir={out_dir}", f"backbone.cache_dir={cache_dir()}", "data.name=fashion_mnist",
                        f"data.root={tmp_path / 'empty'}", "algorithm=promptfl"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: Fashion-MNIST not found") and "apt-get install dataset-fashion-mnist" in err
    assert not out_dir.exists()


def test_a_corrupt_fashion_mnist_file_is_one_line(tmp_path, no_debian):
    folder = tmp_path / "FashionMNIST" / "raw"
    write_fashion(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(UserError, match=r"cannot read .*t10k-labels-idx1-ubyte.gz: .*apt-get install"):
        build_fashion_mnist(DataConfig(name="fashion_mnist", root=str(tmp_path)), IDENTITY)


def test_the_debian_package_holds_the_official_split(tmp_path):
    reason = fashion_mnist_unavailable()
    if reason:
        pytest.skip(reason)
    bundle = build_fashion_mnist(DataConfig(name="fashion_mnist", root=str(tmp_path)), IDENTITY)
    assert (len(bundle.train), len(bundle.test)) == (60_000, 10_000)
    assert np.bincount(bundle.train.targets).tolist() == [6000] * 10
    assert np.bincount(bundle.test.targets).tolist() == [1000] * 10
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.images.shape == (60_000, 28, 28)


# ------------------------------------------------------------------------------------------------- digits
def test_digits_split_is_fixed_disjoint_and_stratified():
    images, labels = load_digits_arrays()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    train, test = digits_split(labels)
    assert len(train) == 1352 and len(test) == 445
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    counts = np.bincount(labels)
    assert np.bincount(labels[test]).tolist() == (counts // 4).tolist()
    again = digits_split(labels)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    first = np.flatnonzero(labels == 0)
    assert test[0] == first[np.random.default_rng([0, 0]).permutation(len(first))[0]]


def test_digits_bundle_holds_sklearns_pixels():
    from sklearn.datasets import load_digits

    raw = load_digits()
    bundle = build_digits(DataConfig(name="digits"), IDENTITY)
    assert bundle.classnames == DIGITS_CLASSNAMES and (len(bundle.train), len(bundle.test)) == (1352, 445)
    index = int(digits_split(raw.target)[0][5])
    assert bundle.train.targets[5] == raw.target[index]
    expected = torch.from_numpy(np.rint(raw.images[index] * 255 / 16).astype(np.uint8))
    assert torch.equal(bundle.train.load_image(5), expected.expand(3, 8, 8))
    assert bundle.train[5][0].shape == (3, 28, 28)  # resized to the backbone's size


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(UserError, match=r"^data.name=digits needs scikit-learn: pip install 'fedlit\[digits\]'"):
        build_digits(DataConfig(name="digits"), IDENTITY)


# ------------------------------------------------------------------------------------------ per-class caps
def test_first_per_class_keeps_the_first_items_of_each_label():
    targets = np.array([2, 0, 2, 1, 0, 2, 0])
    assert first_per_class(targets, 2).tolist() == [0, 1, 2, 3, 4]
    assert first_per_class(targets, 1).tolist() == [0, 1, 3]


def test_caps_cut_both_splits_and_key_the_transform():
    whole = build_digits(DataConfig(name="digits"), IDENTITY)
    cut = build_dataset(DataConfig(name="digits", max_train_per_class=5, max_test_per_class=3), IDENTITY)
    assert (len(cut.train), len(cut.test)) == (50, 30)
    assert np.bincount(cut.test.targets).tolist() == [3] * 10
    keep = first_per_class(whole.train.targets, 5)
    assert np.array_equal(cut.train.targets, whole.train.targets[keep])
    assert torch.equal(cut.train[7][0], whole.train[int(keep[7])][0])
    assert cut.transform_id == f"{whole.transform_id}-cap5,3"
    assert cap_per_class(whole, None, None) is whole


# ---------------------------------------------------------------------------------------------- fashion-clip
TINY_FASHION = FashionClipRecipe(embed_dim=16, patch_size=7, vision_width=32, vision_layers=1, vision_head_width=16,
                                 text_width=32, text_heads=2, text_layers=1, steps=3, batch_size=8, warmup_steps=1,
                                 classes=(0, 1, 2), skip_per_class=2)


def test_fashion_recipe_hash_covers_its_fields_and_differs_from_shapes():
    assert recipe_hash(DEFAULT_RECIPE) == "276b02ba548eea41"  # shapes-clip's cache key is unchanged
    assert len({recipe_hash(FASHION_RECIPE), recipe_hash(DEFAULT_RECIPE), recipe_hash(TINY_FASHION)}) == 3
    assert recipe_hash(dataclasses.replace(TINY_FASHION, classes=(0, 1, 3))) != recipe_hash(TINY_FASHION)
    assert recipe_hash(dataclasses.replace(TINY_FASHION, skip_per_class=3)) != recipe_hash(TINY_FASHION)
    assert FASHION_RECIPE.model_cfg()["vision_cfg"]["image_size"] == 28 and FASHION_RECIPE.classnames() == [
        "t-shirt or top", "trouser", "pullover", "dress", "coat"]


def test_fashion_clip_builds_once_from_real_format_files(tmp_path, no_debian, monkeypatch):
    write_fashion(tmp_path / "data" / "FashionMNIST" / "raw", n_train=4)
    path = build_clip(tmp_path / "cache", TINY_FASHION, progress=False, data_root=tmp_path / "data")
    assert path == clip_path(tmp_path / "cache", TINY_FASHION)
    assert path.name == f"fashion-clip-{recipe_hash(TINY_FASHION)}.pt"
    saved = torch.load(path, weights_only=True)
    assert saved["recipe"]["classes"] == (0, 1, 2) and saved["preprocess"]["image_size"] == 28
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached file should have been reused")

    train_clip = pretrain.train_clip
    monkeypatch.setattr(pretrain, "train_clip", no_training)
    assert build_clip(tmp_path / "cache", TINY_FASHION, progress=False, data_root=tmp_path / "data") == path
    again = train_clip(TINY_FASHION, progress=False, data_root=tmp_path / "data").state_dict()
    assert all(torch.equal(again[k], saved["state_dict"][k]) for k in again)  # the same recipe, the same weights


def test_fashion_clip_stream_skips_the_clients_images(tmp_path, no_debian):
    arrays = write_fashion(tmp_path / "FashionMNIST" / "raw", n_train=4)
    stream = TINY_FASHION.stream(tmp_path)
    train_images, train_labels = arrays["train"]
    for new_label, label in enumerate(TINY_FASHION.classes):
        kept = torch.from_numpy(train_images[train_labels == label][2:])  # the first 2 of the class are skipped
        assert torch.equal(stream.pool[stream.offsets[new_label]:stream.offsets[new_label] + 2], kept)
    generator = torch.Generator().manual_seed(0)
    labels = stream.labels(generator, 16)
    images = stream.images(labels, generator)
    assert images.shape == (16, 3, 28, 28) and labels.max() < 3 and 0.0 <= images.min() <= images.max() <= 1.0


def test_fashion_clip_without_the_dataset_writes_nothing(tmp_path, no_debian):
    with pytest.raises(UserError, match=r"^backbone fashion-clip is pretrained on Fashion-MNIST: Fashion-MNIST not "
                                        r"found .*apt-get install dataset-fashion-mnist"):
        build_clip(tmp_path / "cache", TINY_FASHION, progress=False, data_root=tmp_path / "data")
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------------ end to end
def test_a_short_federated_run_on_real_digits(tmp_path, single_thread):
    out_dir = tmp_path / "runs"
    code = main(FAST + [f"run.out_dir={out_dir}", f"backbone.cache_dir={cache_dir()}", "data.name=digits",
                        "data.num_clients=3", "data.shots=4", "data.max_test_per_class=10", "fed.rounds=2",
                        "algorithm=promptfl", "perf.disk_cache=false"])
    assert code == 0
    run_dir = only_run_dir(out_dir)
    partition = json.loads((run_dir / "partition.json").read_text())
    assert partition["params"]["dataset"] == "digits" and partition["num_classes"] == 10
    assert all(set(row) <= {0, 4} for row in partition["train_label_histogram"])  # 4 shots of each owned class
    assert all(set(row) <= {0, 10} for row in partition["test_label_histogram"])  # the first 10 test images a class
    results = read_results(run_dir)
    assert results["dataset"] == "digits" and len(results["rounds"]) == 2
    accuracies = results["rounds"][-1]["accuracy"]
    assert len(accuracies) == 3 and all(0.0 <= a <= 1.0 for a in accuracies)


def test_dirichlet_and_base_to_novel_run_on_fashion_mnist_files(tmp_path, no_debian, single_thread):
    write_fashion(tmp_path / "data" / "FashionMNIST" / "raw", n_train=6, n_test=4)
    out_dir = tmp_path / "runs"
    common = FAST + [f"backbone.cache_dir={cache_dir()}", "data.name=fashion_mnist", f"data.root={tmp_path / 'data'}",
                     "data.num_clients=2", "fed.rounds=1", "algorithm=promptfl", "perf.disk_cache=false"]
    assert main(common + [f"run.out_dir={out_dir / 'dir'}", "data.partition=dirichlet", "data.min_size=2"]) == 0
    partition = json.loads((only_run_dir(out_dir / "dir") / "partition.json").read_text())
    assert partition["scheme"] == "dirichlet" and sum(partition["train_sizes"]) == 60  # every train image dealt
    assert main(common + [f"run.out_dir={out_dir / 'b2n'}", "eval.protocol=base2novel", "data.shots=2"]) == 0
    results = read_results(only_run_dir(out_dir / "b2n"))
    final = results["rounds"][-1]
    assert 0.0 <= final["acc_novel_mean"] <= 1.0 and 0.0 <= final["acc_hm_mean"] <= 1.0
    histogram = np.array(json.loads((only_run_dir(out_dir / "b2n") / "partition.json").read_text())
                         ["train_label_histogram"])
    assert histogram[:, 5:].sum() == 0 and histogram[:, :5].sum() == 2 * 5  # trained on the base half only


def test_the_run_summary_estimates_the_clients_real_images(tmp_path):
    from fedlit.config import load_config
    from fedlit.summary import train_images_per_client

    def images(*overrides: str) -> float | None:
        return train_images_per_client(load_config(None, [f"run.out_dir={tmp_path}", "algorithm=promptfl", *overrides]))

    assert images("data.name=fashion_mnist", "data.partition=dirichlet", "data.num_clients=5",
                  "data.max_train_per_class=32") == 64.0
    assert images("data.name=digits", "data.partition=iid", "data.num_clients=4") == 338.0
    assert images("data.name=digits", "data.partition=pathological", "data.shots=4", "data.num_clients=5") == 8.0


def test_caps_are_refused_on_shapes_and_below_one(tmp_path):
    from fedlit.config import ConfigError, load_config

    for overrides, expected in ((["data.max_test_per_class=5"], "data.max_test_per_class cuts a real dataset; shapes "
                                 "generates data.test_per_class images per class: set that instead"),
                                (["data.name=digits", "data.max_train_per_class=0"],
                                 "data.max_train_per_class must be >= 1 (got 0)")):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"run.out_dir={tmp_path}", *overrides])
        assert str(err.value) == expected
