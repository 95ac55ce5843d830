"""MaPLe client (Khattak et al., CVPR 2023): multi-modal prompts, the vision prompts projected from the text ones.

The text side is CoOp's context ``ctx (n, W_t)`` plus deep text prompts ``deep_text (J-1, n, W_t)`` (replacing the
context positions before text blocks ``1..J-1``); the vision side has no prompt of its own: its shallow prompt is
``ctx W^T + b (n, W_v)`` and its deep prompt before block ``start + j`` is ``deep_text[j-1] W_j^T + b_j``, learnable
coupling functions (the public code's ``proj`` and ``compound_prompt_projections``, one ``Linear(W_t, W_v)`` each).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def couple(ctx: Tensor, deep_text: Tensor, proj_weight: Tensor, proj_bias: Tensor, deep_weight: Tensor,
           deep_bias: Tensor) -> tuple[Tensor, list[Tensor]]:
    """MaPLe's vision prompts from its text prompts: the shallow one ``ctx W^T + b`` ``(..., n, W_v)`` and the deep
    ones ``deep_text[..., j] W_j^T + b_j`` ``(..., n, W_v)`` for ``j < J-1``. ``ctx (..., n, W_t)``, ``deep_text
    (..., J-1, n, W_t)``, ``proj_weight (..., W_v, W_t)``, ``proj_bias (..., W_v)``, ``deep_weight (..., J-1, W_v,
    W_t)``, ``deep_bias (..., J-1, W_v)``; leading dimensions (a group of clients) broadcast."""
    shallow = ctx @ proj_weight.transpose(-1, -2) + proj_bias.unsqueeze(-2)
    deep = deep_text @ deep_weight.transpose(-1, -2) + deep_bias.unsqueeze(-2)
    return shallow, list(deep.unbind(-3))


def linear_init(out_features: int, in_features: int, generator: torch.Generator | None = None,
                copies: int | None = None) -> tuple[Tensor, Tensor]:
    """``nn.Linear``'s default initialisation of a ``Linear(in_features, out_features)``: weight ``(out, in)`` and
    bias ``(out,)``, both ``U(-1/sqrt(in), 1/sqrt(in))`` (kaiming-uniform with ``a = sqrt(5)``), drawn from
    ``generator``. ``copies``: that one draw repeated ``(copies, out, in)`` / ``(copies, out)``, as the public
    code's ``_get_clones`` deep-copies one initialised layer."""
    bound = 1.0 / math.sqrt(in_features)
    weight = (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(out_features, generator=generator) * 2 - 1) * bound
    if copies is None:
        return weight, bias
    return weight.expand(copies, -1, -1).clone(), bias.expand(copies, -1).clone()
