"""Server-side rules, one file per method (``fedlit/algorithms/<name>.py`` defines the :class:`Algorithm` subclass
whose ``name`` is ``<name>``); ``build_algorithm(cfg)`` imports the one ``cfg.algorithm`` names. Adding a method
needs no registration anywhere else."""

from __future__ import annotations

import importlib

from fedlit.algorithms.base import Algorithm, fedavg
from fedlit.config import ALGORITHMS, Config
from fedlit.errors import UserError
from fedlit.state import ClientPlan, ServerState


def algorithm_class(name: str) -> type[Algorithm]:
    """The :class:`Algorithm` subclass defined in ``fedlit/algorithms/<name>.py`` under that ``name``."""
    if name not in ALGORITHMS:
        raise UserError(f"unknown algorithm '{name}'; choose one of {', '.join(ALGORITHMS)}")
    module = importlib.import_module(f"fedlit.algorithms.{name}")
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Algorithm) and value.name == name:
            return value
    raise TypeError(f"fedlit/algorithms/{name}.py defines no Algorithm subclass with name = '{name}'")


def build_algorithm(cfg: Config, name: str | None = None) -> Algorithm:
    """The algorithm named ``name`` (default ``cfg.algorithm``)."""
    return algorithm_class(name or cfg.algorithm)(cfg)


__all__ = ["Algorithm", "ClientPlan", "ServerState", "fedavg", "algorithm_class", "build_algorithm"]
