"""pFedMoAP with a linear-projection gate (the ablation of pFedMoAP's Table 7): instead of attention, a classic MoE
gate ``w = softmax(W P(I) + b)`` mixes the local and the K non-local experts with one weight per image and expert.

The gate's input is the down-sampled image feature ``P(I)`` (``d_gate`` wide, as for the attention gate); its
``num_experts`` outputs are the expert slots, slot 0 the local expert and slots 1..K the downloaded experts in the
order the server lists them (nearest first with KNN selection). While fewer than K experts are loaded, only the
first ``1 + K_loaded`` outputs enter the softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedlit.backbone import Backbone
from fedlit.config import GateConfig
from fedlit.gating import cap_weights, downsample
from fedlit.modules.base import as_config
from fedlit.modules.pfedmoap import PFedMoAPClient


def linear_gate_weights(query: Tensor, weight: Tensor, bias: Tensor, num_experts: int,
                        top_k: int | None = None, cap: float | None = None) -> Tensor:
    """Mixture weights ``(G, B, E)`` of G gates: ``softmax(query W^T + b)`` over the first ``E = num_experts``
    outputs, from ``query`` (G, B, d_g), ``weight`` (G, E_max, d_g), ``bias`` (G, E_max). With ``top_k`` only the k
    largest weights per image are kept, un-renormalised (Switch-style, as the attention gate's ``top_k``); then
    ``cap`` bounds the downloaded experts' weights (:func:`~fedlit.gating.cap_weights`)."""
    scores = torch.baddbmm(bias[:, :num_experts].unsqueeze(1), query, weight[:, :num_experts].transpose(1, 2))
    probs = torch.softmax(scores, dim=-1)
    if top_k is not None and top_k < num_experts:
        top = probs.topk(top_k, dim=-1).indices
        probs = torch.zeros_like(probs).scatter(-1, top, probs.gather(-1, top))
    return cap_weights(probs, cap)


class LinearGate(nn.Module):
    """One ``Linear(d_gate, num_experts)`` over the down-sampled image feature; the MoE class embedding is
    ``T_moe[b, c] = sum_e w[b, e] P(T_e[c])`` and the MoE logits ``s <P(I_b), T_moe[b, c]>`` (a scaled dot product,
    as in the attention gate). ``(d_gate + 1) * num_experts`` parameters (1,290 at d_gate = 128, 10 experts)."""

    def __init__(self, feature_dim: int, num_experts: int, d_gate: int = 128, top_k: int | None = None,
                 cap: float | None = None) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be >= 1")
        downsample(torch.zeros(1, feature_dim), d_gate)  # refuses a d_gate that does not divide the width
        self.feature_dim = feature_dim
        self.d_gate = d_gate
        self.num_experts = num_experts
        self.top_k = top_k
        self.cap = None if cap is None else float(cap)
        self.proj = nn.Linear(d_gate, num_experts)

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, d_gate={self.d_gate}, num_experts={self.num_experts}, " \
               f"top_k={self.top_k}"

    def stacked_weights(self) -> dict[str, Tensor]:
        """This gate as a group of one: ``{"proj.weight": (1, E_max, d_g), "proj.bias": (1, E_max)}`` (views)."""
        return {name: p.unsqueeze(0) for name, p in self.named_parameters()}

    def mixture_weights(self, image_features: Tensor, num_experts: int,
                        weights: dict[str, Tensor] | None = None) -> Tensor:
        """Mixture weights ``(G, B, E)`` of G gates for images ``(G, B, D)`` over the first ``num_experts`` slots."""
        if num_experts > self.num_experts:
            raise ValueError(f"{num_experts} experts loaded but the linear gate has {self.num_experts} outputs")
        weights = self.stacked_weights() if weights is None else weights
        query = downsample(image_features, self.d_gate)
        return linear_gate_weights(query, weights["proj.weight"].to(query), weights["proj.bias"].to(query),
                                   num_experts, self.top_k, self.cap)

    def expert_weights(self, image_features: Tensor, expert_text_features: Tensor) -> Tensor:
        """Each expert's weight ``(B, C, 1, E)`` for images ``(B, D)`` and experts ``(E, C, D)``: one mixture per
        image, shared by every class (one "head"), as :meth:`AttentionGate.expert_weights` lays it out."""
        mix = self.mixture_weights(image_features.unsqueeze(0), expert_text_features.shape[0])[0]  # (B, E)
        return mix[:, None, None, :].expand(-1, expert_text_features.shape[1], 1, -1)

    def group_moe_logits(self, image_features: Tensor, expert_text_features: Tensor, logit_scale: Tensor | float,
                         weights: dict[str, Tensor] | None = None) -> Tensor:
        """MoE logits ``(G, B, C)`` of G gates: ``s * sum_e w[g, b, e] <P(I_gb), P(T_gec)>`` from images
        ``(G, B, D)`` and experts ``(G, E, C, D)`` (local expert first)."""
        mix = self.mixture_weights(image_features, expert_text_features.shape[1], weights)
        query = downsample(image_features, self.d_gate)
        experts = downsample(expert_text_features, self.d_gate).to(query)
        per_expert = torch.einsum("gbd,gecd->gbec", query, experts)
        return logit_scale * torch.einsum("gbe,gbec->gbc", mix.to(per_expert), per_expert)

    def moe_logits(self, image_features: Tensor, expert_text_features: Tensor,
                   logit_scale: Tensor | float) -> Tensor:
        """MoE logits ``(B, C)`` of this gate from images ``(B, D)`` and experts ``(E, C, D)``."""
        return self.group_moe_logits(image_features.unsqueeze(0), expert_text_features.unsqueeze(0), logit_scale)[0]


class PFedMoAPLinearClient(PFedMoAPClient):
    """pFedMoAP's client with :class:`LinearGate` in place of the attention gate: logits
    ``lam * s I T_L^T + s sum_e w_e(I) <P(I), P(T_e)>``; local logits alone while no experts are loaded.
    ``num_experts`` counts the local expert (``method.num_experts``); ``gate.num_heads`` and ``gate.scale`` are not
    used."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], gate: GateConfig | None = None,
                 lam: float = 0.5, num_experts: int = 10, **kwargs):
        super().__init__(backbone, classnames, gate=gate, lam=lam, **kwargs)
        gate = as_config(GateConfig, gate)
        self.gate = LinearGate(self.backbone.feature_dim, num_experts, d_gate=gate.d_gate, top_k=gate.top_k,
                               cap=gate.cap)
