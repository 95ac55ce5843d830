"""The server-side rules of a method: what a sampled client receives, how uploads combine, what is evaluated.

An algorithm is pure math over typed state (:mod:`fedlit.state`): ``plan``, ``aggregate``, ``eval_plan`` and
``global_plan`` never touch a module, a device or a rank. Every process holds the same :class:`ServerState` and
calls the same functions in the same order, so the server state stays replicated and identical everywhere.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from fedlit.backbone import Backbone
from fedlit.config import Config
from fedlit.modules import ClientModule
from fedlit.state import PROMPT, ClientPlan, ClientState, Params, ServerState, StoreEntry, Upload

GLOBAL_PROMPT = "ctx"  # the global prompt P_g in ServerState.global_state


def fedavg(states: list[Params], weights: list[float]) -> Params:
    """Sample-weighted average ``sum_i n_i x_i / sum_i n_i`` of each entry of ``states`` (in float64, cast back)."""
    total = float(sum(weights))
    keys = states[0].keys()
    return {
        k: sum(s[k].double() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype) for k in keys
    }


def client_rng(seed: int, round_index: int, client_id: int, purpose: int = 0) -> np.random.Generator:
    """A numpy stream seeded only by ``(seed, round, client, purpose)``: independent of process layout."""
    return np.random.default_rng([seed, round_index, client_id, purpose])


def with_params(state: ClientState, params: Params) -> ClientState:
    """A copy of ``state`` (tensors shared, dicts new) with the entries of ``params`` replaced by clones."""
    new = {**state.params, **{k: v.clone() for k, v in params.items()}}
    return ClientState(params=new, optim={k: dict(v) for k, v in state.optim.items()})


class Algorithm(abc.ABC):
    """Base class: a method whose clients train a prompt and start every round from the global prompt ``P_g``;
    by default nothing is aggregated (subclasses define :meth:`aggregate`)."""

    name = "base"
    trains = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # -- client model -------------------------------------------------------------------------------------------
    def module_kwargs(self) -> dict:
        """Constructor arguments every prompt-learning client module shares."""
        cfg = self.cfg
        return dict(prompt=cfg.prompt, optim=cfg.optim, epochs=cfg.fed.local_epochs, seed=cfg.seed,
                    cut=cfg.perf.cut_text, share_prefix=cfg.perf.share_prefix)

    @abc.abstractmethod
    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        """The process's one client module (its initial state is every client's initial state)."""

    def init_server(self, initial: ClientState) -> ServerState:
        """Server state before round 1: the global prompt is the prompt initialisation."""
        return ServerState(global_state={GLOBAL_PROMPT: initial.params[PROMPT].clone()})

    # -- a round ------------------------------------------------------------------------------------------------
    def plan(self, server: ServerState, client_id: int, entry: StoreEntry | None, initial: ClientState) -> ClientPlan:
        """What ``client_id`` starts from this round: its own stored state (the initial state before its first
        round) with the prompt replaced by ``P_g``."""
        own = entry.state if entry is not None else initial
        return ClientPlan(start=with_params(own, {PROMPT: server.global_state[GLOBAL_PROMPT]}))

    def aggregate(self, server: ServerState, uploads: dict[int, Upload], sizes: dict[int, int]) -> ServerState:
        """New server state from this round's uploads (client id -> upload) and train sizes; pure math."""
        return ServerState(global_state=dict(server.global_state), extras=dict(server.extras),
                           round=server.round + 1)

    def keep(self, plan: ClientPlan) -> dict[str, Any]:
        """What the client store keeps of a trained client's plan for its later evaluation (none by default)."""
        return {}

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        """The personalised model a client is evaluated with: what it holds after its last participation, or the
        global prompt when it never trained."""
        if entry is None:
            return self.global_plan(server, initial) or ClientPlan(start=initial)
        return ClientPlan(start=entry.state, extras=dict(entry.extras))

    def finetune_epochs(self) -> int:
        """Epochs each evaluated client trains its :meth:`eval_plan` on its own train split right before its
        personalised evaluation (the tuned state is evaluated, then dropped); 0 (default): none."""
        return 0

    def global_plan(self, server: ServerState, initial: ClientState) -> ClientPlan | None:
        """The global model, evaluated on the whole test set (None when the method has no global prompt)."""
        return ClientPlan(start=with_params(initial, {PROMPT: server.global_state[GLOBAL_PROMPT]}))


def averaged_global(server: ServerState, uploads: dict[int, Upload], sizes: dict[int, int],
                    keys: dict[str, str]) -> Params:
    """``server.global_state`` with FedAvg of the upload parameters named in ``keys`` (upload parameter -> global
    name), in client-id order."""
    ids = sorted(uploads)
    states = [{g: uploads[c].state.params[u] for u, g in keys.items()} for c in ids]
    new = dict(server.global_state)
    new.update(fedavg(states, [sizes[c] for c in ids]))
    return new
