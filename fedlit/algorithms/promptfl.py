"""PromptFL: every sampled client starts from the global prompt; the server averages the prompts (FedAvg)."""

from __future__ import annotations

from fedlit.algorithms.base import Algorithm, ClientPlan, ServerState, State, averaged_global
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule, CoOpClient


class PromptFL(Algorithm):
    name = "promptfl"

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return CoOpClient(backbone, classnames, **self.module_kwargs())

    def aggregate(self, server: ServerState, uploads: dict[int, State], sizes: dict[int, int]) -> ServerState:
        new = super().aggregate(server, uploads, sizes)
        new.global_state = averaged_global(server, uploads, sizes, {"prompt_learner.ctx": "ctx"})
        return new

    def eval_plan(self, server: ServerState, stored: dict | None, initial: State) -> ClientPlan:
        """PromptFL's personalised number is the global prompt on each client's test split."""
        return self.global_plan(server, initial)
