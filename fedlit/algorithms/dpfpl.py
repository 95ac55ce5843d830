"""DP-FPL (Tran et al., ICLR 2025): personalised federated prompt learning with differential privacy, on the
synchronous mode (FedSGD-style: every batch step combines the clients' global-prompt gradients).

Each client holds the global prompt ``ctx_g`` (shared, ``prompt_learner.ctx``) and a private local prompt ``ctx_l``
(:mod:`fedlit.modules.dpfpl`); its model is ``ctx_g + ctx_l``. At every step of a round the clients' gradients of
``ctx_g`` are clipped to ``privacy.clip``, summed, noised and averaged (:meth:`Algorithm.combine_gradients`, central
DP by default; nothing but the mean without ``privacy.clip``), and every client steps ``ctx_g`` with that one
gradient. The gradient of ``ctx_l`` goes through DP-FPL's low-rank factorisation: a fresh ``(u, v)`` of ``ctx_l``
per step, the factor gradients ``G vᵀ`` and ``uᵀ G`` clipped and noised as the public code does (with DP on), then
mapped back by :func:`~fedlit.modules.dpfpl.full_gradient`. The server's new global prompt is the round's final
``ctx_g`` (every upload holds it). Clients are evaluated with the current ``ctx_g`` plus their own ``ctx_l``; the
global model is ``ctx_g`` alone.
"""

from __future__ import annotations

import numpy as np
import torch

from fedlit import privacy
from fedlit.algorithms.base import GLOBAL_PROMPT, Algorithm, with_params
from fedlit.backbone import Backbone
from fedlit.modules.dpfpl import LOCAL, DPFPLClient, factorize_context, full_gradient
from fedlit.state import PROMPT, ClientPlan, ClientState, Params, ServerState, StoreEntry, SyncStep, Upload

FACTOR_STREAM = 41_597_713  # the Gaussian draw of a step's factorisation (seeded by seed, round, step, client)


def factor_generator(seed: int, round_index: int, step: int, client_id: int) -> torch.Generator:
    """The torch generator of client ``client_id``'s factorisation at ``step`` of ``round_index``."""
    state = np.random.SeedSequence([seed, round_index, step, client_id, FACTOR_STREAM]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & (2**63 - 1))


class DPFPL(Algorithm):
    name = "dpfpl"
    synchronous = True

    def build_module(self, backbone: Backbone, classnames: list[str]) -> DPFPLClient:
        return DPFPLClient(backbone, classnames, **self.module_kwargs())

    def private_gradients(self, client_id: int, params: Params, grads: Params, step: SyncStep) -> Params:
        """The local prompt's gradient through the factorisation ``(u, v)`` of its current value: the factor
        gradients ``G vᵀ``, ``uᵀ G`` (``G`` the autograd gradient of ``ctx_l``), each clipped to ``privacy.clip`` and
        given ``N(0, (z C)²)`` noise (seeded by (seed, round, step, client)) when DP is on, then
        :func:`~fedlit.modules.dpfpl.full_gradient`."""
        cfg = self.cfg
        local, grad = params[LOCAL].float(), grads[LOCAL].float()
        u, v, _ = factorize_context(local.cpu(), cfg.method.dpfpl_rank,
                                    factor_generator(cfg.seed, step.round, step.step, client_id))
        u, v = u.to(grad.device), v.to(grad.device)
        grad_u, grad_v = grad @ v.transpose(-1, -2), u.transpose(-1, -2) @ grad
        if privacy.enabled(cfg):
            clip = float(cfg.privacy.clip)
            std = privacy.step_noise_multiplier(cfg, self.bound()) * clip
            noise = torch.from_numpy(privacy.local_noise(grad_u.numel() + grad_v.numel(), std, cfg.seed, step.round,
                                                         client_id, step=step.step)).to(grad)
            grad_u = clip_tensor(grad_u, clip) + noise[: grad_u.numel()].reshape(grad_u.shape)
            grad_v = clip_tensor(grad_v, clip) + noise[grad_u.numel() :].reshape(grad_v.shape)
        return {LOCAL: full_gradient(u, v, grad_u, grad_v).to(grads[LOCAL].dtype)}

    def aggregate(self, server: ServerState, uploads: dict[int, Upload], sizes: dict[int, int]) -> ServerState:
        """The round's final global prompt (every upload holds the same one)."""
        new = super().aggregate(server, uploads, sizes)
        new.global_state = {**server.global_state, GLOBAL_PROMPT: uploads[min(uploads)].state.params[PROMPT].clone()}
        return new

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        """The current global prompt with the client's own local prompt (its initial one if it never trained)."""
        return self.plan(server, client_id, entry, initial)

    def global_plan(self, server: ServerState, initial: ClientState) -> ClientPlan:
        """The global prompt alone: a zero local prompt."""
        zero = torch.zeros_like(initial.params[LOCAL])
        return ClientPlan(start=with_params(initial, {PROMPT: server.global_state[GLOBAL_PROMPT], LOCAL: zero}))


def clip_tensor(t: torch.Tensor, clip: float) -> torch.Tensor:
    """``t`` scaled by ``min(1, clip / ||t||)`` (L2 norm over all entries, as the public code clips)."""
    norm = float(t.norm(2))
    return t * (clip / norm) if norm > clip else t
