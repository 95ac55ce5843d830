"""CoCoOp client (Zhou et al., CVPR 2022): a CoOp context shifted per image by a small meta-net of the image feature.

For an image with normalised feature ``x (D)``, the meta-net ``Linear(D, D//16) - ReLU - Linear(D//16, W)`` gives a
bias ``pi (W)`` that is added to every context token, ``ctx + pi``; the C class prompts built on that context go
through the frozen text tower, so every image has its own class text features ``(C, D)`` and its logits are
``s * <x, t_c(x)>``. A batch of B images costs B x C text sequences instead of C: the text passes are split into
chunks of ``chunk`` images, each recomputed in the backward pass (activation checkpointing) while gradients are on,
so that training holds the activations of one chunk at a time. Chunks give each image the numbers it gets alone up
to float rounding of the batched matmuls.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fedlit.backbone import Backbone
from fedlit.errors import UserError
from fedlit.modules.coop import CTX, CoOpClient

META = "meta_net."  # prefix of the meta-net's parameter names (the client state keys)
META_REDUCTION = 16  # hidden width D // 16, as the public code's meta-net


def meta_net(feature_dim: int, text_width: int) -> nn.Sequential:
    """CoCoOp's meta-net ``Linear(D, D//16) - ReLU - Linear(D//16, W)`` with PyTorch's default init (global RNG)."""
    hidden = feature_dim // META_REDUCTION
    if hidden < 1:
        raise UserError(f"CoCoOp's meta-net needs a feature width of at least {META_REDUCTION} (D // 16 hidden units); "
                        f"this backbone has D = {feature_dim}")
    return nn.Sequential(OrderedDict([("linear1", nn.Linear(feature_dim, hidden)), ("relu", nn.ReLU()),
                                      ("linear2", nn.Linear(hidden, text_width))]))


def meta_bias(params: dict[str, Tensor], image_features: Tensor) -> Tensor:
    """The meta-net's bias ``pi (G, B, W)`` of G clients' stacked meta-nets (``params`` holds ``meta_net.linear1.
    weight (G, h, D)`` etc.) on their images ``(G, B, D)``: ``W2 relu(W1 x + b1) + b2``."""
    w1, b1 = params[META + "linear1.weight"], params[META + "linear1.bias"]
    w2, b2 = params[META + "linear2.weight"], params[META + "linear2.bias"]
    x = image_features.to(w1.dtype)
    hidden = torch.relu(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
    return torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))


def shifted_contexts(ctx: Tensor, bias: Tensor) -> Tensor:
    """Per-image contexts ``ctx + pi``: ``ctx (G, *ctx_shape)`` (``(n_ctx, W)`` or class-specific ``(C, n_ctx, W)``),
    ``bias (G, B, W)`` -> ``(G, B, *ctx_shape)``, the bias added to every context token."""
    extra = ctx.dim() - 3  # the class axis of class-specific contexts (ctx is (G, n_ctx, W) or (G, C, n_ctx, W))
    return ctx.unsqueeze(1) + bias.reshape(*bias.shape[:2], *([1] * extra), 1, bias.shape[-1])


class CoCoOpClient(CoOpClient):
    """Logits ``s * <x_b, T(ctx + meta_net(x_b))[c]>`` per image ``b`` and class ``c``; the context and the meta-net are
    trained with the prompt learning rate (the public code gives the whole prompt learner to one optimiser).

    ``chunk`` images' prompts go through the text tower at a time (0: a whole batch at once)."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], chunk: int = 32, **kwargs):
        super().__init__(backbone, classnames, **kwargs)
        backbone = self.backbone  # the loaded one when given by name
        self.meta_net = meta_net(backbone.feature_dim, backbone.text_width).to(self.prompt_learner.ctx)
        self.chunk = int(chunk)

    def meta_params(self) -> dict[str, Tensor]:
        """The meta-net's parameters by client-state name."""
        return {META + n: p for n, p in self.meta_net.named_parameters()}

    def class_text_features(self) -> Tensor:
        """What the logits condition on every image: the context ``(*ctx_shape)`` (the class text features depend on
        the image, so :meth:`logits_from` encodes them per image)."""
        return self.prompt_learner.ctx

    def logits_from(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Logits ``(B, C)`` of normalised image features ``(B, D)`` and this client's context ``(*ctx_shape)`` (from
        :meth:`class_text_features`), with the module's meta-net."""
        params = {CTX: text_features, **self.meta_params()}
        return self.group_logits({k: v.unsqueeze(0) for k, v in params.items()}, image_features.unsqueeze(0), {})[0]

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Logits ``(G, B, C)`` of G clients on their images ``(G, B, D)``: each image's shifted context through the
        text tower, ``chunk`` images (of all G clients together) per pass."""
        groups, batch = image_features.shape[:2]
        contexts = shifted_contexts(params[CTX], meta_bias(params, image_features)).flatten(0, 1)  # (G*B, *ctx)
        text = self.conditional_text_features(contexts).unflatten(0, (groups, batch))  # (G, B, C, D)
        scale = self.backbone.logit_scale
        return scale * torch.einsum("gbd,gbcd->gbc", image_features, text.to(image_features.dtype))

    def conditional_text_features(self, contexts: Tensor) -> Tensor:
        """Normalised class text features ``(N, C, D)`` of N stacked contexts ``(N, *ctx_shape)``, ``chunk`` at a time;
        each chunk is recomputed in backward (not kept) when gradients flow and there is more than one chunk."""
        size = self.chunk if self.chunk > 0 else contexts.shape[0]
        if size >= contexts.shape[0]:
            return self.prompt_learner.text_features(self.backbone, contexts)
        encode = self.prompt_learner.text_features
        parts = []
        for piece in contexts.split(size):
            if torch.is_grad_enabled() and piece.requires_grad:
                parts.append(checkpoint(encode, self.backbone, piece, use_reentrant=False))
            else:
                parts.append(encode(self.backbone, piece))
        return torch.cat(parts)

    def param_groups(self) -> list[dict]:
        return [{"params": [self.prompt_learner.ctx, *self.meta_net.parameters()], "lr": self.optim.prompt_lr,
                 "schedule": "cosine"}]

