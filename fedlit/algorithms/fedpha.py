"""FedPHA (Fang et al., ICML 2025): a global prompt (FedAvg) and a private local prompt per client, of a length that
differs between clients; the local prompt is pulled into the trailing singular directions of the global prompt and
pushed away from its text features.

The global prompt is ``prompt_learner.ctx``: every sampled client starts from ``P_g`` and the server averages the
uploads (PromptFL's rules, so DP and robust aggregation apply to it). The local prompt ``local_ctx`` never leaves
the client and persists across rounds. Client ``i`` of ``N`` has local length ``pha_lengths[i * k // N]`` for the
``k`` configured lengths (contiguous blocks of clients; one length per client when ``k = N``), fixed for the run.
Its first local prompt is its own seeded draw (seed, client id), as the public code draws one per client.
A client is evaluated with its local prompt alone (the public test logits); one that never trained, and the global
model, with ``P_g`` alone.
"""

from __future__ import annotations

import torch

from fedlit.algorithms.base import GLOBAL_PROMPT, client_rng, with_params
from fedlit.algorithms.promptfl import PromptFL
from fedlit.backbone import Backbone
from fedlit.config import Config
from fedlit.modules import ClientModule
from fedlit.modules.fedpha import LENGTH, LOCAL, FedPHAClient, local_prompt_init
from fedlit.state import PROMPT, ClientPlan, ClientState, ServerState, StoreEntry

LOCAL_INIT_PURPOSE = 2  # client_rng purpose of a client's first local prompt (pFedMoAP's random selection uses 1)


def client_lengths(lengths: list[int], num_clients: int) -> list[int]:
    """Each client's local prompt length: client ``i`` gets ``lengths[i * k // N]`` (k lengths, N clients)."""
    k = len(lengths)
    return [int(lengths[i * k // num_clients]) for i in range(num_clients)]


class FedPHA(PromptFL):
    name = "fedpha"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.lengths = client_lengths(list(cfg.method.pha_lengths), cfg.data.num_clients)

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        m = self.cfg.method
        longest = max(self.lengths)
        return FedPHAClient(backbone, classnames, local_length=longest, max_local_length=longest, ratio=m.pha_ratio,
                            alpha=m.pha_alpha, **self.module_kwargs())

    def initial_local(self, client_id: int, initial: ClientState) -> torch.Tensor:
        """The client's first local prompt ``(max length, W)``: ``N(0, init_std^2)`` in its first ``L_i`` rows from the
        stream (seed, client id), zero below."""
        rows, width = initial.params[LOCAL].shape
        seed = int(client_rng(self.cfg.seed, 0, client_id, LOCAL_INIT_PURPOSE).integers(2**62))
        generator = torch.Generator().manual_seed(seed)
        init = local_prompt_init(self.lengths[client_id], rows, width, self.cfg.prompt.init_std, generator)
        return init.to(initial.params[LOCAL].dtype)

    def plan(self, server: ServerState, client_id: int, entry: StoreEntry | None, initial: ClientState) -> ClientPlan:
        """``P_g`` with the client's own local prompt (its first draw before its first round) and its length."""
        own = entry.state if entry is not None else with_params(initial, {LOCAL: self.initial_local(client_id,
                                                                                                     initial)})
        return ClientPlan(start=with_params(own, {PROMPT: server.global_state[GLOBAL_PROMPT]}),
                          extras={LENGTH: self.lengths[client_id]})

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        """The client's own local prompt (test logits use it alone); the global model if it never trained."""
        return self.plan(server, client_id, entry, initial) if entry is not None else self.global_plan(server, initial)

    def global_plan(self, server: ServerState, initial: ClientState) -> ClientPlan:
        """``P_g`` alone: local length 0."""
        return ClientPlan(start=with_params(initial, {PROMPT: server.global_state[GLOBAL_PROMPT]}),
                          extras={LENGTH: 0})
