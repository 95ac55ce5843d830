"""FedTPG client: a prompt generator network turns the frozen CLIP text features of the class names into the CoOp
context shared by those classes, so the context follows the class set (unseen classes get their own).

The generator is FedTPG's ``PromptTranslator``: learnable query tokens cross-attend to the class-name features, a
GEGLU feed-forward follows, then ``depth`` self-attention blocks. Every weight may carry a leading client dimension
``G`` (:func:`generate`), so that G clients' generators run at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlit.backbone import Backbone
from fedlit.config import PromptConfig
from fedlit.errors import UserError
from fedlit.modules.base import ClientModule, as_config
from fedlit.modules.fedclip import linear
from fedlit.prompts import PromptLearner, clean_classname, init_context

GENERATOR = "generator."  # prefix of the generator's parameters (the client's whole learnable state)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``nn.LayerNorm`` over the last dimension with one affine ``(W,)`` (bitwise torch's) or G stacked ones
    ``(G, W)`` (``x`` then ``(G, L, W)`` or ``(L, W)`` shared by the G clients)."""
    if weight.dim() == 1:
        return F.layer_norm(x, weight.shape, weight, bias, LAYER_NORM_EPS)
    return F.layer_norm(x, weight.shape[-1:], eps=LAYER_NORM_EPS) * weight.unsqueeze(-2) + bias.unsqueeze(-2)


