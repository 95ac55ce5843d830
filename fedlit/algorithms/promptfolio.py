"""PromptFolio (Pan et al., NeurIPS 2024): each client mixes the text features of a global prompt (FedAvg) and of a
private local prompt, ``(1 - theta) T_g + theta T_l``.

The global prompt is ``prompt_learner.ctx``: every sampled client starts from ``P_g`` and the server averages the
uploads (PromptFL's rules). The local prompt ``local_ctx`` never leaves the client and persists across rounds. A
client is evaluated as the public code does after aggregation: the current ``P_g`` with its own local prompt
(a client that never trained holds the initial local prompt). The global model is ``P_g`` alone (``theta = 0``).
"""

from __future__ import annotations

from fedlit.algorithms.base import GLOBAL_PROMPT, with_params
from fedlit.algorithms.promptfl import PromptFL
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule
from fedlit.modules.promptfolio import PromptFolioClient
from fedlit.state import PROMPT, ClientPlan, ClientState, ServerState, StoreEntry


class PromptFolio(PromptFL):
    name = "promptfolio"

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return PromptFolioClient(backbone, classnames, theta=self.cfg.method.theta, **self.module_kwargs())

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        """The current global prompt with the client's own local prompt (its initial one if it never trained)."""
        return self.plan(server, client_id, entry, initial)

    def global_plan(self, server: ServerState, initial: ClientState) -> ClientPlan:
        """The global prompt alone: ``theta = 0`` makes the mix exactly ``T_g``."""
        return ClientPlan(start=with_params(initial, {PROMPT: server.global_state[GLOBAL_PROMPT]}),
                          extras={"theta": 0.0})
