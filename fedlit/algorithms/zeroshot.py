"""Zero-shot CLIP: the hand prompt "a photo of a {}." on every client; nothing trains."""

from __future__ import annotations

from fedlit.algorithms.base import Algorithm, ClientPlan, ServerState, State
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule, ZeroShotClient


class ZeroShot(Algorithm):
    name = "zeroshot"
    trains = False
    has_global_prompt = False

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return ZeroShotClient(backbone, classnames, template=self.cfg.method.template)

    def init_server(self, module: ClientModule) -> ServerState:
        return ServerState(global_state={})

    def eval_plan(self, server: ServerState, stored: dict | None, initial: State) -> ClientPlan:
        return ClientPlan(start={})

    def global_plan(self, server: ServerState, initial: State) -> ClientPlan | None:
        return ClientPlan(start={})
