"""CoOp local: every client trains its own prompt alone; nothing is aggregated."""

from __future__ import annotations

from fedlit.algorithms.base import Algorithm
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule, CoOpClient
from fedlit.state import ClientPlan, ClientState, ServerState, StoreEntry


class CoOpLocal(Algorithm):
    name = "coop_local"

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return CoOpClient(backbone, classnames, **self.module_kwargs())

    def plan(self, server: ServerState, client_id: int, entry: StoreEntry | None, initial: ClientState) -> ClientPlan:
        """A client continues from its own last state (the initial state the first time)."""
        return ClientPlan(start=entry.state if entry is not None else initial)

    def global_plan(self, server: ServerState, initial: ClientState) -> ClientPlan | None:
        return None
