"""MaPLe client (Khattak et al., CVPR 2023): multi-modal prompts, the vision prompts projected from the text ones.

The text side is CoOp's context ``ctx (n, W_t)`` plus deep text prompts ``deep_text (J-1, n, W_t)`` (replacing the
context positions before text blocks ``1..J-1``); the vision side has no prompt of its own: its shallow prompt is
``ctx W^T + b (n, W_v)`` and its deep prompt before block ``start + j`` is ``deep_text[j-1] W_j^T + b_j``, learnable
coupling functions (the public code's ``proj`` and ``compound_prompt_projections``, one ``Linear(W_t, W_v)`` each).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedlit.backbone import Backbone
from fedlit.clip_vision import vision_width
from fedlit.config import PromptConfig
from fedlit.modules.base import as_config
from fedlit.modules.ivlp import DEEP_TEXT, TextPromptClient, text_depth, text_layers
from fedlit.modules.vpt import prompt_depth
from fedlit.state import PROMPT

COUPLING_SEED_OFFSET = 32_452  # the coupling functions' draw, a stream apart from the prompts' (seed)
PROJ_WEIGHT, PROJ_BIAS = "proj_weight", "proj_bias"  # the first layer's coupling (W_v, W_t), (W_v,)
DEEP_PROJ_WEIGHT, DEEP_PROJ_BIAS = "deep_proj_weight", "deep_proj_bias"  # the deeper ones (J-1, W_v, W_t), (J-1, W_v)


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


def maple_depth(backbone: Backbone, prompt: PromptConfig) -> int:
    """Coupled layers ``J``: ``prompt.depth``, or (None) every layer both towers have from the first prompted one,
    ``min(text blocks, image blocks - vision_start_layer)``; a one-line UserError when either tower is too short."""
    vision = prompt_depth(backbone, prompt)
    return min(text_layers(backbone), vision) if prompt.depth is None else text_depth(backbone, prompt)


class MaPLeClient(TextPromptClient):
    """Logits ``s * f(x; V(ctx, deep_text)) T(ctx, deep_text)^T``: the text features of the context and its deep
    text prompts, and the image tower with the vision prompts coupled to them (:func:`couple`). ``prompt.n_ctx`` /
    ``prompt.ctx_init`` tokens per layer on both sides, ``prompt.depth`` coupled layers (None: all)."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], prompt: PromptConfig | None = None,
                 seed: int | None = None, cut: bool = True, share_prefix: bool = True,
                 checkpoint_activations: bool = False, **kwargs):
        prompt = as_config(PromptConfig, prompt)
        super().__init__(backbone, classnames, prompt, seed, cut, share_prefix, checkpoint_activations, **kwargs)
        depth = self.text_depth
        text, vision = self.backbone.text_width, vision_width(self.backbone.model)
        generator = torch.Generator().manual_seed(seed + COUPLING_SEED_OFFSET) if seed is not None else None
        weight, bias = linear_init(vision, text, generator)
        self.proj_weight, self.proj_bias = nn.Parameter(weight), nn.Parameter(bias)
        if depth > 1:
            weight, bias = linear_init(vision, text, generator, copies=depth - 1)
            self.deep_proj_weight, self.deep_proj_bias = nn.Parameter(weight), nn.Parameter(bias)
        else:
            self.register_parameter(DEEP_PROJ_WEIGHT, None)
            self.register_parameter(DEEP_PROJ_BIAS, None)

    def text_prompt_depth(self, prompt: PromptConfig) -> int:
        """The coupled depth ``J`` (:func:`maple_depth`): as many text as vision layers."""
        return maple_depth(self.backbone, prompt)

    def vision_prompts(self, params: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The coupled vision prompts of ``params`` (this module's names, one client or G stacked): the shallow
        one ``(n, W_v)`` (``(G, 1, n, W_v)``) and the ``J-1`` deep ones, shaped alike."""
        ctx = params[PROMPT]
        if params.get(DEEP_TEXT) is None:
            shallow = ctx @ params[PROJ_WEIGHT].transpose(-1, -2) + params[PROJ_BIAS].unsqueeze(-2)
            deep = []
        else:
            shallow, deep = couple(ctx, params[DEEP_TEXT], params[PROJ_WEIGHT], params[PROJ_BIAS],
                                   params[DEEP_PROJ_WEIGHT], params[DEEP_PROJ_BIAS])
        if ctx.dim() == 3:  # a group: one prompt per client, shared by its images
            return shallow.unsqueeze(1), [p.unsqueeze(1) for p in deep]
        return shallow, deep

    def image_features(self, x: Tensor) -> Tensor:
        """Normalised image features ``(B, D)`` of images or cached tokens through the tower with the coupled
        prompts."""
        shallow, deep = self.vision_prompts(self.trainable_parameters())
        return self.prompted_image_features(self.frozen_image_inputs(x), shallow, deep)

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Logits ``(G, B, C)`` of G clients on their tokens ``(G, B, T, W_v)``: each client's coupled prompts in
        one image-tower pass, its text prompts in one text-tower pass over the ``G x C`` prompts."""
        shallow, deep = self.vision_prompts(params)
        return self.logits_from(self.prompted_image_features(image_features, shallow, deep),
                                self.group_text_features(params))
