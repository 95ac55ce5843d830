"""Federated CoCoOp: every sampled client starts from the global context and the global meta-net; the server
averages both (FedAvg weighted by train samples, through the one server rule of every global prompt). Nothing is
private: a client's personalised model is the global one, as for PromptFL."""

from __future__ import annotations

from fedlit.algorithms.base import GLOBAL_PROMPT, averaged_global, with_params
from fedlit.algorithms.promptfl import PromptFL
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule
from fedlit.modules.cocoop import META, CoCoOpClient
from fedlit.state import PROMPT, ClientPlan, ClientState, Params, ServerState, StoreEntry, Upload


def global_names(params: Params) -> dict[str, str]:
    """Client parameter name -> global state name of what the server averages: the context (``ctx``) and every
    meta-net parameter (under its own name), read from a client state or the global state."""
    return {PROMPT: GLOBAL_PROMPT, **{k: k for k in params if k.startswith(META)}}


class CoCoOp(PromptFL):
    name = "cocoop"

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return CoCoOpClient(backbone, classnames, chunk=self.cfg.method.cocoop_chunk, **self.module_kwargs())

    def init_server(self, initial: ClientState) -> ServerState:
        """The global context and meta-net start as every client's initial ones."""
        return ServerState(global_state={g: initial.params[k].clone() for k, g in global_names(initial.params).items()})

    def plan(self, server: ServerState, client_id: int, entry: StoreEntry | None, initial: ClientState) -> ClientPlan:
        """The client's own state (the initial one before its first round) with the global context and meta-net."""
        own = entry.state if entry is not None else initial
        names = global_names(server.global_state)
        return ClientPlan(start=with_params(own, {k: server.global_state[g] for k, g in names.items()}))

    def aggregate(self, server: ServerState, uploads: dict[int, Upload], sizes: dict[int, int]) -> ServerState:
        new = super(PromptFL, self).aggregate(server, uploads, sizes)
        new.global_state = averaged_global(server, uploads, sizes, global_names(server.global_state), self.cfg)
        return new

    def global_plan(self, server: ServerState, initial: ClientState) -> ClientPlan:
        """The global context and meta-net (what every client is evaluated with, PromptFL's ``eval_plan``)."""
        return self.plan(server, -1, None, initial)
