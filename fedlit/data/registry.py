"""Dataset names -> builders: ``build_dataset(cfg, preprocess)`` is the one entry point."""

from __future__ import annotations

from collections.abc import Callable

from fedlit.config import DataConfig
from fedlit.data import datasets
from fedlit.data.base import DatasetBundle, Preprocess
from fedlit.errors import UserError

DATASET_NAMES: tuple[str, ...] = ("shapes", "cifar10", "cifar100", "caltech101", "oxford_pets", "flowers102",
                                  "food101", "dtd", "domainnet", "office_caltech10")

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
}


def build_dataset(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """Build the dataset ``cfg.name`` with the transforms of ``preprocess``; unknown name -> UserError."""
    if cfg.name == "shapes":
        from fedlit.data.shapes import build_shapes  # procedural dataset, imported only when used

        return build_shapes(cfg, preprocess)
    if cfg.name not in _BUILDERS:
        raise UserError(f"unknown dataset '{cfg.name}'; choose one of {', '.join(DATASET_NAMES)}")
    return _BUILDERS[cfg.name](cfg, preprocess)
