"""PromptFL + FedProx: PromptFL with ``mu/2 * ||ctx - P_g||^2`` added to each client's loss."""

from __future__ import annotations

from fedlit.algorithms.base import GLOBAL_PROMPT
from fedlit.algorithms.promptfl import PromptFL
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule, CoOpClient
from fedlit.state import ClientPlan, ClientState, ServerState, StoreEntry


class FedProx(PromptFL):
    name = "fedprox"

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return CoOpClient(backbone, classnames, prox_mu=self.cfg.method.mu, **self.module_kwargs())

    def plan(self, server: ServerState, client_id: int, entry: StoreEntry | None, initial: ClientState) -> ClientPlan:
        """PromptFL's plan with the round's global prompt as the proximal centre."""
        plan = super().plan(server, client_id, entry, initial)
        plan.extras["prox_center"] = server.global_state[GLOBAL_PROMPT]
        return plan
