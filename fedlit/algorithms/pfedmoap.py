"""pFedMoAP: PromptFL's averaged prompt plus, per client, K downloaded expert prompts mixed by a private gate.

The server keeps a pool of every client's latest uploaded prompt (``server.client_records``: ``{client id:
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
    return select_knn_many(pool, [client_id], k)[client_id]


def exact_distances(pool: Pool, client_id: int, candidates: list[int]) -> list[float]:
    """L2 distances (float64) between the client's flattened pool context and each candidate's, one at a time:
    the distances :func:`select_knn` ranks by."""
    own = pool[client_id]["ctx"].reshape(-1).double()
    return [float(torch.linalg.vector_norm(pool[i]["ctx"].reshape(-1).double() - own)) for i in candidates]


KNN_CHUNK = 1024  # pool rows converted to float64 at a time


def select_knn_many(pool: Pool, client_ids: list[int], k: int) -> dict[int, list[int]]:
    """:func:`select_knn` for every client of ``client_ids`` (each must have a pool entry) at once.

    Squared distances come from one float64 matrix product, ``|a|² + |b|² - 2 a·b`` for the (Q, d) queries
    against the (P, d) pool, whose rounding error is below ``tol = 4 d 2⁻⁵³ (|a|² + |b|²)``. Every candidate within
    ``2 tol`` of the k-th smallest is then ranked by :func:`exact_distances`, so the selection is exactly the
    one-at-a-time ranking (ties included) at the cost of a product instead of P vector norms per client."""
    ids = sorted(pool)
    if not client_ids or k <= 0:
        return {c: [] for c in client_ids}
    queries = torch.stack([pool[c]["ctx"].reshape(-1) for c in client_ids]).double()  # (Q, d)
    query_sq = (queries * queries).sum(dim=1)
    squared, norms = [], []
    for start in range(0, len(ids), KNN_CHUNK):
        rows = torch.stack([pool[i]["ctx"].reshape(-1) for i in ids[start : start + KNN_CHUNK]]).double()  # (p, d)
        row_sq = (rows * rows).sum(dim=1)
        squared.append(query_sq[:, None] + row_sq[None, :] - 2.0 * queries @ rows.T)  # (Q, p)
        norms.append(row_sq)
    squared, row_sq = torch.cat(squared, dim=1), torch.cat(norms)  # (Q, P), (P,)
    tol = 4.0 * queries.shape[1] * 2.0**-53 * (query_sq[:, None] + row_sq[None, :]) + 1e-300
    position = {i: j for j, i in enumerate(ids)}
    out = {}
    for q, cid in enumerate(client_ids):
        approx = squared[q].clone()
        approx[position[cid]] = float("inf")  # never one's own entry
        others = len(ids) - 1
        if others <= 0:
            out[cid] = []
            continue
        kth = torch.topk(approx, min(k, others), largest=False).values.max()
        bound = kth + 2.0 * tol[q].max()
        shortlist = [ids[j] for j in torch.nonzero(approx <= bound).reshape(-1).tolist()]
        distances = exact_distances(pool, cid, shortlist)
        order = sorted(range(len(shortlist)), key=lambda j: (distances[j], shortlist[j]))
        out[cid] = [shortlist[j] for j in order[:k]]
    return out


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
        return self.plan_round(server, {client_id: entry}, initial)[client_id]

    def plan_round(self, server: ServerState, entries: dict[int, StoreEntry | None],
                   initial: ClientState) -> dict[int, ClientPlan]:
        """Each client starts from ``P_g`` with its own gate (the global gate in the ``aggregate_gate`` ablation)
        and downloads K experts from the pool; the nearest-neighbour search runs for the round's clients at once."""
        plans = {}
        for cid, entry in entries.items():
            plans[cid] = super().plan(server, cid, entry, initial)
            if self.cfg.method.aggregate_gate:
                plans[cid].start.params.update({k: v.clone() for k, v in server.global_state.items()
                                                if k.startswith(GATE)})
        pool: Pool = server.client_records
        returning = [c for c in entries if c in pool] if self.num_nonlocal > 0 else []  # others: plain CoOp
        if self.cfg.method.selection == "knn":
            chosen = select_knn_many(pool, returning, self.num_nonlocal)
        else:
            chosen = {c: select_random(pool, c, self.num_nonlocal, self.cfg.seed, server.round + 1) for c in returning}
        for cid, ids in chosen.items():
            if ids:
                plans[cid].extras = {"experts": torch.stack([pool[i]["ctx"] for i in ids]),
                                     "expert_keys": [[i, pool[i]["round"]] for i in ids]}
        return plans

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
        for cid in sorted(uploads):  # new records (the old ones are not modified: see ServerState)
            new.client_records[cid] = {"ctx": received[cid][GLOBAL_PROMPT].clone(), "round": new.round}
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
