"""FedPGP (Cui et al., ICML 2024): a global prompt ``sigma`` (FedAvg) personalised by private low-rank factors,
``sigma + U V``, trained with a prompt-wise contrastive loss.

``sigma`` is ``prompt_learner.ctx``: every sampled client starts from ``P_g`` with its own ``U`` and ``V``, which
never leave the client and persist across rounds; the server averages ``sigma`` only. A client is evaluated as the
public code does after aggregation: the current ``P_g`` plus its own ``U V`` (a client that never trained holds the
initial ``U``, ``V``). The global model is ``P_g`` alone (``U = V = 0``, so ``sigma + U V = sigma`` exactly).
"""

from __future__ import annotations

import torch

from fedlit.algorithms.base import GLOBAL_PROMPT, with_params
from fedlit.algorithms.promptfl import PromptFL
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule
from fedlit.modules.fedpgp import LOW_U, LOW_V, FedPGPClient
from fedlit.state import PROMPT, ClientPlan, ClientState, ServerState, StoreEntry


class FedPGP(PromptFL):
    name = "fedpgp"

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        m = self.cfg.method
        return FedPGPClient(backbone, classnames, rank=m.pgp_rank, weight=m.pgp_weight, temperature=m.pgp_temp,
                            **self.module_kwargs())

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        """The current global prompt with the client's own ``U``, ``V`` (its initial ones if it never trained)."""
        return self.plan(server, client_id, entry, initial)

    def global_plan(self, server: ServerState, initial: ClientState) -> ClientPlan:
        """The global prompt alone: zero low-rank factors."""
        zeros = {k: torch.zeros_like(initial.params[k]) for k in (LOW_U, LOW_V)}
        return ClientPlan(start=with_params(initial, {PROMPT: server.global_state[GLOBAL_PROMPT], **zeros}))
