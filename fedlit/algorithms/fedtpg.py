"""FedTPG (Qiu et al., ICLR 2024): a text-driven prompt generator, FedAvg'd, makes the context from the class
names, so the one global generator prompts any class set, unseen classes included.

The generator's parameters (``generator.soft_prompt`` ...) are the client's whole learnable state and, under the
same names, the server's global state (:class:`GlobalModelAlgorithm`). Under the base-to-novel protocol the
generator is conditioned on the base class names in training and on the candidate names in evaluation.
"""

from __future__ import annotations

from fedlit.algorithms.base import GlobalModelAlgorithm
from fedlit.backbone import Backbone
from fedlit.data.partition import base_classes
from fedlit.modules import ClientModule
from fedlit.modules.fedtpg import FedTPGClient


class FedTPG(GlobalModelAlgorithm):
    name = "fedtpg"

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        cfg = self.cfg
        trained = base_classes(len(classnames)) if cfg.eval.protocol == "base2novel" else None
        return FedTPGClient(backbone, classnames, depth=cfg.method.tpg_depth, heads=cfg.method.tpg_heads,
                            train_classes=trained, client_classes=cfg.method.tpg_client_classes,
                            **self.module_kwargs())
