"""FedMGP (Bo et al., NeurIPS 2025): M groups of text+vision prompts per client; each round a client uploads s of
its groups, sampled by their similarity to the previous round's global prompts, and gets the rank-wise averages
written back into the groups it uploaded (docs/methods.md).

Server state: ``global_text (s, n, W_t)`` and ``global_vision (s, n_v, W_v)``, the rank-wise averages of the last
round (before round 1: the initial groups ``0..s-1``, which every client shares). ``client_records[c]`` holds what
the server wrote back into client c at its last participation: ``{"text_index": [s ints], "vision_index": [s ints],
"text": (s, n, W_t), "vision": (s, n_v, W_v), "round": r}``. A client's plan (and its evaluation) is its stored
trained state with those groups replaced; its other groups never leave it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fedlit.algorithms.base import Algorithm, client_rng, combine_prompts, with_params
from fedlit.backbone import Backbone
from fedlit.data.features import TOKENS
from fedlit.modules import ClientModule
from fedlit.modules.fedmgp import TEXT_GROUPS, VISION_GROUPS, FedMGPClient
from fedlit.state import ClientPlan, ClientState, ServerState, StoreEntry, Upload

GLOBAL_TEXT, GLOBAL_VISION = "global_text", "global_vision"  # the s rank-wise global prompts of each tower
TOWERS = ((TEXT_GROUPS, GLOBAL_TEXT, "text"), (VISION_GROUPS, GLOBAL_VISION, "vision"))  # client, global, record
SELECTION_PURPOSE = 3  # client_rng purpose of the upload sampling (pFedMoAP's random selection 1, FedPHA's init 2)


def group_similarities(groups: Tensor, global_groups: Tensor) -> Tensor:
    """``σ_m = max_k cos(vec(groups[m]), vec(global_groups[k]))`` ``(M,)`` in float64 for a client's groups
    ``(M, ...)`` and the global prompts ``(s, ...)``; a pair with a zero norm has similarity 0 (the public code's
    ``_compute_prompt_similarities``)."""
    a = groups.reshape(groups.shape[0], -1).double()
    b = global_groups.reshape(global_groups.shape[0], -1).double()
    norms = a.norm(dim=1)[:, None] * b.norm(dim=1)[None, :]
    cos = torch.where(norms > 0, (a @ b.T) / torch.where(norms > 0, norms, torch.ones_like(norms)),
                      torch.zeros_like(norms))
    return cos.max(dim=1).values


def upload_probabilities(groups: Tensor, global_groups: Tensor | None, temperature: float) -> Tensor:
    """The upload distribution ``softmax(σ / τ)`` ``(M,)`` (float64) of a client's groups ``(M, ...)``
    (:func:`group_similarities` to ``global_groups (s, ...)``); uniform when there is no global prompt yet."""
    if global_groups is None:
        return torch.full((groups.shape[0],), 1.0 / groups.shape[0], dtype=torch.float64)
    return torch.softmax(group_similarities(groups, global_groups) / temperature, dim=0)


def sample_groups(probs: Tensor, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` group indices drawn from ``probs (M,)`` without replacement, in order: at each step the remaining
    probabilities are renormalised and the first group whose cumulative probability exceeds a uniform draw of
    ``rng`` is taken (what ``torch.multinomial(p_rest, 1)`` samples, one draw per step)."""
    remaining = list(range(probs.shape[0]))
    p = probs.double().tolist()
    chosen = []
    for _ in range(min(count, len(remaining))):
        rest = np.array([p[i] for i in remaining], dtype=np.float64)
        cdf = np.cumsum(rest / rest.sum())
        pick = min(int(np.searchsorted(cdf, rng.random(), side="right")), len(remaining) - 1)
        chosen.append(remaining.pop(pick))
    return chosen


def write_back(params: dict[str, Tensor], record: dict) -> dict[str, Tensor]:
    """A client's ``params`` with the groups its ``record`` names replaced by the global values written into them
    (new tensors; the other groups unchanged)."""
    out = dict(params)
    for name, _, key in TOWERS:
        groups = params[name].clone()
        groups[torch.as_tensor(record[f"{key}_index"])] = record[key].to(groups)
        out[name] = groups
    return out