def attention(params: dict[str, Tensor], prefix: str, query: Tensor, context: Tensor, heads: int,
              keys: Tensor | None = None) -> Tensor:
    """``nn.MultiheadAttention(W, heads, kdim, vdim)`` (no dropout) from its parameters under ``prefix``
    (``in_proj_weight``, or ``q/k/v_proj_weight`` when ``kdim != W``; ``in_proj_bias``; ``out_proj.*``): queries
    ``(..., Lq, W)`` attend to ``context (..., Lk, kdim)``, output ``(..., Lq, W)``. ``keys`` (``(Lk,)`` or
    ``(G, Lk)`` booleans) leaves the other context rows out (``key_padding_mask = ~keys``)."""
    bias_q, bias_k, bias_v = params[prefix + "in_proj_bias"].chunk(3, dim=-1)
    if prefix + "in_proj_weight" in params:
        weight_q, weight_k, weight_v = params[prefix + "in_proj_weight"].chunk(3, dim=-2)
    else:
        weight_q, weight_k, weight_v = (params[prefix + f"{n}_proj_weight"] for n in "qkv")
    q, k, v = linear(query, weight_q, bias_q), linear(context, weight_k, bias_k), linear(context, weight_v, bias_v)
    width = q.shape[-1]
    q, k, v = (t.unflatten(-1, (heads, width // heads)).transpose(-3, -2) for t in (q, k, v))  # (..., h, L, W/h)
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if keys is not None:  # (Lk,) or (G, Lk) -> broadcast over heads and queries
        scores = scores.masked_fill(~keys.unsqueeze(-2).unsqueeze(-2), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = (weights @ v).transpose(-3, -2).flatten(-2)
    return linear(out, params[prefix + "out_proj.weight"], params[prefix + "out_proj.bias"])


def feed_forward(params: dict[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    """FedTPG's ``FeedForward``: ``LayerNorm - Linear(W, 8W) - GEGLU - Linear(4W, W)`` (no residual)."""
    h = linear(layer_norm(x, params[prefix + "norm.weight"], params[prefix + "norm.bias"]),
               params[prefix + "fc1.weight"], params[prefix + "fc1.bias"])
    value, gates = h.chunk(2, dim=-1)
    return linear(value * F.gelu(gates), params[prefix + "fc2.weight"], params[prefix + "fc2.bias"])


def generate(params: dict[str, Tensor], names: Tensor, depth: int, heads: int, prefix: str = GENERATOR,
             classes: Tensor | None = None) -> Tensor:
    """The context ``(n_ctx, W)`` (``(G, n_ctx, W)`` for stacked parameters) that the generator in ``params``
    makes from the normalised class-name features ``names (C, D)``: the query tokens ``soft_prompt`` cross-attend
    to the layer-normed names (no residual, as in the public code), a feed-forward with residual follows, then
    ``depth`` pre-norm self-attention blocks, each attention and feed-forward with a residual. ``classes``
    (booleans ``(C,)``, or ``(G, C)``: one set per client) conditions on those names only, which equals passing
    ``names[classes]`` up to float rounding."""
    p = prefix
    query = layer_norm(params[p + "soft_prompt"], params[p + "cross_norm.weight"], params[p + "cross_norm.bias"])
    context = layer_norm(names, params[p + "context_norm.weight"], params[p + "context_norm.bias"])
    x = attention(params, p + "cross_attn.", query, context, heads, keys=classes)
    x = feed_forward(params, p + "cross_ff.", x) + x
    for i in range(depth):
        block = f"{p}blocks.{i}."
        normed = layer_norm(x, params[block + "norm.weight"], params[block + "norm.bias"])
        x = attention(params, block + "attn.", normed, normed, heads) + x
        x = feed_forward(params, block + "ff.", x) + x
    return x


class FeedForward(nn.Module):
    """The parameters of :func:`feed_forward` (PyTorch's default init)."""

    def __init__(self, width: int, mult: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * mult * width)
        self.fc2 = nn.Linear(mult * width, width)


class SelfAttentionBlock(nn.Module):
    """One pre-norm self-attention block of the generator (one LayerNorm before the attention, as the code's
    ``PreNorm``; the feed-forward has its own)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ff = FeedForward(width)


class PromptGenerator(nn.Module):
    """FedTPG's ``PromptTranslator`` for one context layer: ``soft_prompt (n_ctx, W)`` query tokens,
    ``nn.MultiheadAttention`` layers (their init: Xavier projections, zero biases) and LayerNorms, applied by
    :func:`generate`. ``W`` is the text tower's token width, ``D`` the class-name feature size."""

    def __init__(self, n_ctx: int, width: int, feature_dim: int, depth: int = 0, heads: int = 4, std: float = 0.02,
                 seed: int | None = None):
        super().__init__()
        if width % heads:
            raise UserError(f"method.tpg_heads={heads} must divide the text width {width} of the backbone")
        self.depth, self.heads = depth, heads
        self.soft_prompt = nn.Parameter(init_context(n_ctx, width, None, std, seed))
        self.cross_norm = nn.LayerNorm(width)
        self.context_norm = nn.LayerNorm(feature_dim)
        self.cross_attn = nn.MultiheadAttention(width, heads, kdim=feature_dim, vdim=feature_dim, batch_first=True)
        self.cross_ff = FeedForward(width)
        self.blocks = nn.ModuleList(SelfAttentionBlock(width, heads) for _ in range(depth))

    def forward(self, names: Tensor) -> Tensor:
        """The context ``(n_ctx, W)`` of class-name features ``(C, D)``."""
        return generate(dict(self.named_parameters()), names, self.depth, self.heads, prefix="")


class FedTPGClient(ClientModule):
    """Logits ``s * I T^T`` with ``T`` the normalised text features of ``[SOS, ctx, <class>., EOS]`` for one context
    ``ctx = generator(N_S)`` shared by the classes, ``N_S`` the frozen normalised CLIP features of the plain class
    names of the conditioning set ``S``. In training ``S`` is the client's own classes (with ``client_classes``, as
    the local trainer sets them; the softmax of the loss then covers them only) or else the trained classes
    (``train_classes``, all by default); in evaluation the candidate classes (:meth:`candidate_text_features`).
    Only the generator is trained (prompt lr, cosine)."""

    text_depends_on_candidates = True

    def __init__(self, backbone: Backbone | str, classnames: list[str], prompt: PromptConfig | None = None,
                 depth: int = 0, heads: int = 4, train_classes: list[int] | None = None, client_classes: bool = True,
                 seed: int | None = None, cut: bool = True, share_prefix: bool = True, **kwargs):
        super().__init__(backbone, classnames, **kwargs)
        backbone = self.backbone  # the loaded one when given by name
        prompt = as_config(PromptConfig, prompt)
        # The learner keeps the frozen start / class / end tokens; its own ctx is replaced by the generated one.
        self.prompt_learner = PromptLearner(backbone, classnames, n_ctx=prompt.n_ctx,
                                            class_position=prompt.class_position, init_std=prompt.init_std,
                                            seed=seed, cut=cut, share_prefix=share_prefix)
        self.prompt_learner.ctx.requires_grad_(False)
        self.generator = PromptGenerator(prompt.n_ctx, backbone.text_width, backbone.feature_dim, depth, heads,
                                         prompt.init_std, seed)
        names = [clean_classname(n) for n in classnames]
        self.register_buffer("name_features", backbone.encode_text(names).float(), persistent=False)
        self.train_classes = None if train_classes is None else list(train_classes)
        self.client_classes = bool(client_classes)
        self._own: list[int] | None = None  # the training client's classes (client_classes on)

    def set_client_classes(self, classes: list[int] | None) -> None:
        """Condition training on the client's own classes (with ``client_classes``; None: the trained classes)."""
        self._own = None if classes is None or not self.client_classes else list(classes)

    def condition(self) -> Tensor:
        """The training conditioning set as booleans ``(C,)``: the client's own classes, else the trained ones."""
        classes = self._own if self._own is not None else self.train_classes
        mask = torch.zeros(self.num_classes, dtype=torch.bool, device=self.name_features.device)
        mask[classes if classes is not None else slice(None)] = True
        return mask

    def client_extras(self) -> dict[str, Tensor]:
        """The training conditioning set ``(C,)`` (booleans), stacked ``(G, C)`` over a group."""
        return {"condition": self.condition()}

    def context(self, classes: list[int] | None = None) -> Tensor:
        """This module's generated context ``(n_ctx, W)`` conditioned on the names of ``classes`` (None: all)."""
        names = self.name_features if classes is None else self.name_features[
            torch.as_tensor(classes, device=self.name_features.device)]
        return generate(self.trainable_parameters(), names, self.generator.depth, self.generator.heads)

    def candidate_text_features(self, classes: list[int] | None = None) -> Tensor:
        """Class text features ``(C, D)`` of the context generated from the names of ``classes`` (None: all)."""
        return self.prompt_learner.text_features(self.backbone, self.context(classes=classes))

    def class_text_features(self) -> Tensor:
        """Class text features ``(C, D)`` conditioned on the training conditioning set (:meth:`condition`)."""
        ctx = generate(self.trainable_parameters(), self.name_features, self.generator.depth, self.generator.heads,
                       classes=self.condition())
        return self.prompt_learner.text_features(self.backbone, ctx)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy with the softmax over the conditioning set (the client's own classes, as the code trains)."""
        return super().loss(logits.masked_fill(~self.condition(), float("-inf")), labels)

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Logits ``(G, B, C)`` of G stacked generators, each conditioned on its client's set: their G contexts
        through one text-tower pass."""
        ctx = generate(params, self.name_features, self.generator.depth, self.generator.heads,
                       classes=extras["condition"])
        return self.logits_from(image_features, self.prompt_learner.text_features(self.backbone, ctx))

    def group_loss(self, logits: Tensor, labels: Tensor, sizes: list[int], params: dict[str, Tensor],
                   extras: dict[str, Tensor]) -> Tensor:
        """Each client's cross-entropy over its own conditioning set ``(G,)``."""
        own = logits.masked_fill(~extras["condition"].unsqueeze(1), float("-inf"))
        return super().group_loss(own, labels, sizes, params, extras)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.generator.parameters()), "lr": self.optim.prompt_lr, "schedule": "cosine"}]
