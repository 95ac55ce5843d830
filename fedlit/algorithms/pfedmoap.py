"""pFedMoAP: PromptFL's averaged prompt plus, per client, K downloaded expert prompts mixed by a private gate.

The server keeps a pool of every client's latest uploaded prompt (``server.client_records``: ``{client id:
{"ctx": tensor, "round": r}}``). Experts are chosen from the pool as it stood at the start of the round (the
previous rounds' uploads): by default the K nearest other entries by L2 distance of the flattened context, or a
fresh random draw per client and round. A client with no pool entry yet trains plain CoOp. Gates are private and
never aggregated (``aggregate_gate`` is the paper's ablation). A plan's extras are ``{"experts": (K, *ctx_shape),
"expert_keys": [[pool id, upload round], ...]}``; the store keeps them so that a client is evaluated with the
experts it downloaded at its last participation. With the pool defences on (``robust.pool_filter``,
``robust.pool_pre``) the experts are chosen from the defended pool (:func:`defended_pool`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedlit import robust
from fedlit.algorithms.base import GLOBAL_PROMPT, averaged_global, client_rng, received_global
from fedlit.algorithms.promptfl import PromptFL
from fedlit.backbone import Backbone
from fedlit.config import RobustConfig
from fedlit.modules import ClientModule, PFedMoAPClient
from fedlit.state import GATE, PROMPT, ClientPlan, ClientState, ServerState, StoreEntry, Upload

Pool = dict[int, dict]


def select_knn(pool: Pool, client_id: int, k: int) -> list[int]:
    """The ``k`` pool ids (other than ``client_id``) nearest to the client's own entry by L2 distance of the
    flattened context; ties go to the smaller id. Fewer than ``k`` candidates: all of them, nearest first."""
    return select_knn_many(pool, [client_id], k)[client_id]


def exact_distances(pool: Pool, client_id: int, candidates: list[int], rows: Pool | None = None) -> list[float]:
    """L2 distances (float64) between the client's flattened pool context and each candidate's (in ``rows``, the
    pool itself by default), one at a time: the distances :func:`select_knn` ranks by."""
    rows = pool if rows is None else rows
    own = pool[client_id]["ctx"].reshape(-1).double()
    return [float(torch.linalg.vector_norm(rows[i]["ctx"].reshape(-1).double() - own)) for i in candidates]


KNN_CHUNK = 1024  # pool rows converted to float64 at a time


def select_knn_many(pool: Pool, client_ids: list[int], k: int, rows: Pool | None = None) -> dict[int, list[int]]:
    """:func:`select_knn` for every client of ``client_ids`` (each must have a pool entry) at once; the candidates
    are the entries of ``rows`` (the pool itself by default; the defended pool, :func:`defended_pool`), the queries
    the clients' own pool entries.

    Squared distances come from one float64 matrix product, ``|a|² + |b|² - 2 a·b`` for the (Q, d) queries
    against the (P, d) pool, whose rounding error is below ``tol = 4 d 2⁻⁵³ (|a|² + |b|²)``. Every candidate within
    ``2 tol`` of the k-th smallest is then ranked by :func:`exact_distances`, so the selection is exactly the
    one-at-a-time ranking (ties included) at the cost of a product instead of P vector norms per client."""
    rows = pool if rows is None else rows
    ids = sorted(rows)
    if not client_ids or k <= 0 or not ids:
        return {c: [] for c in client_ids}
    queries = torch.stack([pool[c]["ctx"].reshape(-1) for c in client_ids]).double()  # (Q, d)
    query_sq = (queries * queries).sum(dim=1)
    squared, norms = [], []
    for start in range(0, len(ids), KNN_CHUNK):
        block = torch.stack([rows[i]["ctx"].reshape(-1) for i in ids[start : start + KNN_CHUNK]]).double()  # (p, d)
        row_sq = (block * block).sum(dim=1)
        squared.append(query_sq[:, None] + row_sq[None, :] - 2.0 * queries @ block.T)  # (Q, p)
        norms.append(row_sq)
    squared, row_sq = torch.cat(squared, dim=1), torch.cat(norms)  # (Q, P), (P,)
    tol = 4.0 * queries.shape[1] * 2.0**-53 * (query_sq[:, None] + row_sq[None, :]) + 1e-300
    position = {i: j for j, i in enumerate(ids)}
    out = {}
    for q, cid in enumerate(client_ids):
        approx = squared[q].clone()
        if cid in position:
            approx[position[cid]] = float("inf")  # never one's own entry
        others = len(ids) - (cid in position)
        if others <= 0:
            out[cid] = []
            continue
        kth = torch.topk(approx, min(k, others), largest=False).values.max()
        bound = kth + 2.0 * tol[q].max()
        shortlist = [ids[j] for j in torch.nonzero(approx <= bound).reshape(-1).tolist()]
        distances = exact_distances(pool, cid, shortlist, rows)
        order = sorted(range(len(shortlist)), key=lambda j: (distances[j], shortlist[j]))
        out[cid] = [shortlist[j] for j in order[:k]]
    return out


def select_random(pool: Pool, client_id: int, k: int, seed: int, round_index: int) -> list[int]:
    """``k`` pool ids other than ``client_id`` drawn without replacement from the client's own stream (``pool``:
    the candidates, e.g. the defended pool)."""
    candidates = sorted(i for i in pool if i != client_id)
    if len(candidates) <= k:
        return candidates
    rng = client_rng(seed, round_index, client_id, purpose=1)
    return sorted(int(i) for i in rng.choice(candidates, size=k, replace=False))


def defended_pool(pool: Pool, global_ctx: torch.Tensor, cfg: RobustConfig, round_index: int) -> Pool:
    """The pool the experts are selected from: ``pool`` itself with the pool defences off; else the entries
    :func:`fedlit.robust.defend_pool` keeps (distance filter, then ``robust.pool_pre`` around the global prompt
    ``global_ctx``), as new records. Pre-aggregated entries depend on the whole pool and the global prompt of the
    round, so their ``round`` is ``round_index`` (the pool's round: what keys a client's expert-feature cache)."""
    if cfg.pool_filter is None and cfg.pool_pre == "none":
        return pool
    ids = sorted(pool)
    if not ids:
        return {}
    vectors = np.stack([pool[i]["ctx"].reshape(-1).double().numpy() for i in ids])
    centre = global_ctx.reshape(-1).double().numpy()
    keep, rows = robust.defend_pool(vectors, centre, cfg)
    kept = [i for i, on in zip(ids, keep) if on]
    if cfg.pool_pre == "none":
        return {i: pool[i] for i in kept}
    like = pool[ids[0]]["ctx"]
    return {i: {"ctx": torch.from_numpy(row.copy()).reshape(like.shape).to(like.dtype), "round": round_index}
            for i, row in zip(kept, rows)}


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
        rows = defended_pool(pool, server.global_state[GLOBAL_PROMPT], self.cfg.robust, server.round) \
            if returning else pool
        if self.cfg.method.selection == "knn":
            chosen = select_knn_many(pool, returning, self.num_nonlocal, rows)
        else:
            chosen = {c: select_random(rows, c, self.num_nonlocal, self.cfg.seed, server.round + 1) for c in returning}
        for cid, ids in chosen.items():
            if ids:
                plans[cid].extras = {"experts": torch.stack([rows[i]["ctx"] for i in ids]),
                                     "expert_keys": [[i, rows[i]["round"]] for i in ids]}
        return plans

    def aggregate(self, server: ServerState, uploads: dict[int, Upload], sizes: dict[int, int]) -> ServerState:
        """FedAvg of the prompts (and of the gates in the ``aggregate_gate`` ablation); the round's uploads, as the
        pool receives them (locally noised, attacked unless ``attack.target=update``: :func:`received_global`),
        replace their clients' pool entries (a new pool: the old one is not modified)."""
        new = super().aggregate(server, uploads, sizes)
        keys = {PROMPT: GLOBAL_PROMPT}
        if self.cfg.method.aggregate_gate:
            first = uploads[min(uploads)].state.params
            keys = {PROMPT: GLOBAL_PROMPT, **{k: k for k in first if k.startswith(GATE)}}
            new.global_state = averaged_global(server, uploads, sizes, keys, self.cfg)
        received = received_global(server, uploads, keys, self.cfg, channel="pool")
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
