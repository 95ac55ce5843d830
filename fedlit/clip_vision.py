"""The image tower of an open_clip ViT as plain functions, with learnable prompt tokens inside it (VPT, IVLP, MaPLe).

The tower is split at block ``start_layer``: :func:`visual_tokens` computes, without grad, the frozen tokens that
enter that block (patch embedding, class token, positional embedding, ``ln_pre``, then the first ``start_layer``
blocks), which depend on nothing trainable and can be cached per image; :func:`visual_tower` runs the remaining
blocks with prompt tokens appended after the image tokens and returns the pooled, projected feature.

Prompt semantics follow the public VPT/IVLP/MaPLe code (``multimodal-prompt-learning``'s ``clip/model.py``):

* the *shallow* prompt ``(n, W)`` is appended after the ``1 + P`` image tokens at the input of block
  ``start_layer``; at ``start_layer == 0`` it goes through ``ln_pre`` with the image tokens, as it does there
  (``ln_pre`` is per token, so appending ``ln_pre(prompt)`` to the cached ``ln_pre``'d image tokens is exact);
* each *deep* prompt ``deep[j] (n, W)`` replaces the last ``n`` tokens before block ``start_layer + 1 + j``;
* the class token (row 0) is pooled after ``ln_post`` and projected by ``proj``.

Any prompt may carry leading dimensions that broadcast against the tokens' leading dimensions (e.g. ``(G, 1, n, W)``
for tokens ``(G, B, T, W)``: G clients' own prompts on their own images, in one batch through the tower).
"""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fedlit.errors import UserError


def prompt_tower(model: nn.Module, backbone_name: str = "backbone") -> nn.Module:
    """The image tower of ``model`` when it can take prompt tokens: an open_clip ``VisionTransformer`` with
    class-token pooling. Any other tower (ModifiedResNet, attention pooling, ...) raises a one-line UserError."""
    visual = model.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise UserError(f"backbone {backbone_name} has a {type(visual).__name__} image tower; visual prompts need a "
                        "ViT (e.g. backbone.name=ViT-B-16-quickgelu, shapes-clip or tiny)")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise UserError(f"backbone {backbone_name}: visual prompts need a ViT with class-token pooling, not "
                        f"pool_type={visual.pool_type!r}{' with attention pooling' if visual.attn_pool else ''}")
    return visual


def vision_layers(model: nn.Module) -> int:
    """Number of transformer blocks of the image tower of ``model`` (a ViT)."""
    return len(model.visual.transformer.resblocks)


def vision_width(model: nn.Module) -> int:
    """Token width W of the image tower of ``model`` (a ViT)."""
    return int(model.visual.class_embedding.shape[-1])


def _blocks(visual: nn.Module, x: Tensor, start: int, stop: int, prompts: dict[int, Tensor] | None = None,
            use_checkpoint: bool = False) -> Tensor:
    """Blocks ``start .. stop-1`` of ``visual.transformer`` on batch-first tokens ``x (N, T, W)``; before block ``i``
    in ``prompts`` the last ``n`` tokens are replaced by ``prompts[i] (N, n, W)``."""
    batch_first = visual.transformer.batch_first
    for i in range(start, stop):
        if prompts and i in prompts:
            x = torch.cat([x[:, : x.shape[1] - prompts[i].shape[1]], prompts[i]], dim=1)
        block = visual.transformer.resblocks[i]
        x = x if batch_first else x.transpose(0, 1)
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
        x = x if batch_first else x.transpose(0, 1)
    return x


@torch.no_grad()
def visual_tokens(model: nn.Module, images: Tensor, start_layer: int = 0) -> Tensor:
    """The frozen tokens ``(B, 1+P, W)`` entering block ``start_layer`` of the ViT image tower for preprocessed
    images ``(B, 3, H, W)``: ``ln_pre`` of the class token + patch embeddings + positional embedding, then blocks
    ``0 .. start_layer-1``. No grad: nothing here is trainable, so the result may be cached per image."""
    visual = prompt_tower(model)
    if not 0 <= start_layer <= len(visual.transformer.resblocks):
        raise ValueError(f"start_layer={start_layer} outside 0..{len(visual.transformer.resblocks)}")
    x = visual._embeds(images.to(visual.conv1.weight.dtype))
    return _blocks(visual, x, 0, start_layer)


def visual_tower(model: nn.Module, tokens: Tensor, start_layer: int = 0, shallow: Tensor | None = None,
                 deep: Sequence[Tensor] = (), use_checkpoint: bool = False) -> Tensor:
    """Unnormalised image features ``(..., D)`` of frozen tokens ``(..., T, W)`` (:func:`visual_tokens` at
    ``start_layer``) through the remaining blocks with prompts: ``shallow (n, W)`` appended at ``start_layer``
    (through ``ln_pre`` when ``start_layer == 0``), ``deep[j] (n, W)`` replacing the prompt tokens before block
    ``start_layer + 1 + j``. Prompts may have leading dimensions broadcasting against the tokens'. Without any
    prompt this is the plain tower (``model.encode_image``). ``use_checkpoint``: recompute each block's activations
    in the backward pass (activation checkpointing; same numbers, less memory)."""
    visual = prompt_tower(model)
    layers = len(visual.transformer.resblocks)
    if start_layer + (len(deep) if shallow is not None else 0) > layers or (deep and shallow is None):
        raise ValueError(f"{len(deep)} deep prompts from layer {start_layer} need a shallow prompt and at most "
                         f"{layers} layers")
    lead, (length, width) = tokens.shape[:-2], tokens.shape[-2:]
    dtype = visual.conv1.weight.dtype
    x = tokens.reshape(-1, length, width).to(dtype)

    def rows(prompt: Tensor) -> Tensor:  # (..., n, W) broadcast to the tokens' leading dims, flattened: (N, n, W)
        prompt = prompt.to(dtype)
        return prompt.expand(*lead, *prompt.shape[-2:]).reshape(-1, *prompt.shape[-2:])

    if shallow is not None:
        first = rows(shallow)
        x = torch.cat([x, visual.ln_pre(first) if start_layer == 0 else first], dim=1)
    prompts = {start_layer + 1 + j: rows(p) for j, p in enumerate(deep)}
    x = _blocks(visual, x, start_layer, layers, prompts, use_checkpoint)
    pooled = visual.ln_post(x[:, 0])
    pooled = pooled @ visual.proj if visual.proj is not None else pooled
    return pooled.reshape(*lead, pooled.shape[-1])
