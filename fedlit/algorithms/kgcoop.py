"""Federated KgCoOp: PromptFL (FedAvg of the prompt) whose clients add KgCoOp's knowledge-guided regulariser,
``weight * (1 - mean_c cos(t_c, t_c^clip))`` against the frozen features of the hand-crafted prompt."""

from __future__ import annotations

from fedlit.algorithms.promptfl import PromptFL
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule
from fedlit.modules.kgcoop import KgCoOpClient


class KgCoOp(PromptFL):
    name = "kgcoop"

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        m = self.cfg.method
        return KgCoOpClient(backbone, classnames, weight=m.kg_weight, template=m.template, **self.module_kwargs())
