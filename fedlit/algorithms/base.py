"""The server-side rules of a method: what a sampled client receives, how uploads combine, what is evaluated.

An algorithm is pure math over typed state (:mod:`fedlit.state`): ``plan``, ``aggregate``, ``eval_plan`` and
``global_plan`` never touch a module, a device or a rank. Every process holds the same :class:`ServerState` and
calls the same functions in the same order, so the server state stays replicated and identical everywhere.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import torch

from fedlit import privacy, robust
from fedlit.backbone import Backbone
from fedlit.config import Config
from fedlit.federation.sampling import attacked_clients
from fedlit.modules import ClientModule
from fedlit.state import PROMPT, ClientPlan, ClientState, Params, ServerState, StoreEntry, SyncStep, Upload

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
    # True: every round runs as lock-step local steps (fedlit/federation/synchronous.py), each step combining the
    # clients' gradients of the shared parameters (combine_gradients); False: clients train a round alone
    synchronous = False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.steps_bound: int | None = None  # synchronous mode: the most steps a client takes in a round

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

    def plan_round(self, server: ServerState, entries: dict[int, StoreEntry | None],
                   initial: ClientState) -> dict[int, ClientPlan]:
        """The plans of a round's clients (client id -> its store entry): :meth:`plan` for each by default; a method
        overrides it to share work across the round's clients (pFedMoAP's nearest-neighbour search)."""
        return {cid: self.plan(server, cid, entry, initial) for cid, entry in entries.items()}

    def aggregate(self, server: ServerState, uploads: dict[int, Upload], sizes: dict[int, int]) -> ServerState:
        """New server state from this round's uploads (client id -> upload) and train sizes; pure math."""
        return ServerState(global_state=dict(server.global_state), extras=dict(server.extras),
                           round=server.round + 1, client_records=dict(server.client_records))

    def keep(self, plan: ClientPlan) -> dict[str, Any]:
        """What the client store keeps of a trained client's plan for its later evaluation (none by default). It
        must depend on what the plan takes from the server state (``plan.extras``), not on the client's own entry:
        every process plans every sampled client, but reads the entries of the clients it trains only (the others
        are planned with ``entry=None``)."""
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

    def report(self, server: ServerState) -> dict[str, Any]:
        """Method-agnostic numbers merged into each evaluated round's metrics row: the privacy spent so far
        (``epsilon``, ``noise_multiplier``) when updates (synchronous mode: gradients) are noised, recomputed from
        ``server.round``."""
        if not self.trains:
            return {}
        if self.synchronous:
            return privacy.step_privacy_report(self.cfg, server.round, self.bound())
        return privacy.privacy_report(self.cfg, server.round)

    # -- the synchronous mode -----------------------------------------------------------------------------------
    def shared_parameters(self) -> tuple[str, ...]:
        """Synchronous mode: the client parameters every step updates with one combined gradient; every plan of a
        round starts them from the same values (the global prompt by default)."""
        return (PROMPT,)

    def bind_steps(self, steps: int) -> None:
        """Synchronous mode: the most steps any client takes in a round (the backend counts them from the partition,
        the same on every rank); per-step noise and its accounting use it."""
        self.steps_bound = int(steps)

    def bound(self) -> int:
        """The bound of :meth:`bind_steps` (ValueError before the backend has bound it)."""
        if self.steps_bound is None:
            raise ValueError(f"{self.name}: the backend has not bound the steps per round (bind_steps)")
        return self.steps_bound

    def combine_gradients(self, grads: dict[int, Params], step: SyncStep) -> Params:
        """Synchronous mode: the one gradient every client applies to its shared parameters at ``step``, from the
        active clients' gradients (client id -> shared name -> tensor): their unweighted mean in client-id order
        (float64, cast back). With ``privacy.clip = C``: each client's gradient (all shared tensors as one vector)
        clipped to ``C``, plus ``N(0, (z C)²)`` on the sum (central, seeded by (seed, round, step)) or on each
        clipped gradient (local, seeded by (seed, round, step, client)), ``z`` per step
        (:func:`fedlit.privacy.step_noise_multiplier`), divided by the number of active clients."""
        ids = sorted(grads)
        like = grads[ids[0]]
        rows = np.stack([flatten(grads[c]) for c in ids])
        if not privacy.enabled(self.cfg):
            return unflatten(rows.sum(axis=0) / len(ids), like)
        cfg = self.cfg
        clip = float(cfg.privacy.clip)
        std = privacy.step_noise_multiplier(cfg, self.bound()) * clip
        rows = privacy.clip_rows(rows, clip)
        size = rows.shape[1]
        if cfg.privacy.local:
            rows += np.stack([privacy.local_noise(size, std, cfg.seed, step.round, c, step=step.step) for c in ids])
        total = rows.sum(axis=0)
        if not cfg.privacy.local:
            total += privacy.central_noise(size, std, cfg.seed, step.round, step=step.step)
        return unflatten(total / len(ids), like)

    def private_gradients(self, client_id: int, params: Params, grads: Params, step: SyncStep) -> Params:
        """Synchronous mode: the gradients a client applies to its own (not shared) parameters ``params`` at
        ``step``, from its autograd gradients ``grads`` (same names); unchanged by default."""
        return grads


