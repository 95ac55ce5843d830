"""pFedMoAP: PromptFL's averaged prompt plus, per client, K downloaded expert prompts mixed by a private gate.

The server keeps a pool of every client's latest uploaded prompt (``server.extras["pool"]``: ``{client id:
{"ctx": tensor, "round": r}}``). Experts are chosen from the pool as it stood at the start of the round (the
previous rounds' uploads): by default the K nearest other entries by L2 distance of the flattened context, or a
fresh random draw per client and round. A client with no pool entry yet trains plain CoOp. Gates are private and
never aggregated (``aggregate_gate`` is the paper's ablation). A plan's extras are ``{"experts": (K, *ctx_shape),
"expert_keys": [[pool id, upload round], ...]}``; the store keeps them so that a client is evaluated with the
experts it downloaded at its last participation.
"""

from __future__ import annotations

from typing import Any

import torch

from fedlit.algorithms.base import GLOBAL_PROMPT, averaged_global, client_rng, received_global
from fedlit.algorithms.promptfl import PromptFL
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule, PFedMoAPClient
from fedlit.state import GATE, PROMPT, ClientPlan, ClientState, ServerState, StoreEntry, Upload

Pool = dict[int, dict]


def select_knn(pool: Pool, client_id: int, k: int) -> list[int]:
    """The ``k`` pool ids (other than ``client_id``) nearest to the client's own entry by L2 distance of the
    flattened context; ties go to the smaller id. Fewer than ``k`` candidates: all of them, nearest first."""
    own = pool[client_id]["ctx"].reshape(-1).double()
    candidates = sorted(i for i in pool if i != client_id)
    distances = [float(torch.linalg.vector_norm(pool[i]["ctx"].reshape(-1).double() - own)) for i in candidates]
    order = sorted(range(len(candidates)), key=lambda j: (distances[j], candidates[j]))
    return [candidates[j] for j in order[:k]]


def select_random(pool: Pool, client_id: int, k: int, seed: int, round_index: int) -> list[int]:
    """``k`` pool ids other than ``client_id`` drawn without replacement from the client's own stream."""
    candidates = sorted(i for i in pool if i != client_id)
    if len(candidates) <= k:
        return candidates
    rng = client_rng(seed, round_index, client_id, purpose=1)
    return sorted(int(i) for i in rng.choice(candidates, size=k, replace=False))


class PFedMoAP(PromptFL):
    name = "pfedmoap"

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return PFedMoAPClient(backbone, classnames, gate=self.cfg.gate, lam=self.cfg.method.lam,
                              **self.module_kwargs())

    @property
    def num_nonlocal(self) -> int:
        """K = num_experts - 1 (num_experts counts the local expert)."""
        return self.cfg.method.num_experts - 1

    def plan(self, server: ServerState, client_id: int, entry: StoreEntry | None, initial: ClientState) -> ClientPlan:
        plan = super().plan(server, client_id, entry, initial)
        if self.cfg.method.aggregate_gate:
            plan.start.params.update({k: v.clone() for k, v in server.global_state.items() if k.startswith(GATE)})
        pool: Pool = server.extras.get("pool", {})
        if client_id not in pool or self.num_nonlocal == 0:
            return plan  # first participation: plain CoOp this round
        if self.cfg.method.selection == "knn":
            ids = select_knn(pool, client_id, self.num_nonlocal)
        else:
            ids = select_random(pool, client_id, self.num_nonlocal, self.cfg.seed, server.round + 1)
        if ids:
            plan.extras = {"experts": torch.stack([pool[i]["ctx"] for i in ids]),
                           "expert_keys": [[i, pool[i]["round"]] for i in ids]}
        return plan

    def aggregate(self, server: ServerState, uploads: dict[int, Upload], sizes: dict[int, int]) -> ServerState:
        """FedAvg of the prompts (and of the gates in the ``aggregate_gate`` ablation); the round's uploads, as the
        server receives them (attacked or locally noised: :func:`received_global`), replace their clients' pool
        entries (a new pool: the old one is not modified)."""
        new = super().aggregate(server, uploads, sizes)
        keys = {PROMPT: GLOBAL_PROMPT}
        if self.cfg.method.aggregate_gate:
            first = uploads[min(uploads)].state.params
            keys = {PROMPT: GLOBAL_PROMPT, **{k: k for k in first if k.startswith(GATE)}}
            new.global_state = averaged_global(server, uploads, sizes, keys, self.cfg)
        received = received_global(server, uploads, keys, self.cfg)
        pool = dict(server.extras.get("pool", {}))
        for cid in sorted(uploads):
            pool[cid] = {"ctx": received[cid][GLOBAL_PROMPT].clone(), "round": new.round}
        new.extras = {**new.extras, "pool": pool}
        return new

    def keep(self, plan: ClientPlan) -> dict[str, Any]:
        """The experts the client downloaded this round: it is evaluated with them until it trains again."""
        return dict(plan.extras)

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        """Its last trained prompt, gate and the experts it downloaded then; never trained: global, no experts."""
        if entry is None:
            return self.global_plan(server, initial)
        return ClientPlan(start=entry.state, extras=dict(entry.extras))
