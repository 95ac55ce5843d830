"""Real dataset loaders and transforms, on tiny files written in each dataset's real on-disk format."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fedlit.data.transforms as tf
from fedlit.config import DataConfig
from fedlit.data import datasets
from fedlit.data.base import Preprocess
from fedlit.data.registry import DATASET_NAMES, build_dataset
from fedlit.errors import UserError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PRE = Preprocess(image_size=32, mean=MEAN, std=STD)


def cfg(name: str, root: Path, **kw) -> DataConfig:
    return DataConfig(name=name, root=str(root), **kw)


def write_image(path: Path, color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def normalized(color: tuple[int, int, int]) -> torch.Tensor:
    """The per-channel value a constant image of ``color`` has after the test transform."""
    return (torch.tensor(color, dtype=torch.float32) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)


# ----------------------------------------------------------------------------------------- transforms
def test_test_transform_pil_and_tensor_inputs():
    t = tf.test_transform(PRE)
    out = t(Image.new("RGB", (40, 20), (128, 64, 255)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, normalized((128, 64, 255))[:, None, None].expand(3, 32, 32))
    gray = t(Image.new("L", (32, 32), 51))  # converted to RGB
    torch.testing.assert_close(gray[:, 0, 0], normalized((51, 51, 51)))
    x = torch.full((3, 48, 64), 0.25)
    out = t(x)
    assert out.shape == (3, 32, 32)
    expected = (0.25 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out, expected[:, None, None].expand(3, 32, 32))


def test_test_transform_crops_centre():
    # left half black, right half white, 64x32: resize keeps 64x32, the centre crop sees both halves equally
    img = np.zeros((32, 64, 3), dtype=np.uint8)
    img[:, 32:] = 255
    out = tf.test_transform(PRE)(Image.fromarray(img))
    torch.testing.assert_close(out[:, 0, 0], normalized((0, 0, 0)))
    torch.testing.assert_close(out[:, 0, 31], normalized((255, 255, 255)))
    assert (out[0, 0, :16] < 0).all() and (out[0, 0, 16:] > 0).all()


def test_train_transform_random_only_with_augment():
    img = Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3))
    aug = tf.train_transform(PRE, augment=True)
    torch.manual_seed(0)
    a = aug(img)
    b = aug(img)
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(aug(img), a)
    plain = tf.train_transform(PRE, augment=False)
    assert torch.equal(plain(img), tf.test_transform(PRE)(img))


def test_transform_id_is_stable_and_specific():
    assert tf.transform_id(PRE) == tf.transform_id(Preprocess(32, MEAN, STD))
    assert tf.transform_id(PRE).startswith("resize32-bicubic-centercrop32-mean0.48145466,")
    assert tf.transform_id(PRE) != tf.transform_id(Preprocess(224, MEAN, STD))
    assert tf.transform_id(PRE) != tf.transform_id(Preprocess(32, (0.5, 0.5, 0.5), STD))
    assert tf.transform_id(PRE) != tf.transform_id(Preprocess(32, MEAN, STD, "bilinear"))


def test_transform_bad_inputs():
    with pytest.raises(ValueError, match="unknown interpolation 'lanczos4'"):
        tf.test_transform(Preprocess(32, MEAN, STD, "lanczos4"))
    with pytest.raises(ValueError, match=r"shape \(3, H, W\)"):
        tf.test_transform(PRE)(torch.zeros(1, 8, 8))


# ---------------------------------------------------------------------------------------------- CIFAR
def cifar_batch(path: Path, labels: list[int], key: str = "labels", start: int = 0) -> np.ndarray:
    """Write a CIFAR python batch as the real files are (a protocol-2 pickle of a dict with bytes keys and a uint8
    array); image i is constant (R, G, B) = (start+i, 100+start+i, 200)."""
    n = len(labels)
    hwc = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        hwc[i] = (start + i, 100 + start + i, 200)
    data = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)  # CIFAR rows: 1024 R, 1024 G, 1024 B
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {b"batch_label": b"x", key.encode(): labels, b"data": data,
             b"filenames": [f"img_{start + i}.png".encode() for i in range(n)]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return hwc


def cifar_meta(path: Path, key: str, names: list[str]) -> None:
    """Write a CIFAR meta file (class names as bytes, as in the real files)."""
    with open(path, "wb") as f:
        pickle.dump({key.encode(): [n.encode() for n in names], b"num_vis": 3072}, f, protocol=2)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar10(root: Path) -> dict[str, list[int]]:
    folder = root / "cifar-10-batches-py"
    train = []
    for b in range(5):
        labels = [2 * b, 2 * b + 1]
        cifar_batch(folder / f"data_batch_{b + 1}", labels, start=2 * b)
        train += labels
    cifar_batch(folder / "test_batch", [9, 0, 4], start=50)
    cifar_meta(folder / "batches.meta", "label_names", CIFAR10_NAMES)
    return {"train": train, "test": [9, 0, 4]}


def test_cifar10_from_python_batches(tmp_path):
    labels = make_cifar10(tmp_path)
    b = build_dataset(cfg("cifar10", tmp_path), PRE)
    assert b.classnames == CIFAR10_NAMES and b.num_classes == 10
    assert len(b.train) == 10 and len(b.test) == 3
    assert b.train.targets.tolist() == labels["train"] and b.test.targets.tolist() == [9, 0, 4]
    assert b.train.targets.dtype == np.int64 and b.train.domains is None and b.domain_names is None
    # the (N, 3072) planar rows become HWC images: pixel (R, G, B) = (i, 100 + i, 200)
    assert np.asarray(b.train.load_image(7))[5, 9].tolist() == [7, 107, 200]
    assert np.asarray(b.test.load_image(1))[0, 0].tolist() == [51, 151, 200]
    x, y = b.test[1]
    assert x.shape == (3, 32, 32) and y == 0
    torch.testing.assert_close(x[:, 3, 3], normalized((51, 151, 200)))
    assert b.augmented is False and b.transform_id == tf.transform_id(PRE)
    assert torch.equal(b.train[3][0], b.train[3][0])  # no augmentation for CIFAR by default


def test_cifar100_fine_labels_and_clean_names(tmp_path):
    folder = tmp_path / "cifar-100-python"
    cifar_batch(folder / "train", [0, 2, 1, 2], key="fine_labels")
    cifar_batch(folder / "test", [1], key="fine_labels")
    cifar_meta(folder / "meta", "fine_label_names", ["apple", "aquarium_fish", "maple_tree"])
    b = build_dataset(cfg("cifar100", tmp_path), PRE)
    assert b.classnames == ["apple", "aquarium fish", "maple tree"]
    assert b.train.targets.tolist() == [0, 2, 1, 2] and b.test.targets.tolist() == [1]


def test_cifar_errors(tmp_path):
    with pytest.raises(UserError, match=r"expected .*cifar-10-batches-py; set data.download=true"):
        build_dataset(cfg("cifar10", tmp_path), PRE)
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"cannot read .*test_batch: not a CIFAR python pickle"):
        build_dataset(cfg("cifar10", tmp_path), PRE)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(UserError, match=r"CIFAR-10 file not found: .*test_batch"):
        build_dataset(cfg("cifar10", tmp_path), PRE)


# ------------------------------------------------------------------------------------------ Caltech101
def test_caltech101_torchvision_layout_coop_names_and_split(tmp_path):
    cats = tmp_path / "caltech101" / "101_ObjectCategories"
    for c in ("BACKGROUND_Google", "Faces_easy"):
        for i in range(1, 3):
            write_image(cats / c / f"image_{i:04d}.jpg")
    for k, c in enumerate(("Faces", "Leopards", "airplanes", "crocodile_head")):
        for i in range(1, 11):
            write_image(cats / c / f"image_{i:04d}.jpg", (20 * k, i, 0))
    b = build_dataset(cfg("caltech101", tmp_path), PRE)
    # sorted folder names (upper case first), ignored classes dropped, CoOp's renames, underscores -> spaces
    assert b.classnames == ["face", "leopard", "airplane", "crocodile head"]
    # per class of 10: round(5.0) = 5 train, round(2.0) = 2 val (unused), 3 test
    assert len(b.train) == 20 and len(b.test) == 12
    assert np.bincount(b.train.targets).tolist() == [5, 5, 5, 5]
    assert np.bincount(b.test.targets).tolist() == [3, 3, 3, 3]
    assert not set(b.train.paths) & set(b.test.paths)
    for path, label in zip(b.train.paths + b.test.paths, b.train.targets.tolist() + b.test.targets.tolist()):
        assert Path(path).parent.name == ("Faces", "Leopards", "airplanes", "crocodile_head")[label]
    assert build_dataset(cfg("caltech101", tmp_path), PRE).train.paths == b.train.paths  # deterministic
    assert b.augmented is True
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and y == 0


def write_split(path: Path, splits: dict[str, list[list]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(splits))


def test_caltech101_coop_split_file(tmp_path):
    folder = tmp_path / "caltech-101"  # CoOp's folder name
    entries = {"train": [["accordion/image_0001.jpg", 1, "accordion"], ["Faces/image_0001.jpg", 0, "face"],
                         ["Faces/image_0002.jpg", 0, "face"]],
               "val": [["anchor/image_0001.jpg", 2, "anchor"]],
               "test": [["accordion/image_0002.jpg", 1, "accordion"]]}
    for split in entries.values():
        for rel, _, _ in split:
            write_image(folder / "101_ObjectCategories" / rel)
    write_split(folder / "split_zhou_Caltech101.json", entries)
    b = build_dataset(cfg("caltech101", tmp_path), PRE)
    assert b.classnames == ["face", "accordion", "anchor"]  # ordered by label, val's class included
    assert b.train.targets.tolist() == [1, 0, 0] and b.test.targets.tolist() == [1]
    assert b.train.paths[0] == str(folder / "101_ObjectCategories" / "accordion" / "image_0001.jpg")
    assert b.test[0][0].shape == (3, 32, 32)


def test_coop_layout_without_split_file_and_bad_split_files(tmp_path):
    folder = tmp_path / "oxford_flowers"
    write_image(folder / "jpg" / "image_00001.jpg")
    with pytest.raises(UserError, match="has CoOp's layout but no split_zhou_OxfordFlowers.json"):
        build_dataset(cfg("flowers102", tmp_path), PRE)
    split = folder / "split_zhou_OxfordFlowers.json"
    split.write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read CoOp split file .*split_zhou_OxfordFlowers.json"):
        build_dataset(cfg("flowers102", tmp_path), PRE)
    write_split(split, {"train": [["image_00001.jpg", 0, "a"]], "test": [["image_00001.jpg", 0, "b"]]})
    with pytest.raises(ValueError, match="label 0 is named both 'a' and 'b'"):
        build_dataset(cfg("flowers102", tmp_path), PRE)
    write_split(split, {"train": [["image_00001.jpg", 0, "a"]], "test": [["image_00001.jpg", 2, "c"]]})
    with pytest.raises(ValueError, match=r"labels are not 0..C-1 \(no sample of label\(s\) \[1\]\)"):
        build_dataset(cfg("flowers102", tmp_path), PRE)
    write_split(split, {"train": [["missing.jpg", 0, "a"]], "test": [["image_00001.jpg", 0, "a"]]})
    with pytest.raises(UserError, match=r"missing.jpg \(listed in .*\) not found: .* relative to"):
        build_dataset(cfg("flowers102", tmp_path), PRE)


# ------------------------------------------------------------------------------------------ OxfordPets
def test_oxford_pets_annotation_files(tmp_path):
    folder = tmp_path / "oxford-iiit-pet"
    trainval = [("Abyssinian_1", 1, 1), ("american_bulldog_10", 2, 2), ("Bengal_3", 3, 1),
                ("Abyssinian_7", 1, 1)]
    test = [("american_bulldog_2", 2, 2), ("Bengal_5", 3, 1)]
    for name, rows in (("trainval", trainval), ("test", test)):
        lines = [f"{img} {label} {species} 1" for img, label, species in rows]
        (folder / "annotations").mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / f"{name}.txt").write_text("\n".join(lines) + "\n")
        for img, _, _ in rows:
            write_image(folder / "images" / f"{img}.jpg")
    b = build_dataset(cfg("oxford_pets", tmp_path), PRE)
    assert b.classnames == ["abyssinian", "american bulldog", "bengal"]
    assert b.train.targets.tolist() == [0, 1, 2, 0] and b.test.targets.tolist() == [1, 2]
    assert Path(b.test.paths[0]).name == "american_bulldog_2.jpg"
    (folder / "annotations" / "test.txt").unlink()
    with pytest.raises(UserError, match=r"OxfordPets file not found: .*annotations/test.txt"):
        build_dataset(cfg("oxford_pets", tmp_path), PRE)


# ------------------------------------------------------------------------------------------ Flowers102
def test_flowers102_names_match_torchvision():
    from torchvision.datasets import Flowers102

    assert list(datasets.FLOWERS102_CLASSNAMES) == Flowers102.classes
    assert len(set(datasets.FLOWERS102_CLASSNAMES)) == 102


def test_flowers102_coop_split_file(tmp_path):
    folder = tmp_path / "flowers-102"  # torchvision's folder; the split file takes precedence
    entries = {"train": [["image_00003.jpg", 1, "hard-leaved pocket orchid"],
                         ["image_00001.jpg", 0, "pink primrose"]],
               "val": [], "test": [["image_00002.jpg", 0, "pink primrose"]]}
    for i in (1, 2, 3):
        write_image(folder / "jpg" / f"image_{i:05d}.jpg")
    write_split(folder / "split_zhou_OxfordFlowers.json", entries)
    b = build_dataset(cfg("flowers102", tmp_path), PRE)
    assert b.classnames == ["pink primrose", "hard-leaved pocket orchid"]
    assert b.train.targets.tolist() == [1, 0] and len(b.test) == 1
    # use_split_file=false: the official .mat files are required instead
    with pytest.raises(UserError, match=r"imagelabels.mat"):
        build_dataset(cfg("flowers102", tmp_path, use_split_file=False), PRE)


def test_flowers102_without_scipy_says_how(tmp_path, monkeypatch):
    write_image(tmp_path / "flowers-102" / "jpg" / "image_00001.jpg")
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes `from scipy.io import ...` fail
    with pytest.raises(UserError, match=r"imagelabels.mat needs scipy \(pip install scipy\), or put CoOp"):
        build_dataset(cfg("flowers102", tmp_path), PRE)


def test_flowers102_mat_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="scipy is needed to write/read Flowers102 .mat files")
    folder = tmp_path / "flowers-102"
    labels = np.array([1, 102, 5, 1, 5, 102, 3], dtype=np.uint8)  # 1-based, image i has labels[i - 1]
    folder.mkdir()
    scipy_io.savemat(folder / "imagelabels.mat", {"labels": labels})
    scipy_io.savemat(folder / "setid.mat", {"trnid": np.array([1, 2]), "valid": np.array([3]),
                                            "tstid": np.array([4, 5, 6, 7])})
    for i in range(1, 8):
        write_image(folder / "jpg" / f"image_{i:05d}.jpg")
    b = build_dataset(cfg("flowers102", tmp_path), PRE)
    assert b.classnames == list(datasets.FLOWERS102_CLASSNAMES)
    assert b.train.targets.tolist() == [0, 101, 4] and b.test.targets.tolist() == [0, 4, 101, 2]
    assert Path(b.test.paths[3]).name == "image_00007.jpg"
    (folder / "setid.mat").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read .*setid.mat"):
        build_dataset(cfg("flowers102", tmp_path), PRE)


# --------------------------------------------------------------------------------------------- Food101
def make_food(root: Path) -> None:
    folder = root / "food-101"
    meta = {"train": {"baby_back_ribs": ["baby_back_ribs/11", "baby_back_ribs/12"],
                      "apple_pie": ["apple_pie/1"]},
            "test": {"apple_pie": ["apple_pie/2"], "baby_back_ribs": ["baby_back_ribs/13"]}}
    (folder / "meta").mkdir(parents=True)
    for split, content in meta.items():
        (folder / "meta" / f"{split}.json").write_text(json.dumps(content))
        for rels in content.values():
            for rel in rels:
                write_image(folder / "images" / f"{rel}.jpg", (200, 10, 10))


def test_food101_meta_json(tmp_path):
    make_food(tmp_path)
    b = build_dataset(cfg("food101", tmp_path), PRE)
    assert b.classnames == ["apple pie", "baby back ribs"]
    assert sorted(zip(b.train.targets.tolist(), [Path(p).name for p in b.train.paths])) == [
        (0, "1.jpg"), (1, "11.jpg"), (1, "12.jpg")]
    assert len(b.test) == 2
    assert b.augmented is True
    plain = build_dataset(cfg("food101", tmp_path, augment=False), PRE)
    assert plain.augmented is False
    torch.testing.assert_close(plain.train[0][0][:, 5, 5], normalized((200, 10, 10)), atol=0.05, rtol=0)


def test_corrupt_image_names_the_file(tmp_path):
    make_food(tmp_path)
    bad = tmp_path / "food-101" / "images" / "apple_pie" / "2.jpg"
    bad.write_bytes(b"not a jpeg")
    b = build_dataset(cfg("food101", tmp_path), PRE)
    i = b.test.paths.index(str(bad))
    with pytest.raises(ValueError, match=r"cannot read image .*apple_pie/2.jpg: corrupt or not an image"):
        b.test[i]
    bad.unlink()
    with pytest.raises(UserError, match=r"image file not found: .*apple_pie/2.jpg"):
        b.test[i]


# ------------------------------------------------------------------------------------------------- DTD
def test_dtd_torchvision_partition1(tmp_path):
    data = tmp_path / "dtd" / "dtd"
    files = {"train1": ["banded/banded_0001.jpg", "zigzagged/zigzagged_0001.jpg"],
             "val1": ["cracked/cracked_0001.jpg"],
             "test1": ["banded/banded_0002.jpg", "cracked/cracked_0002.jpg", "zigzagged/zigzagged_0002.jpg"]}
    (data / "labels").mkdir(parents=True)
    for split, rels in files.items():
        (data / "labels" / f"{split}.txt").write_text("\n".join(rels) + "\n")
        for rel in rels:
            write_image(data / "images" / rel)
    b = build_dataset(cfg("dtd", tmp_path), PRE)
    assert b.classnames == ["banded", "cracked", "zigzagged"]
    # torchvision numbers each split's classes on its own (train1 has 2); labels are re-aligned by name
    assert b.train.targets.tolist() == [0, 2, 1] and b.test.targets.tolist() == [0, 1, 2]


def test_dtd_coop_layout_split_file(tmp_path):
    folder = tmp_path / "dtd"
    entries = {"train": [["banded/banded_0001.jpg", 0, "banded"], ["lined/lined_0001.jpg", 1, "lined"]],
               "val": [], "test": [["lined/lined_0002.jpg", 1, "lined"]]}
    for rel in ("banded/banded_0001.jpg", "lined/lined_0001.jpg", "lined/lined_0002.jpg"):
        write_image(folder / "images" / rel)
    write_split(folder / "split_zhou_DescribableTextures.json", entries)
    b = build_dataset(cfg("dtd", tmp_path), PRE)
    assert b.classnames == ["banded", "lined"] and b.train.targets.tolist() == [0, 1]
    assert b.test.paths == [str(folder / "images" / "lined" / "lined_0002.jpg")]


# ----------------------------------------------------------------------------------- domain datasets
def test_domainnet_lists_filtered_and_relabelled_by_name(tmp_path):
    folder = tmp_path / "domainnet"
    official = {"aircraft_carrier": 0, "bird": 39, "zebra": 344, "ice_cream": 148}  # the lists' own ids
    rows = {"train": ["bird", "aircraft_carrier", "zebra", "ice_cream"],
            "test": ["zebra", "aircraft_carrier"]}
    for domain in datasets.DOMAINNET_DOMAINS:
        for split, classes in rows.items():
            lines = []
            for j, c in enumerate(classes):
                rel = f"{domain}/{c}/{domain}_{split}_{j}.jpg"
                write_image(folder / rel)
                lines.append(f"{rel} {official[c]}")
            (folder / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    b = build_dataset(cfg("domainnet", tmp_path), PRE)
    assert b.classnames == ["bird", "feather", "headphones", "ice cream", "teapot", "tiger", "whale",
                            "windmill", "wine glass", "zebra"]
    assert b.domain_names == ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
    assert b.train.targets.tolist() == [0, 9, 3] * 6 and b.test.targets.tolist() == [9] * 6
    assert b.train.domains.tolist() == [d for d in range(6) for _ in range(3)]
    assert b.test.domains.tolist() == list(range(6))
    assert Path(b.test.paths[4]).name == "real_test_0.jpg"
    assert b.augmented is False and b.train[0][0].shape == (3, 32, 32)
    (folder / "sketch_test.txt").unlink()
    with pytest.raises(UserError, match=r"DomainNet list not found: .*sketch_test.txt; .*ai.bu.edu"):
        build_dataset(cfg("domainnet", tmp_path), PRE)
    (folder / "sketch_test.txt").write_text("sketch/aircraft_carrier/x.jpg 0\n")
    with pytest.raises(ValueError, match=r"sketch_test.txt lists no image of the classes bird, feather"):
        build_dataset(cfg("domainnet", tmp_path), PRE)


def make_office(root: Path, per_class: int = 5) -> None:
    for domain in datasets.OFFICE_DOMAINS:
        for label, c in enumerate(datasets.OFFICE_CLASSES):
            for i in range(per_class):
                write_image(root / "office_caltech10" / domain / c / f"{i}.png", (label, i, 0))
        (root / "office_caltech10" / domain / "back_pack" / "notes.txt").write_text("not an image")


def test_office_caltech10_seeded_split(tmp_path):
    make_office(tmp_path)
    b = build_dataset(cfg("office_caltech10", tmp_path), PRE)
    assert b.classnames == ["back pack", "bike", "calculator", "headphones", "keyboard", "laptop computer",
                            "monitor", "mouse", "mug", "projector"]
    assert b.domain_names == ["amazon", "caltech", "dslr", "webcam"]
    # 5 images per (domain, class): (5 + 2) // 5 = 1 test, 4 train
    assert len(b.train) == 160 and len(b.test) == 40
    assert np.bincount(b.test.targets).tolist() == [4] * 10
    assert np.bincount(b.test.domains).tolist() == [10] * 4
    assert not set(b.train.paths) & set(b.test.paths)
    for path, label, domain in zip(b.test.paths, b.test.targets, b.test.domains):
        parts = Path(path).parts
        assert parts[-2] == datasets.OFFICE_CLASSES[label] and parts[-3] == datasets.OFFICE_DOMAINS[domain]
    assert build_dataset(cfg("office_caltech10", tmp_path), PRE).test.paths == b.test.paths
    x, y = b.test[0]
    assert x.shape == (3, 32, 32) and y == 0


def test_office_caltech10_list_files(tmp_path):
    make_office(tmp_path, per_class=2)
    folder = tmp_path / "office_caltech10"
    (folder / "dslr_train.txt").write_text("dslr/mug/0.png 7\ndslr/bike/0.png 0\ndslr/bike/1.png 0\n")
    with pytest.raises(UserError, match=r"dslr_test.txt is missing while .*dslr_train.txt exists"):
        build_dataset(cfg("office_caltech10", tmp_path), PRE)
    (folder / "dslr_test.txt").write_text("dslr/mug/1.png 7\n")
    b = build_dataset(cfg("office_caltech10", tmp_path), PRE)
    dslr = b.train.domains == 2
    assert b.train.targets[dslr].tolist() == [8, 1, 1]  # labels by class name (mug = 8), not the file's
    assert b.test.targets[b.test.domains == 2].tolist() == [8]
    # the other domains: (2 + 2) // 5 = 0 test images per class
    assert len(b.train) == 3 + 3 * 20 and len(b.test) == 1


# ------------------------------------------------------------------------------------------- registry
def test_registry_names_and_unknown_dataset(tmp_path):
    assert DATASET_NAMES == ("shapes", "cifar10", "cifar100", "caltech101", "oxford_pets", "flowers102",
                             "food101", "dtd", "domainnet", "office_caltech10", "fashion_mnist", "digits")
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; choose one of shapes, cifar10, .*dtd"):
        build_dataset(cfg("imagenet", tmp_path), PRE)


EXPECTED_PATHS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
                  "caltech101": "caltech101/101_ObjectCategories", "oxford_pets": "oxford-iiit-pet/images",
                  "flowers102": "flowers-102/jpg", "food101": "food-101/images", "dtd": "dtd/dtd/images",
                  "domainnet": "domainnet", "office_caltech10": "office_caltech10/amazon"}


@pytest.mark.parametrize("name", sorted(EXPECTED_PATHS))
def test_missing_root_names_path_and_remedy(tmp_path, name):
    with pytest.raises(UserError) as err:
        build_dataset(cfg(name, tmp_path / "nowhere"), PRE)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "nowhere" / EXPECTED_PATHS[name]) in message
    if name in ("domainnet", "office_caltech10"):
        assert "torchvision cannot download" in message and "http" in message
    else:
        assert "set data.download=true" in message
    assert not (tmp_path / "nowhere").exists()  # nothing created when not downloading
