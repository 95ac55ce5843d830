"""pFedMoAP client: local prompt + a private attention gate over K downloaded (frozen) expert prompts."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fedlit.backbone import Backbone
from fedlit.config import GateConfig
from fedlit.gating import AttentionGate
from fedlit.modules.base import as_config
from fedlit.modules.coop import CTX, CoOpClient
from fedlit.state import GATE


def _resize_expert_ctx(module: PFedMoAPClient, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: a saved client may hold another number of experts K than this one; take its shape."""
    saved = state_dict.get(prefix + "expert_ctx")
    if saved is not None:
        module.expert_ctx = torch.empty_like(saved, device=module.expert_ctx.device)


def _encode_loaded_experts(module: PFedMoAPClient, incompatible_keys) -> None:
    """Load post-hook: encode the loaded expert prompts (their features are derived, never saved)."""
    module.load_experts(module.expert_ctx.clone() if module.expert_ctx.numel() else None)


class PFedMoAPClient(CoOpClient):
    """Logits ``lam * s * I T_L^T + s * <P(I), gate(I; [T_L, T_1..T_K])>`` (SPEC §2); local logits alone while no
    experts are loaded. Expert text features are computed once when loaded (no grad) and kept as a buffer."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], gate: GateConfig | None = None,
                 lam: float = 0.5, **kwargs):
        super().__init__(backbone, classnames, **kwargs)
        gate = as_config(GateConfig, gate)
        self.gate = AttentionGate(self.backbone.feature_dim, d_gate=gate.d_gate, num_heads=gate.num_heads,
                                  scale=gate.scale, top_k=gate.top_k, cap=gate.cap)
        self.lam = lam
        self.register_buffer("expert_ctx", torch.empty(0))  # (K, *ctx_shape) loaded experts, saved with the module
        self.register_buffer("expert_features", torch.empty(0), persistent=False)  # (K, C, D), frozen
        self._feature_cache: dict[int, tuple[int, Tensor]] = {}  # pool id -> (upload round, features (C, D))
        self.expert_ids: list[int] | None = None  # pool ids of the loaded experts (None: not known or none loaded)
        self.register_load_state_dict_pre_hook(_resize_expert_ctx)
        self.register_load_state_dict_post_hook(_encode_loaded_experts)

    @property
    def num_loaded_experts(self) -> int:
        """K, the number of non-local experts currently loaded."""
        return int(self.expert_features.shape[0]) if self.expert_features.numel() else 0

    @torch.no_grad()
    def expert_text_features(self, expert_ctx: Tensor) -> Tensor:
        """Normalised text features ``(K, C, D)`` of ``K`` stacked expert contexts ``(K, *ctx_shape)``."""
        return self.prompt_learner.text_features(self.backbone, expert_ctx.to(self.prompt_learner.ctx))

    def load_experts(self, expert_ctx: Tensor | None, keys: list | None = None) -> None:
        """Load ``K`` frozen expert prompts ``(K, *ctx_shape)`` (None or K = 0 unloads them) and encode them.

        ``keys`` (one hashable ``[pool id, upload round]`` per expert) lets the module reuse an expert's features
        across the clients of a process: each distinct expert prompt is encoded once. The cache keeps at most one
        entry per pool id, its newest round, so it never outgrows the pool.
        """
        if expert_ctx is None or expert_ctx.shape[0] == 0:
            self.expert_ctx = torch.empty(0)
            self.expert_features = torch.empty(0)
            self.expert_ids = None
            return
        keys = keys if keys is not None else [None] * expert_ctx.shape[0]
        if len(keys) != expert_ctx.shape[0]:
            raise ValueError(f"{len(keys)} expert keys for {expert_ctx.shape[0]} expert prompts")
        self.expert_ids = None if any(k is None for k in keys) else [int(k[0]) for k in keys]
        self.expert_ctx = expert_ctx.detach().clone().to(self.prompt_learner.ctx)
        self.expert_features = torch.stack([self._expert_features(self.expert_ctx[j : j + 1], key)
                                            for j, key in enumerate(keys)])

    def _expert_features(self, ctx: Tensor, key) -> Tensor:
        """Features ``(C, D)`` of one expert prompt ``(1, *ctx_shape)``, through the per-process cache."""
        if key is None:
            return self.expert_text_features(ctx)[0]
        pool_id, upload_round = (int(k) for k in key)
        cached = self._feature_cache.get(pool_id)
        if cached is not None and cached[0] == upload_round:
            return cached[1]
        features = self.expert_text_features(ctx)[0]
        if cached is None or cached[0] < upload_round:  # an older upload of this client is never needed again
            self._feature_cache[pool_id] = (upload_round, features)
        return features

    @torch.no_grad()
    def expert_attention(self, image_features: Tensor) -> Tensor | None:
        """The gate's weight of each expert per (image, class, head), ``(B, C, H, E)``, the local expert first and
        the loaded experts in their plan order (None without experts)."""
        if self.num_loaded_experts == 0:
            return None
        text = self.class_text_features()
        experts = torch.cat([text.unsqueeze(0), self.expert_features.to(text)], dim=0)
        return self.gate.expert_weights(image_features, experts)

    def diagnostics(self, image_features: Tensor) -> dict[str, Tensor]:
        """``expert_attention``: each expert's weight per image ``(B, E)``, averaged over classes and heads, and
        ``expert_ids``: the loaded experts' pool ids ``(B, K)`` (the same row for every image; when the plan named
        them), so that a run's results say whose prompts each client mixes (none without experts)."""
        weights = self.expert_attention(image_features)
        if weights is None:
            return {}
        out = {"expert_attention": weights.float().mean(dim=(1, 2))}
        if self.expert_ids is not None:
            out["expert_ids"] = torch.tensor(self.expert_ids, dtype=torch.float32).expand(len(image_features), -1)
        return out

    def set_extras(self, extras: dict[str, Any]) -> None:
        """``experts`` ``(K, *ctx_shape)`` with their ``expert_keys``; without them the client has no experts."""
        rest = dict(extras)
        self.load_experts(rest.pop("experts", None), rest.pop("expert_keys", None))
        super().set_extras(rest)

    def set_expert_features(self, features: Tensor | None) -> None:
        """Load precomputed expert text features ``(K, C, D)`` (e.g. shared by several modules)."""
        self.expert_features = torch.empty(0) if features is None else features.detach()

    def logits_from(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        return self._mixture(image_features, text_features, self.expert_features)

    def client_extras(self) -> dict[str, Tensor]:
        """The FedProx centre and the loaded expert text features ``(K, C, D)`` (empty when K = 0)."""
        return {**super().client_extras(), "expert_features": self.expert_features}

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Logits ``(G, B, C)`` of G clients sharing K: stacked contexts through one text-tower pass, stacked gate
        weights and expert features ``(G, K, C, D)`` through one gate call (local logits alone when K = 0)."""
        text = self.prompt_learner.text_features(self.backbone, params[CTX])
        gate = {name[len(GATE):]: p for name, p in params.items() if name.startswith(GATE)}
        return self._mixture(image_features, text, extras["expert_features"], gate)

    def _mixture(self, image_features: Tensor, text_features: Tensor, expert_features: Tensor,
                 gate_weights: dict[str, Tensor] | None = None) -> Tensor:
        """``lam * local + moe`` for one client (``(B, D)``, ``(C, D)``, ``(K, C, D)``; this module's gate) or for a
        group (a leading G everywhere and the G stacked gates' ``gate_weights``); local logits alone when K = 0."""
        local = super().logits_from(image_features, text_features)
        if expert_features.numel() == 0:
            return local
        experts = torch.cat([text_features.unsqueeze(-3), expert_features.to(text_features)], dim=-3)
        scale = self.backbone.logit_scale
        if gate_weights is None:
            moe = self.gate.moe_logits(image_features, experts, scale)
        else:
            moe = self.gate.group_moe_logits(image_features, experts, scale, gate_weights)
        return self.lam * local + moe

    def param_groups(self) -> list[dict]:
        return super().param_groups() + [
            {"params": list(self.gate.parameters()), "lr": self.optim.gate_lr, "schedule": "constant"}
        ]
