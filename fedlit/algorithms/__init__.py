"""Server-side rules, one file per method; ``build_algorithm(cfg)`` picks one by ``cfg.algorithm``."""

from __future__ import annotations

from fedlit.algorithms.base import Algorithm, fedavg
from fedlit.algorithms.coop_local import CoOpLocal
from fedlit.algorithms.fedprox import FedProx
from fedlit.algorithms.pfedmoap import PFedMoAP
from fedlit.algorithms.promptfl import PromptFL
from fedlit.algorithms.zeroshot import ZeroShot
from fedlit.config import Config
from fedlit.errors import UserError
from fedlit.state import ClientPlan, ServerState

ALGORITHM_CLASSES: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (ZeroShot, CoOpLocal, PromptFL, FedProx, PFedMoAP)
}


def build_algorithm(cfg: Config, name: str | None = None) -> Algorithm:
    """The algorithm named ``name`` (default ``cfg.algorithm``)."""
    name = name or cfg.algorithm
    if name not in ALGORITHM_CLASSES:
        raise UserError(f"unknown algorithm '{name}'; choose one of {', '.join(ALGORITHM_CLASSES)}")
    return ALGORITHM_CLASSES[name](cfg)


__all__ = ["Algorithm", "ClientPlan", "ServerState", "fedavg", "build_algorithm", "ALGORITHM_CLASSES"]
