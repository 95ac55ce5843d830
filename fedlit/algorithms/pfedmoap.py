"""pFedMoAP: PromptFL's averaged prompt plus, per client, K downloaded expert prompts mixed by a private gate.

Experts are chosen from the pool as it stood at the start of the round (the previous rounds' uploads): by default
the K nearest other entries by L2 distance of the flattened context, or a fresh random draw per client and round.
A client with no pool entry yet trains plain CoOp. Gates are private and never aggregated (``aggregate_gate`` is
the paper's ablation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlit.algorithms.base import (
    Algorithm,
    ClientPlan,
    ServerState,
    State,
    averaged_global,
    client_rng,
    stack_experts,
)
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule, PFedMoAPClient

GATE_PREFIX = "gate."


def select_knn(pool: dict[int, dict], client_id: int, k: int) -> list[int]:
    """The ``k`` pool ids (other than ``client_id``) nearest to the client's own entry by L2 distance of the
    flattened context; ties go to the smaller id. Fewer than ``k`` candidates: all of them, nearest first."""
    own = pool[client_id]["ctx"].reshape(-1).double()
    candidates = sorted(i for i in pool if i != client_id)
    distances = [float(torch.linalg.vector_norm(pool[i]["ctx"].reshape(-1).double() - own)) for i in candidates]
    order = sorted(range(len(candidates)), key=lambda j: (distances[j], candidates[j]))
    return [candidates[j] for j in order[:k]]


def select_random(pool: dict[int, dict], client_id: int, k: int, seed: int, round_index: int) -> list[int]:
    """``k`` pool ids other than ``client_id`` drawn without replacement from the client's own stream."""
    candidates = sorted(i for i in pool if i != client_id)
    if len(candidates) <= k:
        return candidates
    rng = client_rng(seed, round_index, client_id, purpose=1)
    return sorted(int(i) for i in rng.choice(candidates, size=k, replace=False))


class PFedMoAP(Algorithm):
    name = "pfedmoap"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._expert_features: dict[tuple[int, int], Tensor] = {}  # (pool id, upload round) -> (C, D)

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return PFedMoAPClient(backbone, classnames, gate=self.cfg.gate, lam=self.cfg.method.lam,
                              **self.module_kwargs())

    @property
    def num_nonlocal(self) -> int:
        """K = num_experts - 1 (num_experts counts the local expert)."""
        return self.cfg.method.num_experts - 1

    def plan(self, server: ServerState, client_id: int, own: State | None, initial: State) -> ClientPlan:
        plan = super().plan(server, client_id, own, initial)
        self._prune_expert_features(server)
        if self.cfg.method.aggregate_gate:
            plan.start.update({k: v.clone() for k, v in server.global_state.items() if k.startswith(GATE_PREFIX)})
        if client_id not in server.pool or self.num_nonlocal == 0:
            return plan  # first participation: plain CoOp this round
        if self.cfg.method.selection == "knn":
            ids = select_knn(server.pool, client_id, self.num_nonlocal)
        else:
            ids = select_random(server.pool, client_id, self.num_nonlocal, self.cfg.seed, server.round + 1)
        plan.expert_ids = ids
        plan.expert_rounds = [server.pool[i]["round"] for i in ids]
        plan.experts = stack_experts(server.pool, ids)
        return plan

    def load(self, module: ClientModule, plan: ClientPlan, expert_features: Tensor | None = None) -> None:
        """Load the starting state and the experts; each distinct expert prompt is encoded once per process."""
        module.load_client_state(plan.start)
        assert isinstance(module, PFedMoAPClient)
        if plan.experts is None:
            module.set_expert_features(None)
            return
        feats = []
        for j, key in enumerate(zip(plan.expert_ids, plan.expert_rounds)):
            if key not in self._expert_features:
                self._expert_features[key] = module.expert_text_features(plan.experts[j : j + 1])[0]
            feats.append(self._expert_features[key])
        module.set_expert_features(torch.stack(feats))

    def _prune_expert_features(self, server: ServerState) -> None:
        """Keep only the features of prompts still in the pool: the cache stays at most one entry per client
        (an evaluated client whose experts have since been replaced recomputes them)."""
        current = {(i, entry["round"]) for i, entry in server.pool.items()}
        for key in [k for k in self._expert_features if k not in current]:
            del self._expert_features[key]

    def aggregate(self, server: ServerState, uploads: dict[int, State], sizes: dict[int, int]) -> ServerState:
        new = super().aggregate(server, uploads, sizes)
        keys = {"prompt_learner.ctx": "ctx"}
        if self.cfg.method.aggregate_gate:
            first = uploads[min(uploads)]
            keys.update({k: k for k in first if k.startswith(GATE_PREFIX)})
        new.global_state = averaged_global(server, uploads, sizes, keys)
        return new

    def eval_plan(self, server: ServerState, stored: dict | None, initial: State) -> ClientPlan:
        """Its last trained prompt, gate and the experts it downloaded then; never trained: global, no experts."""
        if stored is None:
            return super().eval_plan(server, stored, initial)
        return ClientPlan(start=dict(stored["state"]), expert_ids=list(stored["expert_ids"]),
                          expert_rounds=list(stored["expert_rounds"]), experts=stored["experts"])
