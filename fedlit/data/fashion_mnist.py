"""Fashion-MNIST (Xiao et al., 2017): 70,000 real 28x28 grayscale product photos of Zalando, 10 classes.

Read from the four idx-ubyte files of the official release (gzipped or not), found in the first of these folders
that holds all four:

1. ``<data.root>/FashionMNIST/raw/`` (torchvision's layout; ``data.download=true`` lets torchvision fetch it there),
2. ``<data.root>/fashion-mnist/`` (the release's own folder, e.g. a copy of the Debian one),
3. ``/usr/share/datasets/fashion-mnist/`` (Debian's package ``dataset-fashion-mnist``: ``apt-get install
   dataset-fashion-mnist``).

The split is the official one: the 60,000 images of ``train-*`` and the 10,000 of ``t10k-*``, in file order. A
requested Fashion-MNIST that is in none of these places is a one-line :class:`~fedlit.errors.UserError` saying how
to install it; nothing falls back to another dataset.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from fedlit.config import DataConfig
from fedlit.data.base import DatasetBundle, LabeledImages, Preprocess
from fedlit.data.datasets import _bundle, _torchvision_download
from fedlit.errors import UserError

# label id -> name (the release's names, lower-cased, "T-shirt/top" spelt out for a tokenizer)
FASHION_CLASSNAMES = ["t-shirt or top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle boot"]
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_FOLDER = Path("FashionMNIST") / "raw"
RELEASE_FOLDER = Path("fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
IMAGE_SIZE = 28
INSTALL_HINT = (f"install it with `apt-get install {DEBIAN_PACKAGE}` (Debian/Ubuntu; `make setup` does it), or put "
                f"torchvision's FashionMNIST/raw/*-idx*-ubyte.gz under data.root (data.download=true fetches them)")
# idx type codes (the third byte of the magic number) -> numpy dtype, big-endian as the format stores them
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class MissingDataset(LookupError):
    """A real dataset's files are not where they were looked for (the message says where and how to install)."""


def read_idx(path: str | Path) -> np.ndarray:
    """The array in the idx file ``path`` (``.gz`` read through gzip): magic ``0x0000TTDD`` (type code ``TT``,
    ``DD`` dimensions), ``DD`` big-endian uint32 sizes, then the data; returned in native byte order with the file's
    shape, e.g. ``(60000, 28, 28)`` uint8 for images and ``(60000,)`` for labels. A malformed file raises
    ``ValueError`` naming it."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:  # gzip reports a damaged stream as either
        raise ValueError(f"cannot read {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but its header {shape} needs {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def candidate_folders(root: str | Path) -> list[Path]:
    """The folders looked in, in order: torchvision's and the release's under ``root``, then Debian's."""
    root = Path(root).expanduser()
    return [root / TORCHVISION_FOLDER, root / RELEASE_FOLDER, DEBIAN_FOLDER]


def find_fashion_mnist(root: str | Path) -> Path:
    """The first of :func:`candidate_folders` holding all four idx files; :class:`MissingDataset` if none does."""
    for folder in candidate_folders(root):
        if all(_file(folder, stem) is not None for pair in FILES.values() for stem in pair):
            return folder
    looked = ", ".join(str(f) for f in candidate_folders(root))
    raise MissingDataset(f"Fashion-MNIST not found (looked in {looked}); {INSTALL_HINT}")


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``(N, 28, 28)`` and labels int64 ``(N,)`` of ``split`` (``train`` or ``test``) in ``folder``
    (the official files hold 60,000 / 10,000; any N is read, so that tests can write small files)."""
    images_path, labels_path = (_file(folder, stem) for stem in FILES[split])
    if images_path is None or labels_path is None:
        raise MissingDataset(f"Fashion-MNIST {split} files missing in {folder}; {INSTALL_HINT}")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
    if labels.size and not 0 <= labels.min() <= labels.max() < len(FASHION_CLASSNAMES):
        raise ValueError(f"{labels_path}: labels outside 0..{len(FASHION_CLASSNAMES) - 1}")
    return images, labels.astype(np.int64)


class GrayImages(LabeledImages):
    """A split of grayscale images held in memory: ``images`` uint8 ``(N, H, W)``; ``load_image(i)`` is the uint8
    tensor ``(3, H, W)`` (the gray channel repeated, what an RGB CLIP takes)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform=None) -> None:
        if images.ndim != 3 or len(images) != len(targets):
            raise ValueError(f"images must be (N, H, W) with N = len(targets); got {images.shape}, {len(targets)}")
        self.images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def load_image(self, index: int) -> torch.Tensor:
        """The image ``index`` as uint8 ``(3, H, W)``."""
        return self.images[index].expand(3, -1, -1)


def build_fashion_mnist(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """Fashion-MNIST's official split (60,000 train, 10,000 test, 10 classes) from :func:`find_fashion_mnist`,
    with the transforms of ``preprocess`` (no augmentation unless ``data.augment=true``); missing files ->
    one-line UserError with the install command. ``data.download=true`` lets torchvision fetch the release into
    ``<data.root>/FashionMNIST/raw`` first when no folder holds it."""
    try:
        folder = find_fashion_mnist(cfg.root)
    except MissingDataset as missing:
        if not cfg.download:
            raise UserError(str(missing)) from None
        root = Path(cfg.root).expanduser()
        _torchvision_download("Fashion-MNIST", root, lambda tv: tv.FashionMNIST(str(root), download=True))
        folder = find_fashion_mnist(cfg.root)
    try:
        train, test = (load_split(folder, split) for split in ("train", "test"))
    except (MissingDataset, ValueError) as err:
        raise UserError(f"{err}; {INSTALL_HINT}") from None
    return _bundle(cfg, preprocess, list(FASHION_CLASSNAMES), GrayImages(*train), GrayImages(*test),
                   augment_default=False)
