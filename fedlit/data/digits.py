"""scikit-learn's bundled *digits* (the UCI optical handwritten digits test set): 1,797 real 8x8 images, 10 classes.

The images ship inside scikit-learn (``sklearn.datasets.load_digits``, nothing downloaded); install it with
``pip install 'fedlit[digits]'``. Pixel values 0..16 become uint8 ``round(v * 255 / 16)``. There is no official
split, so fedlit fixes one: per class, the samples (in scikit-learn's order) are permuted by
``numpy.random.default_rng([0, label])`` and the first ``n // 4`` are test, the rest train (1,352 train and 445 test
images in all), the same on every machine and for every run seed.
"""

from __future__ import annotations

import numpy as np

from fedlit.config import DataConfig
from fedlit.data.base import DatasetBundle, Preprocess
from fedlit.data.datasets import _bundle
from fedlit.data.fashion_mnist import GrayImages
from fedlit.errors import UserError

DIGITS_CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_EXTRA = "digits"  # the pyproject extra that installs scikit-learn
TEST_SHARE_DENOMINATOR = 4  # per class, n // 4 samples are test


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images ``(1797, 8, 8)`` (0..16 scaled to 0..255) and int64 labels
    ``(1797,)``; without scikit-learn, a one-line UserError naming the extra that installs it."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(f"data.name=digits needs scikit-learn: pip install 'fedlit[{DIGITS_EXTRA}]' "
                        "(or pip install scikit-learn)") from None
    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return images, np.asarray(bunch.target, dtype=np.int64)


def digits_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of the fixed split of the module docstring for ``labels`` ``(N,)``: per class
    in label order, a ``default_rng([0, label])`` permutation of its samples, the first ``n // 4`` test."""
    train, test = [], []
    for label in range(int(labels.max()) + 1 if labels.size else 0):
        members = np.flatnonzero(labels == label)
        order = members[np.random.default_rng([0, label]).permutation(len(members))]
        n_test = len(members) // TEST_SHARE_DENOMINATOR
        test.append(order[:n_test])
        train.append(order[n_test:])
    return (np.concatenate(train) if train else np.zeros(0, np.int64),
            np.concatenate(test) if test else np.zeros(0, np.int64))


def build_digits(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """The digits bundle: the fixed split of :func:`digits_split`, images resized to ``preprocess.image_size`` by
    the test transform (no augmentation unless ``data.augment=true``)."""
    images, labels = load_digits_arrays()
    train, test = digits_split(labels)
    return _bundle(cfg, preprocess, list(DIGITS_CLASSNAMES), GrayImages(images[train], labels[train]),
                   GrayImages(images[test], labels[test]), augment_default=False)
