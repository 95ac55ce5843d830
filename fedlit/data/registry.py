"""Dataset names -> builders: ``build_dataset(cfg, preprocess)`` is the one entry point."""

from __future__ import annotations

from collections.abc import Callable

from fedlit.config import DataConfig
from fedlit.data import datasets, digits, fashion_mnist
from fedlit.data.base import DatasetBundle, Preprocess, cap_per_class
from fedlit.errors import UserError

DATASET_NAMES: tuple[str, ...] = ("shapes", "cifar10", "cifar100", "caltech101", "oxford_pets", "flowers102",
                                  "food101", "dtd", "domainnet", "office_caltech10", "fashion_mnist", "digits")

_BUILDERS: dict[str, Callable[[DataConfig, Preprocess], DatasetBundle]] = {
    "cifar10": datasets.build_cifar10,
    "cifar100": datasets.build_cifar100,
    "caltech101": datasets.build_caltech101,
    "oxford_pets": datasets.build_oxford_pets,
    "flowers102": datasets.build_flowers102,
    "food101": datasets.build_food101,
    "dtd": datasets.build_dtd,
    "domainnet": datasets.build_domainnet,
    "office_caltech10": datasets.build_office_caltech10,
    "fashion_mnist": fashion_mnist.build_fashion_mnist,
    "digits": digits.build_digits,
}


def build_dataset(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """Build the dataset ``cfg.name`` with the transforms of ``preprocess``; unknown name -> UserError. A real
    dataset keeps at most ``cfg.max_train_per_class`` / ``cfg.max_test_per_class`` images per class of each split
    (:func:`fedlit.data.base.cap_per_class`; None: all)."""
    if cfg.name == "shapes":
        from fedlit.data.shapes import build_shapes  # procedural dataset, imported only when used

        return build_shapes(cfg, preprocess)
    if cfg.name not in _BUILDERS:
        raise UserError(f"unknown dataset '{cfg.name}'; choose one of {', '.join(DATASET_NAMES)}")
    bundle = _BUILDERS[cfg.name](cfg, preprocess)
    return cap_per_class(bundle, cfg.max_train_per_class, cfg.max_test_per_class)