def flatten(params: Params) -> np.ndarray:
    """The entries of ``params`` (in their order) as one float64 vector ``(d,)``."""
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in params.values()])


def unflatten(vector: np.ndarray, like: Params) -> Params:
    """Inverse of :func:`flatten`: ``vector`` ``(d,)`` split and shaped as the entries of ``like`` (their dtypes)."""
    out, start = {}, 0
    for name, t in like.items():
        out[name] = torch.from_numpy(vector[start : start + t.numel()].copy()).reshape(t.shape).to(t.dtype)
        start += t.numel()
    return out


def received_states(cfg: Config, current: Params, states: dict[int, Params], round_index: int,
                    channel: str = "update") -> dict[int, Params]:
    """The states the server receives (client id -> params named as ``current``) on ``channel`` (``update``: what is
    aggregated; ``pool``: what pFedMoAP's pool stores): with local DP each update ``Δ_i = state_i - current``
    clipped to ``privacy.clip`` plus ``N(0, (z clip)²)`` from the stream (seed, round, client); then, when
    ``attack.target`` is ``both`` or ``channel``, the Byzantine clients' updates replaced by their attack
    (:func:`fedlit.robust.attack_updates`). Clients nothing happens to keep their tensors as uploaded."""
    ids = sorted(states)
    local = privacy.enabled(cfg) and cfg.privacy.local
    aimed = cfg.attack.kind in robust.UPLOAD_ATTACKS and cfg.attack.target in ("both", channel)
    attacked = set(attacked_clients(cfg.seed, cfg.data.num_clients, cfg.attack.fraction)) & set(ids) \
        if aimed else set()
    if not ids or not (local or attacked):
        return dict(states)
    base = flatten(current)
    deltas = np.stack([flatten(states[c]) - base for c in ids])
    if local:
        clip, z = float(cfg.privacy.clip), privacy.noise_multiplier(cfg)
        deltas = privacy.clip_rows(deltas, clip)
        deltas += np.stack([privacy.local_noise(len(base), z * clip, cfg.seed, round_index, c) for c in ids])
    deltas = robust.attack_updates(deltas, ids, attacked, cfg.attack, cfg.seed, round_index)
    changed = set(ids) if local else attacked
    return {c: unflatten(base + deltas[i], current) if c in changed else states[c] for i, c in enumerate(ids)}


