"""pFedMoAP attention gate: mixes a client's local and non-local (expert) text features per image.

The gate works at a reduced width ``d_gate``: features are down-sampled by keeping every r-th coordinate.
For each class c the query is the image, the keys and values are that class's text features under every
expert prompt (the local expert first), and multi-head attention with a fixed score scale mixes them into
one class embedding per image (SPEC §2 items 4-7 and 10).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlit.errors import UserError


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_settings(feature_dim: int, d_gate: int, num_heads: int, scale: float, top_k: int | None,
                    cap: float | None = None) -> None:
    """UserError (the ``gate.*`` settings are user input) for a width, head count, scale, top-k or cap that cannot
    work."""
    if not _is_int(d_gate) or d_gate < 1 or d_gate > feature_dim or feature_dim % d_gate != 0:
        raise UserError(
            f"gate.d_gate: d_gate={d_gate!r} must divide feature_dim={feature_dim}; "
            "set gate.d_gate to a divisor of it (128 for CLIP widths 512/1024)"
        )
    if not _is_int(num_heads) or num_heads < 1 or d_gate % num_heads != 0:
        raise UserError(f"gate.num_heads: num_heads={num_heads!r} must divide d_gate={d_gate}; use e.g. 8 heads")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise UserError(f"gate.scale: scale={scale!r} must be a finite number > 0")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise UserError(f"gate.top_k: top_k={top_k!r} must be None (all experts) or an integer >= 1")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap <= 1):
        raise UserError(f"gate.cap: cap={cap!r} must be None (no cap) or a number in (0, 1]")


def cap_weights(weights: Tensor, cap: float | None) -> Tensor:
    """Expert weights ``(..., E)`` (the local expert at index 0) with every downloaded expert's weight capped:
    ``w'_e = min(w_e, cap)`` for ``e >= 1`` and ``w'_0 = w_0 + sum_{e>=1} max(0, w_e - cap)``, so each row keeps
    its sum and the capped mass goes to the client's own expert (``cap`` None: ``weights`` unchanged)."""
    if cap is None:
        return weights
    others = weights[..., 1:].clamp(max=cap)
    local = weights[..., :1] + (weights[..., 1:] - others).sum(dim=-1, keepdim=True)
    return torch.cat([local, others], dim=-1)


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
    (image, class, head), weighted by their un-renormalised softmax probabilities (``k = 1``: hard routing);
    ``cap`` then bounds each downloaded expert's weight (:func:`cap_weights`).
    """

    def __init__(
        self,
        feature_dim: int,
        d_gate: int = 128,
        num_heads: int = 8,
        scale: float = 10.0,
        top_k: int | None = None,
        cap: float | None = None,
    ) -> None:
        super().__init__()
        _check_settings(feature_dim, d_gate, num_heads, scale, top_k, cap)
        self.feature_dim = feature_dim
        self.d_gate = d_gate
        self.num_heads = num_heads
        self.scale = float(scale)
        self.top_k = top_k
        self.cap = None if cap is None else float(cap)
        self.q_proj = nn.Linear(d_gate, d_gate)
        self.k_proj = nn.Linear(d_gate, d_gate)
        self.v_proj = nn.Linear(d_gate, d_gate)
        self.out_proj = nn.Linear(d_gate, d_gate)

    def extra_repr(self) -> str:
        return (
            f"feature_dim={self.feature_dim}, d_gate={self.d_gate}, num_heads={self.num_heads}, "
            f"scale={self.scale}, top_k={self.top_k}" + (f", cap={self.cap}" if self.cap is not None else "")
        )

    def reset_parameters(self) -> None:
        """Re-draw all four projections with PyTorch's default ``Linear`` init (uses the global RNG)."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            proj.reset_parameters()

    def stacked_weights(self) -> dict[str, Tensor]:
        """This gate's projections as a group of one: ``{"q_proj.weight": (1, d_g, d_g), "q_proj.bias": (1, d_g),
        ...}`` (views of the parameters, so gradients reach them)."""
        return {name: p.unsqueeze(0) for name, p in self.named_parameters()}

    def expert_weights(self, image_features: Tensor, expert_text_features: Tensor) -> Tensor:
        """The gate's weight of each expert per (image, class, head): ``(B, C, H, E)`` for images ``(B, D)`` and
        experts ``(E, C, D)`` (the local expert first). Rows sum to 1 (less with top-k routing, see
        :func:`routing_weights`); computed explicitly, outside the fused kernel, for inspection."""
        self._check_inputs(image_features, expert_text_features, grouped=False)
        query = downsample(image_features.unsqueeze(0), self.d_gate)
        experts = downsample(expert_text_features.unsqueeze(0), self.d_gate)
        q, k, _ = _heads(query, experts, self.stacked_weights(), self.num_heads)
        return routing_weights(q, k, self.scale, self.top_k, self.cap).permute(2, 0, 1, 3)

    def forward(self, image_features: Tensor, expert_text_features: Tensor) -> Tensor:
        """Mixed class embeddings ``T_moe`` of shape ``(C, B, d_gate)``.

        ``image_features``: ``(B, D)``, normalised. ``expert_text_features``: ``(E, C, D)``, normalised,
        expert 0 the local one (pass it undetached so the gradient reaches the local prompt).
        """
        self._check_inputs(image_features, expert_text_features, grouped=False)
        return self.group_forward(image_features.unsqueeze(0), expert_text_features.unsqueeze(0))[0]

    def moe_logits(
        self, image_features: Tensor, expert_text_features: Tensor, logit_scale: Tensor | float
    ) -> Tensor:
        """MoE logits ``s * <P(I_b), T_moe[c, b]>`` of shape ``(B, C)`` (a scaled dot product, no cosine).

        ``logit_scale`` is the multiplier ``s`` itself, i.e. ``clip.logit_scale.exp()``.
        """
        self._check_inputs(image_features, expert_text_features, grouped=False)
        return self.group_moe_logits(image_features.unsqueeze(0), expert_text_features.unsqueeze(0), logit_scale)[0]

    def group_forward(
        self, image_features: Tensor, expert_text_features: Tensor, weights: dict[str, Tensor] | None = None
    ) -> Tensor:
        """``T_moe`` of ``G`` gates at once: ``(G, B, D)`` images and ``(G, E, C, D)`` experts -> ``(G, C, B, d_g)``.

        ``weights``: the G gates' stacked projections (names as :meth:`stacked_weights`, each with a leading G);
        None uses this module's own weights (G = 1).
        """
        self._check_inputs(image_features, expert_text_features, grouped=True)
        weights = self.stacked_weights() if weights is None else weights
        query, experts = downsample(image_features, self.d_gate), downsample(expert_text_features, self.d_gate)
        return gate_attention(query, experts, weights, self.num_heads, self.scale, self.top_k, self.cap)

    def group_moe_logits(
        self,
        image_features: Tensor,
        expert_text_features: Tensor,
        logit_scale: Tensor | float,
        weights: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """MoE logits of ``G`` gates at once: ``(G, B, D)`` images, ``(G, E, C, D)`` experts -> ``(G, B, C)``."""
        t_moe = self.group_forward(image_features, expert_text_features, weights)
        query = downsample(image_features, self.d_gate)
        return logit_scale * torch.einsum("gbd,gcbd->gbc", query.to(t_moe.dtype), t_moe)

    def _check_inputs(self, image_features: Tensor, expert_text_features: Tensor, grouped: bool) -> None:
        lead, dims = ("G, ", 1) if grouped else ("", 0)
        if image_features.dim() != 2 + dims or image_features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"image_features must be ({lead}B, {self.feature_dim}), got {tuple(image_features.shape)}"
            )
        if expert_text_features.dim() != 3 + dims or expert_text_features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"expert_text_features must be ({lead}E, C, {self.feature_dim}) with the local expert first, "
                f"got {tuple(expert_text_features.shape)}"
            )
        if expert_text_features.shape[dims] == 0:
            raise ValueError("expert_text_features has no experts; without experts use local logits only")
        if grouped and image_features.shape[0] != expert_text_features.shape[0]:
            raise ValueError(
                f"image_features and expert_text_features must share the group size G, got "
                f"{image_features.shape[0]} and {expert_text_features.shape[0]}"
            )


