"""Zero-shot CLIP: the hand prompt "a photo of a {}." on every client; nothing trains."""

from __future__ import annotations

from fedlit.algorithms.base import Algorithm
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule, ZeroShotClient
from fedlit.state import ClientPlan, ClientState, ServerState, StoreEntry


class ZeroShot(Algorithm):
    name = "zeroshot"
    trains = False

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return ZeroShotClient(backbone, classnames, template=self.cfg.method.template)

    def init_server(self, initial: ClientState) -> ServerState:
        return ServerState(global_state={})

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        return ClientPlan(start=initial)

    def global_plan(self, server: ServerState, initial: ClientState) -> ClientPlan | None:
        return ClientPlan(start=initial)
