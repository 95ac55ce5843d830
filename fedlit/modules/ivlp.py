"""IVLP client (the MaPLe paper's independent V-L prompting): deep text prompts and deep vision prompts that never
meet, over the frozen CLIP (``docs/methods.md``, *IVLP*).

State: ``prompt_learner.ctx (n_t, W_t)`` (CoOp's context), ``deep_text (J_t-1, n_t, W_t)`` (replacing the context
positions before text blocks ``1..J_t-1``; absent when ``J_t = 1``) and ``vision_prompt (J_v, n_v, W_v)`` (VPT's:
row 0 appended at block ``vision_start_layer``, rows ``1..`` replacing it at the following blocks).
"""

from __future__ import annotations

from torch import Tensor, nn

from fedlit.backbone import Backbone
from fedlit.clip_vision import vision_width
from fedlit.config import DEEP_TEXT_PROMPT_RULE, PromptConfig, deep_text_prompt_fits
from fedlit.data.features import token_kind
from fedlit.errors import UserError
from fedlit.modules.base import ClientModule, as_config
from fedlit.modules.vpt import VISION_PROMPT, prompt_depth, split_prompt
from fedlit.prompts import PromptLearner, init_context
from fedlit.state import PROMPT

DEEP_TEXT = "deep_text"  # the client state's name of the deep text prompts (J_t-1, n_t, W_t)
DEEP_TEXT_SEED_OFFSET = 7_919  # the deep text prompts' draw, a stream apart from the context's (seed)
VISION_SEED_OFFSET = 15_485  # the vision prompts' draw


def text_layers(backbone: Backbone) -> int:
    """Number of transformer blocks of the text tower of ``backbone``."""
    return len(backbone.model.transformer.resblocks)


def text_depth(backbone: Backbone, prompt: PromptConfig) -> int:
    """Prompted text blocks ``J_t``: ``prompt.depth``, or every block of the text tower (None); a one-line
    UserError when the depth exceeds them."""
    layers = text_layers(backbone)
    depth = layers if prompt.depth is None else prompt.depth
    if not 1 <= depth <= layers:
        raise UserError(f"prompt.depth={prompt.depth} exceeds the {layers} text-tower layers of backbone "
                        f"{backbone.name}")
    return depth


def deep_rows(deep_text: Tensor | None) -> list[Tensor]:
    """The deep text prompts of ``deep_text (..., J-1, n, W)`` as a list of ``(..., n, W)`` (empty for None)."""
    return [] if deep_text is None else list(deep_text.unbind(-3))


class TextPromptClient(ClientModule):
    """Shared text side of IVLP and MaPLe: a CoOp context (unified, class at the end) and ``J - 1`` deep text
    prompts ``deep_text`` (``N(0, init_std²)``); class text features ``(C, D)`` (or ``(G, C, D)`` for stacked
    contexts) through :meth:`PromptLearner.text_features` with the deep prompts."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], prompt: PromptConfig, seed: int | None,
                 cut: bool, share_prefix: bool, checkpoint_activations: bool, **kwargs):
        super().__init__(backbone, classnames, **kwargs)
        if not deep_text_prompt_fits(prompt):
            raise UserError(f"{type(self).__name__} {DEEP_TEXT_PROMPT_RULE}")
        self.vision_start_layer = prompt.vision_start_layer
        self.image_feature_kind = token_kind(self.vision_start_layer)
        self.checkpoint_activations = checkpoint_activations
        self.prompt_learner = PromptLearner(
            self.backbone, classnames, n_ctx=prompt.n_ctx, ctx_init=prompt.ctx_init, init_std=prompt.init_std,
            seed=seed, cut=cut, share_prefix=share_prefix)
        depth = self.text_prompt_depth(prompt)
        n, width = self.prompt_learner.ctx_shape
        if depth > 1:
            rows = init_context((depth - 1) * n, width, None, prompt.init_std,
                                None if seed is None else seed + DEEP_TEXT_SEED_OFFSET)
            self.deep_text = nn.Parameter(rows.reshape(depth - 1, n, width))
        else:
            self.register_parameter(DEEP_TEXT, None)
        self.text_depth = depth

    def text_prompt_depth(self, prompt: PromptConfig) -> int:
        """Prompted text blocks ``J_t`` (:func:`text_depth`; MaPLe: its coupled depth)."""
        return text_depth(self.backbone, prompt)

    def class_text_features(self) -> Tensor:
        return self.prompt_learner.text_features(self.backbone, deep=deep_rows(self.deep_text))

    def group_text_features(self, params: dict[str, Tensor]) -> Tensor:
        """Class text features ``(G, C, D)`` of G clients' stacked contexts and deep text prompts."""
        return self.prompt_learner.text_features(self.backbone, params[PROMPT], deep=deep_rows(params.get(DEEP_TEXT)))

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.trainable_parameters().values()), "lr": self.optim.prompt_lr,
                 "schedule": "cosine"}]


class IVLPClient(TextPromptClient):
    """Logits ``s * f(x; V) T(ctx, deep_text)^T``: ``f`` the image tower with the client's own vision prompts ``V``
    (``vision_prompt``), ``T`` the text features of its deep text prompts. ``prompt.n_ctx`` / ``prompt.ctx_init``
    text tokens, ``prompt.vision_n_ctx`` vision tokens, ``prompt.depth`` blocks of each tower (None: all)."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], prompt: PromptConfig | None = None,
                 seed: int | None = None, cut: bool = True, share_prefix: bool = True,
                 checkpoint_activations: bool = False, **kwargs):
        prompt = as_config(PromptConfig, prompt)
        super().__init__(backbone, classnames, prompt, seed, cut, share_prefix, checkpoint_activations, **kwargs)
        depth = prompt_depth(self.backbone, prompt)
        width = vision_width(self.backbone.model)
        rows = init_context(depth * prompt.vision_n_ctx, width, None, prompt.init_std,
                            None if seed is None else seed + VISION_SEED_OFFSET)
        self.vision_prompt = nn.Parameter(rows.reshape(depth, prompt.vision_n_ctx, width))

    def image_features(self, x: Tensor) -> Tensor:
        """Normalised image features ``(B, D)`` of images or cached tokens through the prompted tower."""
        shallow, deep = split_prompt(self.vision_prompt)
        return self.prompted_image_features(self.frozen_image_inputs(x), shallow, deep)

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Logits ``(G, B, C)`` of G clients on their tokens ``(G, B, T, W)``: one image-tower pass with each
        client's vision prompts, one text-tower pass over the ``G x C`` prompts."""
        shallow, deep = split_prompt(params[VISION_PROMPT])
        image = self.prompted_image_features(image_features, shallow, deep)
        return self.logits_from(image, self.group_text_features(params))
