"""IVLP: independent deep text and vision prompts, the whole forward against a re-implementation of the public code
(muzairkhattak/multimodal-prompt-learning, trainers/independentVL.py and clip/model.py's
ResidualAttentionBlock_IVLP / VisionTransformer), on the tiny ViT CLIP and on a CLIP whose widths differ. The run-level
checks (FedAvg into the global model, cached vs uncached bitwise, groups, refusals) are in tests/test_maple.py,
parametrised over ivlp and maple."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedlit.modules.ivlp import DEEP_TEXT, IVLPClient
from fedlit.modules.vpt import VISION_PROMPT
from fedlit.state import PROMPT
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

    state = {PROMPT: ivlp.ctx, VISION_PROMPT: torch.stack([ivlp.vpt, *ivlp.vision_vpt])}
    if depth_text > 1:
        state[DEEP_TEXT] = torch.stack(list(ivlp.text_vpt))
    module = IVLPClient(backbone, CLASSNAMES, prompt={"n_ctx": 2, "vision_n_ctx": 3, "depth": depth_text}, seed=0)
    module = module.to(dtype)
    if depth_text != depth_vision:  # one prompt.depth for both towers in fedlit: the vision rows set by hand
        module.vision_prompt = nn.Parameter(state[VISION_PROMPT].clone())
    module.load_client_state(state)
    torch.testing.assert_close(module.class_text_features(), text_ref, rtol=0, atol=tol)
    torch.testing.assert_close(module.image_features(images), image_ref, rtol=0, atol=tol)
    logits = module(module.frozen_image_inputs(images))
    expected = model.logit_scale.exp() * image_ref @ text_ref.t()
    torch.testing.assert_close(logits, expected, rtol=0, atol=tol * float(module.backbone.logit_scale))


def test_initial_state_and_depths(tiny_backbone):
    module = IVLPClient(tiny_backbone, CLASSNAMES, prompt={"n_ctx": 4, "vision_n_ctx": 2}, seed=0)
    params = module.trainable_parameters()
    assert {k: tuple(v.shape) for k, v in params.items()} == {PROMPT: (4, 64), DEEP_TEXT: (1, 4, 64),
                                                              VISION_PROMPT: (2, 2, 64)}
    rows = [params[PROMPT][0], params[DEEP_TEXT][0, 0], params[VISION_PROMPT][0, 0]]
    assert all(not torch.equal(rows[i], rows[j]) for i in range(3) for j in range(i + 1, 3))  # independent draws
    assert all(abs(float(v.detach().std()) - 0.02) < 0.006 for v in params.values())  # N(0, 0.02²)
    again = IVLPClient(tiny_backbone, CLASSNAMES, prompt={"n_ctx": 4, "vision_n_ctx": 2}, seed=0)
    assert all(torch.equal(v, again.trainable_parameters()[k]) for k, v in params.items())
    shallow = IVLPClient(tiny_backbone, CLASSNAMES, prompt={"n_ctx": 4, "depth": 1}, seed=0)
    assert {k: tuple(v.shape) for k, v in shallow.trainable_parameters().items()} == {PROMPT: (4, 64),
                                                                                    VISION_PROMPT: (1, 2, 64)}
    # depth None: every block of each tower; from image block 1 of the mixed CLIP, 2 vision and 3 text layers
    mixed = IVLPClient(build_mixed_vit(), CLASSNAMES, prompt={"n_ctx": 2, "vision_start_layer": 1}, seed=0)
    assert mixed.text_depth == 3 and mixed.vision_prompt.shape == (2, 2, 64)
