"""DP-FPL client: a global prompt plus a private local prompt, ``ctx_g + ctx_l``, whose local part DP-FPL trains
through a low-rank factorisation plus a residual (:func:`factorize_context`, :func:`full_gradient`).

The public code's client context is ``global_ctx + u v + residual`` with ``(u, v)`` a one-step power-iteration
factorisation of ``local_ctx`` and ``residual = local_ctx - u v`` (no gradient): in value that is
``global_ctx + local_ctx`` (up to fp32 rounding), which is what this module computes. The factorisation matters
for the gradient of ``local_ctx`` only, which the algorithm maps (``DPFPL.private_gradients``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedlit.backbone import Backbone
from fedlit.config import PromptConfig
from fedlit.modules.base import as_config
from fedlit.modules.coop import CTX, CoOpClient
from fedlit.prompts import init_context

LOCAL = "local_ctx"  # the private local prompt (parameter name)
GRAD_SCALE = 10.0  # compute_full_grad divides both factor gradients by 10 in the public code


def orthogonalize(matrix: Tensor) -> Tensor:
    """Gram-Schmidt on the columns of ``matrix (..., n, r)`` (the public code's ``orthogonalize``, column by column,
    batched over leading dimensions); returns a new tensor with orthonormal columns."""
    out = matrix.clone()
    for i in range(out.shape[-1]):
        col = out[..., i : i + 1] / out[..., i : i + 1].pow(2).sum(dim=-2, keepdim=True).sqrt()
        out[..., i : i + 1] = col
        if i + 1 < out.shape[-1]:
            rest = out[..., i + 1 :]
            out[..., i + 1 :] = rest - (col * rest).sum(dim=-2, keepdim=True) * col
    return out


def factorize_context(local: Tensor, rank: int,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The public code's ``factorize_ctx``: for ``local (..., n_ctx, W)`` and a Gaussian draw ``R (..., W, r)``,
    ``u = orth(local R)`` ``(..., n_ctx, r)``, ``v = orth(localᵀ u)ᵀ`` ``(..., r, W)`` and
    ``residual = local - u v``; ``r = min(rank, n_ctx)``. No gradient."""
    with torch.no_grad():
        r = min(rank, local.shape[-2])
        draw = torch.randn((*local.shape[:-2], local.shape[-1], r), generator=generator).to(local)
        u = orthogonalize(local @ draw)
        v = orthogonalize(local.transpose(-1, -2) @ u).transpose(-1, -2)
        return u, v, local - u @ v


def full_gradient(u: Tensor, v: Tensor, grad_u: Tensor, grad_v: Tensor) -> Tensor:
    """The public code's ``compute_full_grad``: the local prompt's gradient ``(..., n_ctx, W)`` from the factors
    ``u (..., n, r)``, ``v (..., r, W)`` and their (clipped, noised) gradients, each scaled by 1/10:
    ``g_u v + u g_v + u uᵀ g_u v``."""
    gu, gv = grad_u / GRAD_SCALE, grad_v / GRAD_SCALE
    gu_v = gu @ v
    return gu_v + u @ gv + u @ (u.transpose(-1, -2) @ gu_v)


class DPFPLClient(CoOpClient):
    """Logits ``s * I T^T`` with ``T`` the normalised text features of ``ctx_g + ctx_l`` (``ctx_g`` is
    ``prompt_learner.ctx``, shared; ``ctx_l`` is ``local_ctx``, private, ``N(0, init_std²)`` from its own seeded
    stream). Both are trained with the prompt learning rate, constant (the public code's scheduler never steps)."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], prompt: PromptConfig | None = None,
                 seed: int | None = None, **kwargs):
        super().__init__(backbone, classnames, prompt=prompt, seed=seed, **kwargs)
        backbone = self.backbone  # the loaded one when given by name
        prompt = as_config(PromptConfig, prompt)
        learner = self.prompt_learner
        local = init_context(learner.n_ctx, backbone.text_width, learner.num_classes if learner.class_specific
                             else None, prompt.init_std, None if seed is None else seed + 1)
        self.local_ctx = nn.Parameter(local.to(learner.ctx))

    def client_context(self) -> Tensor:
        """The client's context ``ctx_g + ctx_l`` ``(*ctx_shape)``."""
        return self.prompt_learner.ctx + self.local_ctx

    def class_text_features(self) -> Tensor:
        return self.prompt_learner.text_features(self.backbone, self.client_context())

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Logits ``(G, B, C)`` of G clients' ``ctx_g + ctx_l``, one text-tower pass."""
        ctx = params[CTX] + params[LOCAL]
        return self.logits_from(image_features, self.prompt_learner.text_features(self.backbone, ctx))

    def param_groups(self) -> list[dict]:
        return [{"params": [self.prompt_learner.ctx, self.local_ctx], "lr": self.optim.prompt_lr,
                 "schedule": "constant"}]
