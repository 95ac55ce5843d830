"""Prompt + FedPer: the first ``g`` context tokens are global (FedAvg), the other ``n_ctx - g`` tokens are personal
(private, kept by each client across rounds), as FedPer shares base layers and keeps personalisation layers.

``server.global_state["ctx"]`` has the full context shape: its first ``g`` tokens are the aggregated global tokens,
the others stay the prompt initialisation (the personal tokens a client starts from before its first round). A
client starts every round, and is evaluated, with its own personal tokens and the latest global tokens. There is
no global model: every client's model includes its personal tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlit.algorithms.base import GLOBAL_PROMPT, Algorithm, combine_prompts, with_params
from fedlit.backbone import Backbone
from fedlit.errors import UserError
from fedlit.modules import ClientModule, CoOpClient
from fedlit.state import PROMPT, ClientPlan, ClientState, ServerState, StoreEntry, Upload

TOKEN_AXIS = -2  # ctx is (n_ctx, W), or (C, n_ctx, W) with class-specific context


def merge_tokens(global_ctx: Tensor, own_ctx: Tensor, num_global: int) -> Tensor:
    """A context ``(..., n_ctx, W)`` with the first ``num_global`` tokens of ``global_ctx`` and the remaining tokens
    of ``own_ctx`` (a new tensor)."""
    return torch.cat([global_ctx.narrow(TOKEN_AXIS, 0, num_global),
                      own_ctx.narrow(TOKEN_AXIS, num_global, own_ctx.shape[TOKEN_AXIS] - num_global)], dim=TOKEN_AXIS)


class FedPer(Algorithm):
    name = "fedper"

    def num_global(self, n_ctx: int) -> int:
        """How many leading context tokens are global: ``method.fedper_global_tokens``, or ``n_ctx // 2``."""
        tokens = self.cfg.method.fedper_global_tokens
        if tokens is None:
            return n_ctx // 2
        if tokens > n_ctx:
            raise UserError(f"method.fedper_global_tokens={tokens} exceeds the prompt's {n_ctx} context tokens")
        return tokens

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        """A CoOp client: the whole context is one parameter; the split is the server's business."""
        return CoOpClient(backbone, classnames, **self.module_kwargs())

    def init_server(self, initial: ClientState) -> ServerState:
        """The prompt initialisation (its token count checked against ``method.fedper_global_tokens``)."""
        self.num_global(initial.params[PROMPT].shape[TOKEN_AXIS])
        return super().init_server(initial)

    def plan(self, server: ServerState, client_id: int, entry: StoreEntry | None, initial: ClientState) -> ClientPlan:
        """The client's own state (the initial state before its first round) with its first ``g`` context tokens
        replaced by the global tokens."""
        own = entry.state if entry is not None else initial
        global_ctx = server.global_state[GLOBAL_PROMPT]
        ctx = merge_tokens(global_ctx, own.params[PROMPT], self.num_global(global_ctx.shape[TOKEN_AXIS]))
        return ClientPlan(start=with_params(own, {PROMPT: ctx}))

    def aggregate(self, server: ServerState, uploads: dict[int, Upload], sizes: dict[int, int]) -> ServerState:
        """FedAvg (weighted by train samples, in client-id order) of the uploads' first ``g`` tokens; the personal
        tokens are never averaged."""
        new = super().aggregate(server, uploads, sizes)
        old = server.global_state[GLOBAL_PROMPT]
        g = self.num_global(old.shape[TOKEN_AXIS])
        ids = sorted(uploads)
        heads = {c: {"ctx": uploads[c].state.params[PROMPT].narrow(TOKEN_AXIS, 0, g)} for c in ids}
        current = {"ctx": old.narrow(TOKEN_AXIS, 0, g)}
        averaged = combine_prompts(self.cfg, current, heads, sizes, server.round + 1)["ctx"]
        new.global_state = {**server.global_state, GLOBAL_PROMPT: merge_tokens(averaged, old, g)}
        return new

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        """What the client holds after the round: the latest global tokens with its own personal tokens (the
        initial ones when it never trained)."""
        return self.plan(server, client_id, entry, initial)

    def global_plan(self, server: ServerState, initial: ClientState) -> ClientPlan | None:
        """None: FedPer has no global model (every model includes a client's personal tokens)."""
        return None