def combine_prompts(cfg: Config, current: Params, states: dict[int, Params], sizes: dict[int, int],
                    round_index: int) -> Params:
    """The server rule of every global prompt: the new values of ``current`` from the clients' ``states`` (client
    id -> params named as ``current``) of round ``round_index``. On what the server receives
    (:func:`received_states`): FedAvg weighted by ``sizes`` (in client-id order, bitwise today's rule) unless central
    DP or a robust rule is on. Central DP: ``current + (Σ_i clip(Δ_i) + N(0, (z clip)²)) / n``, the noise seeded by
    (seed, round). Robust: ``current + aggregator(pre(Δ))`` over the flattened updates (unweighted, byzfl)."""
    received = received_states(cfg, current, states, round_index)
    ids = sorted(received)
    central = privacy.enabled(cfg) and not cfg.privacy.local
    if not central and cfg.robust.aggregator == "mean" and cfg.robust.pre == "none":
        return fedavg([received[c] for c in ids], [sizes[c] for c in ids])
    base = flatten(current)
    deltas = np.stack([flatten(received[c]) - base for c in ids])
    if central:
        clip, z = float(cfg.privacy.clip), privacy.noise_multiplier(cfg)
        total = privacy.clip_rows(deltas, clip).sum(axis=0) + privacy.central_noise(len(base), z * clip, cfg.seed,
                                                                                    round_index)
        update = total / len(ids)
    else:
        update = robust.robust_update(deltas, cfg.robust, cfg.seed, round_index)
    return unflatten(base + update, current)


def averaged_global(server: ServerState, uploads: dict[int, Upload], sizes: dict[int, int],
                    keys: dict[str, str], cfg: Config | None = None) -> Params:
    """``server.global_state`` with the upload parameters named in ``keys`` (upload parameter -> global name)
    combined by :func:`combine_prompts` for round ``server.round + 1`` (``cfg`` None: plain FedAvg, in client-id
    order). Names the global state does not hold yet (pFedMoAP's gates in the ``aggregate_gate`` ablation's first
    round) have no update to clip or attack: they are FedAvg'd."""
    ids = sorted(uploads)
    states = {c: {g: uploads[c].state.params[u] for u, g in keys.items()} for c in ids}
    new = dict(server.global_state)
    if cfg is None:
        new.update(fedavg([states[c] for c in ids], [sizes[c] for c in ids]))
        return new
    current = {g: server.global_state[g] for g in keys.values() if g in server.global_state}
    fresh = [g for g in keys.values() if g not in current]
    if fresh:
        new.update(fedavg([{g: states[c][g] for g in fresh} for c in ids], [sizes[c] for c in ids]))
    new.update(combine_prompts(cfg, current, {c: {g: states[c][g] for g in current} for c in ids}, sizes,
                               server.round + 1))
    return new


def received_global(server: ServerState, uploads: dict[int, Upload], keys: dict[str, str],
                    cfg: Config, channel: str = "update") -> dict[int, Params]:
    """What the server receives on ``channel`` of the upload parameters named in ``keys`` that the global state
    holds (client id -> params under their global names); on ``update``, as :func:`averaged_global` combines them
    (:func:`received_states`)."""
    current = {g: server.global_state[g] for g in keys.values() if g in server.global_state}
    states = {c: {g: uploads[c].state.params[u] for u, g in keys.items() if g in current} for c in uploads}
    return received_states(cfg, current, states, server.round + 1, channel)


class GlobalModelAlgorithm(Algorithm):
    """A method whose clients' whole learnable state is one global model (FedCLIP's adapter, FedTPG's prompt
    generator): every sampled client starts from it, the server combines all uploaded parameters under their own
    names (:func:`averaged_global`, so DP and the robust rules apply to them) and every client is evaluated with
    the global model, as the public codes of both evaluate after aggregation."""

    def init_server(self, initial: ClientState) -> ServerState:
        """The global model starts as the initial client state (the same for every client)."""
        return ServerState(global_state={n: v.clone() for n, v in initial.params.items()})

    def plan(self, server: ServerState, client_id: int, entry: StoreEntry | None, initial: ClientState) -> ClientPlan:
        own = entry.state if entry is not None else initial
        return ClientPlan(start=with_params(own, server.global_state))

    def aggregate(self, server: ServerState, uploads: dict[int, Upload], sizes: dict[int, int]) -> ServerState:
        new = super().aggregate(server, uploads, sizes)
        new.global_state = averaged_global(server, uploads, sizes, {n: n for n in server.global_state}, self.cfg)
        return new

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        return self.global_plan(server, initial)

    def global_plan(self, server: ServerState, initial: ClientState) -> ClientPlan:
        return ClientPlan(start=with_params(initial, server.global_state))
