"""FedMGP client: M groups of a text context and a vision prompt; group m's image features meet group m's text
features, the prediction is the mean of the M groups' logits, and the loss is the groups' mean cross-entropy minus
(or, as the public code effectively does, plus) a weighted divergence between the groups' features
(docs/methods.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlit.backbone import Backbone
from fedlit.clip_vision import prompt_tower, vision_width
from fedlit.config import PromptConfig
from fedlit.data.features import token_kind
from fedlit.modules.base import ClientModule, as_config
from fedlit.prompts import PromptLearner

TEXT_GROUPS, VISION_GROUPS = "text_prompts", "vision_prompts"  # (M, *ctx_shape) and (M, n_v, W_v) parameters
WORD_NOISE = 0.01  # std of each text group's noise around the ctx_init words (the public code's 0.01)


def init_groups(words: Tensor | None, ctx_shape: tuple[int, ...], groups: int, vision_n_ctx: int, vision_dim: int,
                std: float, seed: int | None) -> tuple[Tensor, Tensor]:
    """Initial text groups ``(M, *ctx_shape)`` and vision groups ``(M, n_v, W_v)`` from one generator seeded by
    ``seed`` (fresh draws without one), text first: the ``words`` embedding ``(*ctx_shape)`` plus ``0.01 N(0, 1)``
    per group when given, else ``N(0, std²)``; vision ``N(0, std²)``."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    noise = torch.randn((groups, *ctx_shape), generator=generator)
    text = words.expand(groups, *ctx_shape) + WORD_NOISE * noise if words is not None else noise * std
    vision = torch.randn((groups, vision_n_ctx, vision_dim), generator=generator) * std
    return text, vision


def group_divergence(features: Tensor) -> Tensor:
    """Mean pairwise L1 divergence of M groups' normalised features ``(..., M, N, D)``: ``mean_n mean_{i<j}
    mean_d |f_i[n, d] - f_j[n, d]|`` ``(...)`` (the public code's ``_compute_divergent_loss`` with type ``l1``, without
    its sign); zeros when ``M < 2``."""
    groups = features.shape[-3]
    if groups < 2:
        return features.new_zeros(features.shape[:-3])
    i, j = torch.triu_indices(groups, groups, 1, device=features.device)
    return (features[..., i, :, :] - features[..., j, :, :]).abs().mean(dim=-1).mean(dim=(-2, -1))


