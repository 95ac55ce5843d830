"""Federated VPT client: learnable prompt tokens inside the frozen ViT image tower, a fixed hand-written text prompt.

The reference image-side module (``docs/methods.md``, *VPT*): its inputs are the frozen image-tower tokens below
its first prompted block (cached per image, :meth:`~fedlit.modules.base.ClientModule.frozen_image_inputs`), and
its whole state is one tensor ``vision_prompt (depth, n, W)``: row 0 the shallow prompt appended at block
``vision_start_layer``, rows ``1..depth-1`` the deep prompts of the following blocks (VPT-deep; ``depth = 1`` is
VPT-shallow).
"""

from __future__ import annotations

from torch import Tensor, nn

from fedlit.backbone import Backbone
from fedlit.clip_vision import prompt_tower, vision_layers, vision_width
from fedlit.config import PromptConfig
from fedlit.data.features import token_kind
from fedlit.errors import UserError
from fedlit.modules.base import as_config
from fedlit.modules.zeroshot import ZeroShotClient
from fedlit.prompts import init_context

VISION_PROMPT = "vision_prompt"  # the client state's name of the prompt tokens (depth, n, W)


def prompt_depth(backbone: Backbone, prompt: PromptConfig) -> int:
    """Prompted image-tower blocks from ``prompt.vision_start_layer``: ``prompt.depth``, or every block from there
    (None). A one-line UserError when the tower is no ViT or the layers do not fit."""
    tower = prompt_tower(backbone.model, backbone.name)
    layers = vision_layers(backbone.model)
    start = prompt.vision_start_layer
    depth = layers - start if prompt.depth is None else prompt.depth
    if not 0 <= start < layers or not 1 <= depth <= layers - start:
        raise UserError(f"prompt.vision_start_layer={start} and prompt.depth={prompt.depth} do not fit the "
                        f"{len(tower.transformer.resblocks)} image-tower layers of backbone {backbone.name}")
    return depth


def split_prompt(vision_prompt: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The shallow prompt and the deep prompts of ``vision_prompt (..., depth, n, W)``: ``(..., n, W)`` and a list of
    ``depth - 1`` such tensors; a leading group dimension G becomes ``(G, 1, n, W)`` (one prompt per client, shared
    by its images)."""
    rows = vision_prompt.unsqueeze(1) if vision_prompt.dim() == 4 else vision_prompt
    return rows.select(-3, 0), [rows.select(-3, j) for j in range(1, rows.shape[-3])]


class VPTClient(ZeroShotClient):
    """Logits ``s * f(x; P) T^T``: ``f`` the image tower with prompt tokens ``P`` (``vision_prompt``), ``T`` the
    frozen text features of ``template`` per class (the public VPT trains no text prompt)."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], prompt: PromptConfig | None = None,
                 template: str = "a photo of a {}.", seed: int | None = None, checkpoint_activations: bool = False,
                 **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cut", "share_prefix")}  # text-prompt switches
        super().__init__(backbone, classnames, template=template, **kwargs)
        prompt = as_config(PromptConfig, prompt)
        depth = prompt_depth(self.backbone, prompt)
        self.vision_start_layer = prompt.vision_start_layer
        self.image_feature_kind = token_kind(self.vision_start_layer)
        self.checkpoint_activations = checkpoint_activations
        self.vision_n_ctx = prompt.vision_n_ctx
        width = vision_width(self.backbone.model)
        rows = init_context(depth * prompt.vision_n_ctx, width, None, prompt.init_std, seed)
        self.vision_prompt = nn.Parameter(rows.reshape(depth, prompt.vision_n_ctx, width))

    def image_features(self, x: Tensor) -> Tensor:
        """Normalised image features ``(B, D)`` of images or cached tokens through the prompted tower."""
        shallow, deep = split_prompt(self.vision_prompt)
        return self.prompted_image_features(self.frozen_image_inputs(x), shallow, deep)

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Logits ``(G, B, C)`` of G clients' prompts ``(G, depth, n, W)`` on their tokens ``(G, B, T, W)``: one
        pass of the image tower over every client's images."""
        shallow, deep = split_prompt(params[VISION_PROMPT])
        return self.logits_from(self.prompted_image_features(image_features, shallow, deep), self.text_features)

    def param_groups(self) -> list[dict]:
        return [{"params": [self.vision_prompt], "lr": self.optim.prompt_lr, "schedule": "cosine"}]
