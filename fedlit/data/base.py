"""The dataset interface every fedlit dataset implements.

A dataset is two labelled splits (train, test) that share one ordered list of class names: label ``i``
always means ``classnames[i]``. Domain datasets also carry a domain id per sample. Partitioners only see
the label (and domain) arrays, never images, so they are pure functions of those arrays and a seed.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class LabeledImages(Dataset, abc.ABC):
    """One split: ``ds[i] -> (transform(image_i), label_i)``.

    Subclasses implement ``load_image(i)`` (a PIL image or a float tensor ``(3, H, W)`` in [0, 1]) and set
    ``targets`` (int64 array ``(N,)``); ``domains`` (int64 ``(N,)``) is set by domain datasets only.
    """

    targets: np.ndarray
    domains: np.ndarray | None = None
    transform: Callable[[Any], torch.Tensor] | None = None

    @abc.abstractmethod
    def load_image(self, index: int) -> Any:
        """The raw image ``index`` (before ``transform``)."""

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


@dataclass
class DatasetBundle:
    """A dataset as fedlit uses it: ordered class names, a train and a test split, optional domains.

    ``transform_id`` names the deterministic test transform (it keys the feature cache); ``augmented`` says
    whether the train split's transform is random (then train features cannot be cached exactly).
    """

    name: str
    classnames: list[str]
    train: LabeledImages
    test: LabeledImages
    domain_names: list[str] | None = None
    transform_id: str = ""
    augmented: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass(frozen=True)
class Preprocess:
    """How a backbone wants its images: input size, normalisation and resize interpolation."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"


class SubsetImages(LabeledImages):
    """The items ``indices`` (int64 ``(M,)``) of another split, in that order, with its transform, labels and
    domains."""

    def __init__(self, base: LabeledImages, indices: np.ndarray) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(base.targets)[self.indices]
        self.domains = None if base.domains is None else np.asarray(base.domains)[self.indices]
        self.transform = base.transform

    def load_image(self, index: int) -> Any:
        """The base split's raw image ``indices[index]``."""
        return self.base.load_image(int(self.indices[index]))


def first_per_class(targets: np.ndarray, limit: int) -> np.ndarray:
    """Indices (ascending) of the first ``limit`` items of every label in ``targets`` ``(N,)``: ``(M,)`` int64,
    ``M = sum_c min(limit, n_c)``."""
    targets = np.asarray(targets)
    keep = np.zeros(len(targets), dtype=bool)
    for label in np.unique(targets):
        keep[np.flatnonzero(targets == label)[:limit]] = True
    return np.flatnonzero(keep)


def cap_per_class(bundle: DatasetBundle, train_limit: int | None, test_limit: int | None) -> DatasetBundle:
    """``bundle`` with each split cut to its first ``train_limit`` / ``test_limit`` items per class (in the split's
    own order; None leaves a split whole). The caps are appended to ``transform_id`` so that feature caches of a
    cut split never serve another cut."""
    if train_limit is None and test_limit is None:
        return bundle
    train = bundle.train if train_limit is None else SubsetImages(bundle.train,
                                                                  first_per_class(bundle.train.targets, train_limit))
    test = bundle.test if test_limit is None else SubsetImages(bundle.test,
                                                               first_per_class(bundle.test.targets, test_limit))
    return dataclasses.replace(bundle, train=train, test=test,
                               transform_id=f"{bundle.transform_id}-cap{train_limit},{test_limit}")
