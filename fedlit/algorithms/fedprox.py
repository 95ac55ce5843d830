"""PromptFL + FedProx: PromptFL with ``mu/2 * ||ctx - P_g||^2`` added to each client's loss."""

from __future__ import annotations

from torch import Tensor

from fedlit.algorithms.base import ClientPlan
from fedlit.algorithms.promptfl import PromptFL
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule, CoOpClient


class FedProx(PromptFL):
    name = "fedprox"

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return CoOpClient(backbone, classnames, prox_mu=self.cfg.method.mu, **self.module_kwargs())

    def load(self, module: ClientModule, plan: ClientPlan, expert_features: Tensor | None = None) -> None:
        super().load(module, plan)
        module.set_prox_center(plan.start["prompt_learner.ctx"])
