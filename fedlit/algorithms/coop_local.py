"""CoOp local: every client trains its own prompt alone; nothing is aggregated."""

from __future__ import annotations

from fedlit.algorithms.base import Algorithm, ClientPlan, ServerState, State
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule, CoOpClient


class CoOpLocal(Algorithm):
    name = "coop_local"
    has_global_prompt = False

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return CoOpClient(backbone, classnames, **self.module_kwargs())

    def plan(self, server: ServerState, client_id: int, own: State | None, initial: State) -> ClientPlan:
        """A client continues from its own last prompt (the initial prompt the first time)."""
        return ClientPlan(start=dict(own if own is not None else initial))

    def global_plan(self, server: ServerState, initial: State) -> ClientPlan | None:
        return None