class FedMGP(Algorithm):
    name = "fedmgp"
    image_feature_kind = TOKENS  # read by build_client_data: cache the frozen image-tower tokens

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        m, cfg = self.cfg.method, self.cfg
        return FedMGPClient(backbone, classnames, groups=m.mgp_groups, diversity_weight=m.mgp_diversity_weight,
                            pull_groups=m.mgp_pull_groups, vision_start_layer=cfg.prompt.vision_start_layer,
                            checkpoint_activations=cfg.perf.checkpoint_activations, **self.module_kwargs())

    @property
    def upload_count(self) -> int:
        """s, the groups each client uploads per round."""
        return self.cfg.method.mgp_upload

    def init_server(self, initial: ClientState) -> ServerState:
        """The initial groups ``0..s-1`` of each tower (every client's): the current value the first round's
        averages are combined against (its upload sampling is uniform, there is no global prompt yet)."""
        s = self.upload_count
        return ServerState(global_state={g: initial.params[n][:s].clone() for n, g, _ in TOWERS})

    def plan(self, server: ServerState, client_id: int, entry: StoreEntry | None, initial: ClientState) -> ClientPlan:
        """The client's own state (the initial one before its first round) with the global values of its last
        participation written into the groups it uploaded then."""
        if entry is None:
            return ClientPlan(start=with_params(initial, {}))
        record = server.client_records.get(client_id)
        params = write_back(entry.state.params, record) if record is not None else {}
        return ClientPlan(start=with_params(entry.state, params))

    def selections(self, server: ServerState, uploads: dict[int, Upload]) -> dict[int, dict[str, list[int]]]:
        """Each uploading client's ``s`` sampled groups per tower, ``{cid: {"text": [...], "vision": [...]}}``:
        :func:`upload_probabilities` against the server's global prompts (uniform in round 1), sampled with the
        client's stream of the round (the same stream for both towers, from its start)."""
        first = server.round == 0
        out = {}
        for cid in sorted(uploads):
            params = uploads[cid].state.params
            out[cid] = {}
            for name, global_name, key in TOWERS:
                probs = upload_probabilities(params[name], None if first else server.global_state[global_name],
                                             self.cfg.method.mgp_temperature)
                rng = client_rng(self.cfg.seed, server.round + 1, cid, purpose=SELECTION_PURPOSE)
                out[cid][key] = sample_groups(probs, self.upload_count, rng)
        return out

    def aggregate(self, server: ServerState, uploads: dict[int, Upload], sizes: dict[int, int]) -> ServerState:
        """Rank-wise unweighted averages of the sampled groups (``combine_prompts`` with equal weights: DP, robust
        rules and upload attacks apply), and each uploading client's new record (new objects; old ones untouched)."""
        new = super().aggregate(server, uploads, sizes)
        if not uploads:
            return new
        chosen = self.selections(server, uploads)
        ids = sorted(uploads)
        current = {g: server.global_state[g] for _, g, _ in TOWERS}
        states = {c: {g: uploads[c].state.params[n][torch.as_tensor(chosen[c][k])] for n, g, k in TOWERS}
                  for c in ids}
        averaged = combine_prompts(self.cfg, current, states, {c: 1 for c in ids}, server.round + 1)
        new.global_state = {**server.global_state, **{g: averaged[g].clone() for g in current}}
        for cid in ids:
            record = {"round": new.round}
            for _, g, key in TOWERS:
                record[f"{key}_index"] = list(chosen[cid][key])
                record[key] = averaged[g].clone()
            new.client_records[cid] = record
        return new

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        """What the client holds after its last round: its groups with the global values written back (the
        initial groups when it never trained)."""
        return self.plan(server, client_id, entry, initial)

    def global_plan(self, server: ServerState, initial: ClientState) -> ClientPlan | None:
        """None: no global model (every client's model includes its private groups)."""
        return None