def _linear(x: Tensor, weights: dict[str, Tensor], name: str) -> Tensor:
    """``G`` linear layers at once: ``x`` (G, N, i), ``weights[name.weight]`` (G, o, i), ``[name.bias]`` (G, o)."""
    return torch.baddbmm(weights[f"{name}.bias"].unsqueeze(1), x, weights[f"{name}.weight"].transpose(1, 2))


def gate_attention(
    query: Tensor,
    experts: Tensor,
    weights: dict[str, Tensor],
    num_heads: int,
    scale: float,
    top_k: int | None = None,
    cap: float | None = None,
) -> Tensor:
    """The gate's functional core for ``G`` gates: ``query`` (G, B, d_g), ``experts`` (G, E, C, d_g) (already
    down-sampled), ``weights`` the stacked projections (``"q_proj.weight"`` (G, d_g, d_g), ``"q_proj.bias"``
    (G, d_g), same for ``k_proj``, ``v_proj``, ``out_proj``) -> ``T_moe`` (G, C, B, d_g).

    :class:`AttentionGate` runs through here with G = 1, so a single gate and a group of gates share one
    implementation. All G gates and C classes go through one attention call.
    """
    groups, num_experts, num_classes, d_gate = experts.shape
    batch = query.shape[1]
    d_head = d_gate // num_heads
    q, k, v = _heads(query, experts, weights, num_heads)
    if (top_k is None or top_k >= num_experts) and cap is None:
        q = q.unsqueeze(0).expand(num_classes, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (C, G*H, B, d_h)
    else:
        out = _attend_routed(q, k, v, scale, top_k, cap)
    out = out.view(num_classes, groups, num_heads, batch, d_head).permute(1, 0, 3, 2, 4)
    out = _linear(out.reshape(groups, num_classes * batch, d_gate), weights, "out_proj")
    return out.view(groups, num_classes, batch, d_gate)


def _heads(query: Tensor, experts: Tensor, weights: dict[str, Tensor], num_heads: int) -> tuple[Tensor, ...]:
    """Projected heads: ``q`` (G*H, B, d_h), shared by every class, and ``k``, ``v`` (C, G*H, E, d_h).

    Heads are contiguous chunks of d_gate (nn.MultiheadAttention's layout). The classes form the batch axis and
    the (gate, head) pairs the head axis, so all G gates and C classes go through one attention call.
    """
    groups, num_experts, num_classes, d_gate = experts.shape
    batch = query.shape[1]
    d_head = d_gate // num_heads
    q = _linear(query, weights, "q_proj").view(groups, batch, num_heads, d_head).transpose(1, 2)
    q = q.reshape(groups * num_heads, batch, d_head)
    flat = experts.reshape(groups, num_experts * num_classes, d_gate)

    def keys(name: str) -> Tensor:
        out = _linear(flat, weights, name).view(groups, num_experts, num_classes, num_heads, d_head)
        return out.permute(2, 0, 3, 1, 4).reshape(num_classes, groups * num_heads, num_experts, d_head)

    return q, keys("k_proj"), keys("v_proj")


def routing_weights(q: Tensor, k: Tensor, scale: float, top_k: int | None = None, cap: float | None = None) -> Tensor:
    """Each expert's weight ``(C, N, B, E)`` for queries ``q`` (N, B, d_h) and keys ``k`` (C, N, E, d_h), N = gates
    x heads: the softmax of ``scale <q, k>`` over the E experts; with ``top_k``, the kept experts keep their
    full-softmax probabilities and the others get 0 (Switch-style: the weights do not sum to one, and the gate
    still receives a gradient through them; a renormalised top-1 weight would be constant 1); then ``cap`` bounds
    the downloaded experts' weights (:func:`cap_weights`)."""
    probs = torch.softmax(scale * torch.einsum("nbd,cned->cnbe", q, k), dim=-1, dtype=torch.float32)
    if top_k is not None and top_k < k.shape[2]:
        top = probs.topk(top_k, dim=-1).indices
        probs = torch.zeros_like(probs).scatter(-1, top, probs.gather(-1, top))
    return cap_weights(probs, cap)


def _attend_routed(q: Tensor, k: Tensor, v: Tensor, scale: float, top_k: int | None, cap: float | None) -> Tensor:
    """Top-k routing and/or capped weights: ``q`` (N, B, d_h), ``k``/``v`` (C, N, E, d_h) -> (C, N, B, d_h) (see
    :func:`routing_weights`)."""
    return torch.einsum("cnbe,cned->cnbd", routing_weights(q, k, scale, top_k, cap).to(v.dtype), v)
