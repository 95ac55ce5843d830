"""The text tower of an open_clip CLIP as plain functions, shared by :class:`fedlit.backbone.Backbone` and the
shapes-CLIP pretraining (:mod:`fedlit.pretrain`), so that there is one end-token-cut text encoder.

The functions take the open_clip model itself and token embeddings (or token ids): the embeddings may be cut after
the last end token, which is exact for a causal tower with argmax pooling (no position reads a later one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def encode_text_cut(model: nn.Module, tokens: Tensor, cut: bool = True) -> Tensor:
    """Unnormalised text features ``(N, D)`` of token ids ``(N, L)``: ``model.encode_text(tokens)`` computed on the
    sequences cut after the last end token (``cut``; exact for a causal tower with argmax pooling, several times
    cheaper on short texts) or on all ``L`` positions. Gradients flow when the caller enables them."""
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1 if cut else tokens.shape[1]
    return text_tower(model, model.token_embedding(tokens[:, :length]), eot)


def text_tower(model: nn.Module, embeddings: Tensor, eot_index: Tensor, deep: Sequence[Tensor] = (),
               deep_position: int = 1) -> Tensor:
    """Unnormalised text features ``(N, D)`` of an open_clip CLIP for token embeddings ``(N, L, W)`` (``L`` up to
    the context length; positional embeddings and the causal mask are sliced to it), pooled at ``eot_index (N,)``.

    ``deep``: deep text prompts (IVLP, MaPLe): before block ``j + 1`` the ``n`` positions from ``deep_position`` on
    (the context after the start token) are replaced by ``deep[j] (n, W)`` (or ``(N, n, W)``, or leading dimensions
    whose product is ``N``), as the public MaPLe code's ``Transformer_MaPLe`` does."""
    length = embeddings.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    if not deep:
        return _pool_and_project(model, model.transformer(x, attn_mask=mask), eot_index)
    blocks = model.transformer.resblocks
    if len(deep) >= len(blocks):
        raise ValueError(f"{len(deep)} deep text prompts need more than {len(blocks)} text layers")
    batch_first = model.transformer.batch_first
    for i, block in enumerate(blocks):
        if 1 <= i <= len(deep):
            prompt = deep[i - 1].to(cast_dtype).reshape(-1, *deep[i - 1].shape[-2:])  # (1 or N, n, W)
            prompt = prompt.expand(x.shape[0], -1, -1)
            stop = deep_position + prompt.shape[1]
            x = torch.cat([x[:, :deep_position], prompt, x[:, stop:]], dim=1)
        x = block(x if batch_first else x.transpose(0, 1), attn_mask=mask)
        x = x if batch_first else x.transpose(0, 1)
    return _pool_and_project(model, x, eot_index)


def _pool_and_project(model: nn.Module, x: Tensor, eot_index: Tensor) -> Tensor:
    """Final layer norm, the row at ``eot_index (N,)`` of each sequence of ``x (N, L, W)``, text projection:
    ``(N, D)``."""
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot_index.to(x.device)]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


def text_tower_shared_prefix(model: nn.Module, prefix: Tensor, suffix: Tensor, eot_index: Tensor) -> Tensor:
    """Unnormalised text features ``(G*C, D)`` of the sequences ``[prefix[g], suffix[g, c]]`` of an open_clip CLIP
    with a causal text tower of plain residual attention blocks: ``prefix (G, P, W)``, ``suffix (G, C, S, W)``,
    ``eot_index (G*C,)`` in whole-sequence positions (``>= P``).

    Causal attention means the prefix positions never see the suffix, so each layer runs the prefix once per group
    and lets the group's ``C`` suffixes attend to its keys and values: ``P + C*S`` token rows instead of
    ``C*(P+S)``, forward and backward alike."""
    groups, prefix_len, width = prefix.shape
    classes, suffix_len = suffix.shape[1:3]
    length = prefix_len + suffix_len
    cast_dtype = model.transformer.get_cast_dtype()
    position = model.positional_embedding[:length].to(cast_dtype)
    # Prefix and suffix rows stay in one (rows, W) matrix so that every linear layer is one matmul: a separate
    # few-row matmul for the prefix would round differently for different G (batched clients must equal sequential).
    rows = torch.cat([(prefix.to(cast_dtype) + position[:prefix_len]).reshape(-1, width),
                      (suffix.to(cast_dtype) + position[prefix_len:]).reshape(-1, width)])
    mask = model.attn_mask[:length, :length] == 0  # True where attention is allowed (j <= i)
    for block in model.transformer.resblocks:
        rows = _shared_prefix_block(block, rows, groups, prefix_len, classes, mask)
    suffixes = rows[groups * prefix_len :].reshape(groups * classes, suffix_len, width)
    return _pool_and_project(model, suffixes, eot_index - prefix_len)


def _shared_prefix_block(block: nn.Module, rows: Tensor, groups: int, prefix_len: int, classes: int, mask: Tensor
                         ) -> Tensor:
    """One ``ResidualAttentionBlock`` (pre-norm attention, then MLP) on ``rows (G*P + G*C*S, W)``: the ``G``
    prefixes' rows, then their suffixes' rows. ``mask (P+S, P+S)`` is the boolean causal mask; suffix queries attend
    to their group's prefix keys and values and to their own suffix."""
    attn = block.attn
    num_heads = attn.num_heads
    split = groups * prefix_len

    def heads(x: Tensor, sequences: int) -> Tensor:  # (sequences*L, W) -> (sequences, heads, L, W/heads)
        return x.reshape(sequences, -1, num_heads, x.shape[-1] // num_heads).transpose(1, 2)

    def with_prefix(prefix: Tensor, rest: Tensor) -> Tensor:  # each suffix's group prefix keys/values before it
        prefix = prefix.unsqueeze(1).expand(-1, classes, -1, -1, -1).flatten(0, 1)
        return torch.cat([prefix, rest], dim=2)

    q, k, v = F.linear(block.ln_1(rows), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    qh, kh, vh = (heads(t[:split], groups) for t in (q, k, v))
    qt, kt, vt = (heads(t[split:], groups * classes) for t in (q, k, v))
    out_head = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:prefix_len, :prefix_len])
    out_tail = F.scaled_dot_product_attention(qt, with_prefix(kh, kt), with_prefix(vh, vt), attn_mask=mask[prefix_len:])
    out = torch.cat([out_head.transpose(1, 2).flatten(0, 1), out_tail.transpose(1, 2).flatten(0, 1)]).flatten(1)
    rows = rows + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    return rows + block.ls_2(block.mlp(block.ln_2(rows)))