class FedMGPClient(ClientModule):
    """Logits ``mean_m s · I_m T_mᵀ`` ``(B, C)`` with ``T_m`` the normalised text features of text group m (CoOp's
    prompt with context ``text_prompts[m]``) and ``I_m`` the normalised image features with ``vision_prompts[m]``
    appended at block ``vision_start_layer`` (shallow). Loss: ``mean_m CE(s I_m T_mᵀ, y) ∓ λ · ½ (D_text +
    D_vision)`` (:func:`group_divergence` over the classes and over the batch's images; minus by default, plus with
    ``pull_groups``). All M groups go through each tower in one pass."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], groups: int = 5,
                 diversity_weight: float = 1.0, pull_groups: bool = False, prompt: PromptConfig | None = None,
                 seed: int | None = None, cut: bool = True, share_prefix: bool = True, vision_start_layer: int = 0,
                 checkpoint_activations: bool = False, **kwargs):
        super().__init__(backbone, classnames, **kwargs)
        prompt = as_config(PromptConfig, prompt)
        prompt_tower(self.backbone.model, self.backbone.name)  # a ViT, else one line
        self.vision_start_layer = int(vision_start_layer)
        self.image_feature_kind = token_kind(self.vision_start_layer)
        self.checkpoint_activations = bool(checkpoint_activations)
        self.vision_n_ctx = prompt.vision_n_ctx
        self.prompt_learner = PromptLearner(
            self.backbone, classnames, n_ctx=prompt.n_ctx, ctx_init=prompt.ctx_init,
            class_specific=prompt.class_specific, class_position=prompt.class_position, init_std=prompt.init_std,
            seed=seed, cut=cut, share_prefix=share_prefix,
        )
        self.prompt_learner.ctx.requires_grad_(False)  # the learner's buffers only; the groups are the parameters
        ctx = self.prompt_learner.ctx.detach()
        words = ctx if prompt.ctx_init is not None else None
        text, vision = init_groups(words, tuple(ctx.shape), groups, prompt.vision_n_ctx,
                                   vision_width(self.backbone.model), prompt.init_std, seed)
        self.text_prompts = nn.Parameter(text.to(ctx))
        self.vision_prompts = nn.Parameter(vision.to(ctx))
        self.groups = int(groups)
        self.diversity_weight = float(diversity_weight)
        self.pull_groups = bool(pull_groups)
        self._last: tuple[Tensor, Tensor] | None = None  # (image (…, M, B, D), text (…, M, C, D)) of the last
        # training forward, read by the loss

    # -- features --------------------------------------------------------------------------------------------
    def group_text_features(self, text: Tensor) -> Tensor:
        """Normalised class text features ``(..., M, C, D)`` of stacked text groups ``(..., M, *ctx_shape)``, one
        text-tower pass over all of them."""
        lead = text.shape[: text.dim() - len(self.prompt_learner.ctx_shape)]
        flat = text.reshape(-1, *self.prompt_learner.ctx_shape)
        features = self.prompt_learner.text_features(self.backbone, flat)
        return features.reshape(*lead, *features.shape[-2:])

    def group_image_features(self, tokens: Tensor, vision: Tensor) -> Tensor:
        """Normalised image features ``(..., M, B, D)`` of frozen tokens ``(B, T, W)`` (or ``(G, B, T, W)`` with
        ``vision (G, M, n_v, W_v)``) for vision groups ``(..., M, n_v, W_v)``: the tokens repeated M times, each
        copy with its group's shallow prompt, through one image-tower pass."""
        lead = vision.shape[:-2]  # (..., M)
        tokens = tokens.unsqueeze(-4).expand(*lead, *tokens.shape[-3:])
        return self.prompted_image_features(tokens, vision.unsqueeze(-3))

    def image_features(self, x: Tensor) -> Tensor:
        """Normalised image features ``(M, B, D)`` of images or cached tokens ``x`` with this client's M vision
        groups."""
        return self.group_image_features(self.frozen_image_inputs(x), self.vision_prompts)

    def class_text_features(self) -> Tensor:
        """Normalised class text features ``(M, C, D)`` of this client's M text groups."""
        return self.group_text_features(self.text_prompts)

    def group_logits_of(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Each group's logits ``s · I_m T_mᵀ`` ``(..., M, B, C)`` from ``(..., M, B, D)`` and ``(..., M, C, D)``."""
        return self.backbone.logit_scale * image_features @ text_features.transpose(-1, -2).to(image_features.dtype)

    def logits_from(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Prediction logits ``(..., B, C)``: the mean over the M groups of :meth:`group_logits_of`."""
        return self.group_logits_of(image_features, text_features).mean(dim=-3)

    def forward(self, x: Tensor) -> Tensor:
        image, text = self.image_features(x), self.class_text_features()
        if self.training and torch.is_grad_enabled():
            self._last = (image, text)
        return self.logits_from(image, text)

    # -- losses ----------------------------------------------------------------------------------------------
    def objective(self, image: Tensor, text: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
        """One client's loss (a scalar) from its groups' features ``image (M, B, D)``, ``text (M, C, D)``, labels
        ``(B,)`` and the classes the trainer excludes ``mask (B, C)`` (True: logit -inf): the mean over groups and
        images of the cross-entropy, ∓ ``λ · ½ (D_text + D_vision)``."""
        dtype = torch.promote_types(image.dtype, torch.float32)  # half precision is lifted, float64 kept
        image, text = image.to(dtype), text.to(dtype)
        logits = self.group_logits_of(image, text).masked_fill(mask, float("-inf"))
        groups = logits.shape[0]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.repeat(groups))
        if self.diversity_weight == 0 or groups < 2:
            return ce
        divergence = 0.5 * (group_divergence(text) + group_divergence(image))
        sign = 1.0 if self.pull_groups else -1.0
        return ce + sign * self.diversity_weight * divergence

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """:meth:`objective` of the last training forward (its features); ``logits`` (the forward's output, after
        the trainer's class restriction) give the excluded classes (their -inf entries)."""
        if self._last is None:
            raise RuntimeError("FedMGPClient.loss needs the features of a training forward (module.train(), grad on)")
        (image, text), self._last = self._last, None
        return self.objective(image, text, labels, torch.isneginf(logits))

    def group_logits(self, params: dict[str, Tensor], image_inputs: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Logits ``(G, B, C)`` of G clients: their ``G·M`` text groups through one text-tower pass and their tokens
        ``(G, M, B, T, W)`` with the vision groups ``(G, M, 1, n_v, W_v)`` through one image-tower pass."""
        image = self.group_image_features(image_inputs, params[VISION_GROUPS])
        text = self.group_text_features(params[TEXT_GROUPS])
        if torch.is_grad_enabled():
            self._last = (image, text)
        return self.logits_from(image, text)

    def group_loss(self, logits: Tensor, labels: Tensor, sizes: list[int], params: dict[str, Tensor],
                   extras: dict[str, Tensor]) -> Tensor:
        """Each client's :meth:`objective` ``(G,)`` over its own ``sizes[g]`` rows (the rest is padding)."""
        if self._last is None:
            raise RuntimeError("FedMGPClient.group_loss needs the features of group_logits")
        (image, text), self._last = self._last, None
        mask = torch.isneginf(logits)
        return torch.stack([self.objective(image[g, :, :n], text[g], labels[g, :n], mask[g, :n])
                            for g, n in enumerate(sizes)])

    def param_groups(self) -> list[dict]:
        return [{"params": [self.text_prompts, self.vision_prompts], "lr": self.optim.prompt_lr,
                 "schedule": "cosine"}]
