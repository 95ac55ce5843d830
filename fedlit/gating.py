"""pFedMoAP attention gate: mixes a client's local and non-local (expert) text features per image.

The gate works at a reduced width ``d_gate``: features are down-sampled by keeping every r-th coordinate.
For each class c the query is the image, the keys and values are that class's text features under every
expert prompt (the local expert first), and multi-head attention with a fixed score scale mixes them into
one class embedding per image (SPEC §2 items 4-7 and 10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def downsample(z: Tensor, d_gate: int) -> Tensor:
    """Keep every r-th coordinate of the last axis, ``r = D // d_gate``: ``(..., D) -> (..., d_gate)``.

    This is a strided slice (a view), not average pooling.
    """
    dim = z.shape[-1]
    if d_gate < 1 or d_gate > dim or dim % d_gate != 0:
        raise ValueError(
            f"d_gate={d_gate} must divide the feature width {dim}; "
            "set gate.d_gate to a divisor of it (128 for CLIP widths 512/1024)"
        )
    return z[..., :: dim // d_gate]


class AttentionGate(nn.Module):
    """Multi-head attention over experts: one image query, keys = values = the experts' class features.

    Four ``Linear(d_gate, d_gate)`` projections (66,048 parameters at ``d_gate = 128``) with PyTorch's
    default init. Scores are ``scale * <Q_h, K_h>`` with a fixed ``scale`` (not ``1/sqrt(d_head)``);
    no dropout, residual, layer norm or output re-normalisation. ``top_k`` keeps the k best experts per
    (image, class, head), weighted by their un-renormalised softmax probabilities (``k = 1``: hard routing).
    """

    def __init__(
        self,
        feature_dim: int,
        d_gate: int = 128,
        num_heads: int = 8,
        scale: float = 10.0,
        top_k: int | None = None,
    ) -> None:
        super().__init__()
        if d_gate < 1 or d_gate > feature_dim or feature_dim % d_gate != 0:
            raise ValueError(
                f"d_gate={d_gate} must divide feature_dim={feature_dim}; "
                "set gate.d_gate to a divisor of it (128 for CLIP widths 512/1024)"
            )
        if num_heads < 1 or d_gate % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide d_gate={d_gate}; use e.g. 8 heads")
        if top_k is not None and (isinstance(top_k, bool) or top_k < 1):
            raise ValueError(f"top_k={top_k!r} must be None (all experts) or an integer >= 1")
        self.feature_dim = feature_dim
        self.d_gate = d_gate
        self.num_heads = num_heads
        self.scale = float(scale)
        self.top_k = top_k
        self.q_proj = nn.Linear(d_gate, d_gate)
        self.k_proj = nn.Linear(d_gate, d_gate)
        self.v_proj = nn.Linear(d_gate, d_gate)
        self.out_proj = nn.Linear(d_gate, d_gate)

    def extra_repr(self) -> str:
        return (
            f"feature_dim={self.feature_dim}, d_gate={self.d_gate}, num_heads={self.num_heads}, "
            f"scale={self.scale}, top_k={self.top_k}"
        )

    def reset_parameters(self) -> None:
        """Re-draw all four projections with PyTorch's default ``Linear`` init (uses the global RNG)."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            proj.reset_parameters()

    def forward(self, image_features: Tensor, expert_text_features: Tensor) -> Tensor:
        """Mixed class embeddings ``T_moe`` of shape ``(C, B, d_gate)``.

        ``image_features``: ``(B, D)``, normalised. ``expert_text_features``: ``(E, C, D)``, normalised,
        expert 0 the local one (pass it undetached so the gradient reaches the local prompt).
        """
        query, experts = self._gate_inputs(image_features, expert_text_features)
        return self._attend(query, experts)

    def moe_logits(
        self, image_features: Tensor, expert_text_features: Tensor, logit_scale: Tensor | float
    ) -> Tensor:
        """MoE logits ``s * <P(I_b), T_moe[c, b]>`` of shape ``(B, C)`` (a scaled dot product, no cosine).

        ``logit_scale`` is the multiplier ``s`` itself, i.e. ``clip.logit_scale.exp()``.
        """
        query, experts = self._gate_inputs(image_features, expert_text_features)
        t_moe = self._attend(query, experts)
        return logit_scale * torch.einsum("bd,cbd->bc", query.to(t_moe.dtype), t_moe)

    def _gate_inputs(self, image_features: Tensor, expert_text_features: Tensor) -> tuple[Tensor, Tensor]:
        if image_features.dim() != 2 or image_features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"image_features must be (B, {self.feature_dim}), got {tuple(image_features.shape)}"
            )
        if expert_text_features.dim() != 3 or expert_text_features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"expert_text_features must be (E, C, {self.feature_dim}) with the local expert first, "
                f"got {tuple(expert_text_features.shape)}"
            )
        if expert_text_features.shape[0] == 0:
            raise ValueError("expert_text_features has no experts; without experts use local logits only")
        return downsample(image_features, self.d_gate), downsample(expert_text_features, self.d_gate)

    def _attend(self, query: Tensor, experts: Tensor) -> Tensor:
        """``query`` (B, d_g), ``experts`` (E, C, d_g) -> (C, B, d_g)."""
        num_experts, num_classes, _ = experts.shape
        batch = query.shape[0]
        heads, d_head = self.num_heads, self.d_gate // self.num_heads
        # Heads as contiguous chunks of d_gate (nn.MultiheadAttention's layout): q (H, B, d_h),
        # k and v (C, H, E, d_h); the classes form the batch axis, so one kernel covers all of them.
        q = self.q_proj(query).view(batch, heads, d_head).transpose(0, 1)
        k = self.k_proj(experts).view(num_experts, num_classes, heads, d_head).permute(1, 2, 0, 3)
        v = self.v_proj(experts).view(num_experts, num_classes, heads, d_head).permute(1, 2, 0, 3)
        if self.top_k is None or self.top_k >= num_experts:
            q = q.unsqueeze(0).expand(num_classes, heads, batch, d_head)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (C, H, B, d_h)
        else:
            out = self._attend_top_k(q, k, v)
        out = out.permute(0, 2, 1, 3).reshape(num_classes, batch, self.d_gate)
        return self.out_proj(out)

    def _attend_top_k(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Switch-style routing: ``q`` (H, B, d_h), ``k``/``v`` (C, H, E, d_h) -> (C, H, B, d_h).

        The kept experts keep their full-softmax probabilities, so the weights do not sum to one and the
        gate still receives a gradient through them (a renormalised top-1 weight would be constant 1).
        """
        scores = self.scale * torch.einsum("hbd,ched->chbe", q, k)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        top = probs.topk(self.top_k, dim=-1).indices
        weights = torch.zeros_like(probs).scatter(-1, top, probs.gather(-1, top))
        return torch.einsum("chbe,ched->chbd", weights.to(v.dtype), v)
