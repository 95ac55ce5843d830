"""IVLP: independent deep text and vision prompts, the whole forward against a re-implementation of the public code
(muzairkhattak/multimodal-prompt-learning, trainers/independentVL.py and clip/model.py's
ResidualAttentionBlock_IVLP / VisionTransformer), on the tiny ViT CLIP and on a CLIP whose widths differ."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedlit.clip_vision import visual_tokens, visual_tower
from fedlit.prompts import PromptLearner
from tests.conftest import CLASSNAMES, build_mixed_vit


class PublicIVLP(nn.Module):
    """The public IVLP's learnable tensors: ``prompt_learner.ctx`` (VLPromptLearner), the text blocks'
    ``VPT_shallow`` (blocks 1..J_t-1), the image tower's ``VPT`` and its blocks' ``VPT_shallow`` (1..J_v-1)."""

    def __init__(self, backbone, classnames, n_text, n_vision, depth_text, depth_vision):
        super().__init__()
        model = backbone.model
        text_width, vision_width = model.ln_final.weight.shape[0], model.visual.class_embedding.shape[0]
        self.ctx = nn.Parameter(torch.randn(n_text, text_width) * 0.02)
        self.text_vpt = nn.ParameterList([nn.Parameter(torch.randn(n_text, text_width) * 0.02)
                                          for _ in range(depth_text - 1)])
        self.vpt = nn.Parameter(torch.randn(n_vision, vision_width) * 0.02)
        self.vision_vpt = nn.ParameterList([nn.Parameter(torch.randn(n_vision, vision_width) * 0.02)
                                            for _ in range(depth_vision - 1)])
        names = [n.replace("_", " ") for n in classnames]
        self.tokenized_prompts = backbone.tokenize([" ".join(["X"] * n_text) + " " + name + "." for name in names])
        with torch.no_grad():
            embedding = model.token_embedding(self.tokenized_prompts)
        self.register_buffer("token_prefix", embedding[:, :1, :])
        self.register_buffer("token_suffix", embedding[:, 1 + n_text:, :])


def public_text(model, ivlp):
    """``VLPromptLearner.forward`` + ``TextEncoder.forward`` with ``ResidualAttentionBlock_IVLP(text_layer=True)``:
    block i (1 <= i < J_t) replaces positions 1..n of its input by its own ``VPT_shallow``."""
    ctx = ivlp.ctx.unsqueeze(0).expand(ivlp.token_prefix.shape[0], -1, -1)
    x = torch.cat([ivlp.token_prefix, ctx, ivlp.token_suffix], dim=1) + model.positional_embedding
    n = ivlp.ctx.shape[0]
    for i, block in enumerate(model.transformer.resblocks):
        if i != 0 and i - 1 < len(ivlp.text_vpt):
            x = torch.cat([x[:, :1], ivlp.text_vpt[i - 1].expand(x.shape[0], -1, -1), x[:, 1 + n:]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), ivlp.tokenized_prompts.argmax(dim=-1)] @ model.text_projection


def public_image(model, ivlp, image):
    """``VisionTransformer.forward`` with ``VPT_shallow`` on: ``VPT`` appended before ``ln_pre``; block i
    (1 <= i < J_v) replaces the last n tokens by its own ``VPT_shallow``."""
    v = model.visual
    x = v.conv1(image)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x], dim=1)
    x = x + v.positional_embedding
    x = v.ln_pre(torch.cat([x, ivlp.vpt.expand(x.shape[0], -1, -1)], dim=1))
    n = ivlp.vpt.shape[0]
    for i, block in enumerate(v.transformer.resblocks):
        if i != 0 and i - 1 < len(ivlp.vision_vpt):
            x = torch.cat([x[:, : x.shape[1] - n], ivlp.vision_vpt[i - 1].expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    return v.ln_post(x[:, 0, :]) @ v.proj


@torch.no_grad()
@pytest.mark.parametrize("which,depth_text,depth_vision", [("tiny", 1, 1), ("tiny", 2, 2), ("tiny", 2, 1),
                                                           ("mixed", 3, 3), ("mixed", 1, 3)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_forward_equals_the_public_code(tiny_backbone, which, depth_text, depth_vision, dtype, tol):
    backbone = copy.deepcopy(tiny_backbone if which == "tiny" else build_mixed_vit()).to(dtype)
    model = backbone.model
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ivlp = PublicIVLP(backbone, CLASSNAMES, 2, 3, depth_text, depth_vision).to(dtype)
        images = torch.randn(4, 3, 32, 32, dtype=dtype)
    text_ref = nn.functional.normalize(public_text(model, ivlp), dim=-1)
    image_ref = nn.functional.normalize(public_image(model, ivlp, images), dim=-1)

    learner = PromptLearner(backbone, CLASSNAMES, n_ctx=2).to(dtype)
    text = learner.text_features(backbone, ivlp.ctx, deep=list(ivlp.text_vpt))
    image = nn.functional.normalize(visual_tower(model, visual_tokens(model, images), 0, ivlp.vpt,
                                                 list(ivlp.vision_vpt)), dim=-1)
    torch.testing.assert_close(text, text_ref, rtol=0, atol=tol)
    torch.testing.assert_close(image, image_ref, rtol=0, atol=tol)
