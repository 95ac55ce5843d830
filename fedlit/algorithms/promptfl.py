"""PromptFL: every sampled client starts from the global prompt; the server averages the prompts (FedAvg)."""

from __future__ import annotations

from fedlit.algorithms.base import GLOBAL_PROMPT, Algorithm, averaged_global
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule, CoOpClient
from fedlit.state import PROMPT, ClientPlan, ClientState, ServerState, StoreEntry, Upload


class PromptFL(Algorithm):
    name = "promptfl"

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return CoOpClient(backbone, classnames, **self.module_kwargs())

    def aggregate(self, server: ServerState, uploads: dict[int, Upload], sizes: dict[int, int]) -> ServerState:
        new = super().aggregate(server, uploads, sizes)
        new.global_state = averaged_global(server, uploads, sizes, {PROMPT: GLOBAL_PROMPT}, self.cfg)
        return new

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        """PromptFL's personalised number is the global prompt on each client's test split."""
        return self.global_plan(server, initial)
