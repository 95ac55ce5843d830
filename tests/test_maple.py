"""MaPLe: the coupled prompts and the whole forward (text tower with deep compound prompts, vision tower with the
projected prompts) against a re-implementation of the public code (muzairkhattak/multimodal-prompt-learning,
trainers/maple.py and clip/model.py), on the tiny ViT CLIP and on a CLIP whose text and vision widths differ."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedlit.clip_vision import visual_tokens, visual_tower
from fedlit.modules.maple import couple, linear_init
from fedlit.prompts import PromptLearner
from tests.conftest import CLASSNAMES, build_mixed_vit


# -- the public code's MaPLe, written out on open_clip's batch-first blocks -------------------------------------
class PublicMultiModalPromptLearner(nn.Module):
    """``MultiModalPromptLearner``: ``ctx``, ``proj = Linear(ctx_dim, vis_dim)``, ``compound_prompts_text`` and
    ``compound_prompt_projections``; full 77-token prompts ``[SOS, ctx, name., EOS]``."""

    def __init__(self, backbone, classnames, n_ctx, depth, vis_dim):
        super().__init__()
        model = backbone.model
        ctx_dim = model.ln_final.weight.shape[0]
        self.ctx = nn.Parameter(torch.randn(n_ctx, ctx_dim) * 0.02)
        self.proj = nn.Linear(ctx_dim, vis_dim)
        self.compound_prompts_text = nn.ParameterList([nn.Parameter(torch.randn(n_ctx, ctx_dim) * 0.02)
                                                       for _ in range(depth - 1)])
        single_layer = nn.Linear(ctx_dim, vis_dim)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single_layer) for _ in range(depth - 1)])
        prefix = " ".join(["X"] * n_ctx)
        names = [n.replace("_", " ") for n in classnames]
        self.tokenized_prompts = backbone.tokenize([prefix + " " + name + "." for name in names])
        with torch.no_grad():
            embedding = model.token_embedding(self.tokenized_prompts)
        self.register_buffer("token_prefix", embedding[:, :1, :])
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:, :])
        self.n_cls = len(names)

    def forward(self):
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        visual_deep_prompts = [layer(self.compound_prompts_text[i])
                               for i, layer in enumerate(self.compound_prompt_projections)]
        return prompts, self.proj(self.ctx), self.compound_prompts_text, visual_deep_prompts


def public_text_encoder(model, prompts, tokenized_prompts, compound_prompts_deeper_text):
    """``TextEncoder.forward`` through ``Transformer`` of ``ResidualAttentionBlock_MaPLe`` (text_layer=True)."""
    x = prompts + model.positional_embedding
    counter = 0
    for i, block in enumerate(model.transformer.resblocks):
        if i != 0 and len(compound_prompts_deeper_text) > 0 and not counter > len(compound_prompts_deeper_text) - 1:
            n = compound_prompts_deeper_text[counter].shape[0]
            textual_context = compound_prompts_deeper_text[counter].expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], textual_context, x[:, 1 + n:]], dim=1)
            counter += 1
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ model.text_projection


def public_image_encoder(model, image, shared_ctx, compound_deeper_prompts):
    """``VisionTransformer_MaPLe.forward`` through ``ResidualAttentionBlock_MaPLe`` (text_layer=False)."""
    v = model.visual
    x = v.conv1(image)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x], dim=1)
    x = x + v.positional_embedding
    x = torch.cat([x, shared_ctx.expand(x.shape[0], -1, -1)], dim=1)
    x = v.ln_pre(x)
    counter = 0
    for i, block in enumerate(v.transformer.resblocks):
        if i != 0 and len(compound_deeper_prompts) > 0 and not counter > len(compound_deeper_prompts) - 1:
            n = compound_deeper_prompts[counter].shape[0]
            x = torch.cat([x[:, : x.shape[1] - n], compound_deeper_prompts[counter].expand(x.shape[0], -1, -1)], 1)
            counter += 1
        x = block(x)
    return v.ln_post(x[:, 0, :]) @ v.proj


def public_forward(backbone, learner, image):
    """``CustomCLIP.forward`` in evaluation: normalised image and text features and the logits ``(B, C)``."""
    prompts, shared_ctx, deep_text, deep_vision = learner()
    text_features = public_text_encoder(backbone.model, prompts, learner.tokenized_prompts, deep_text)
    image_features = public_image_encoder(backbone.model, image, shared_ctx, deep_vision)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return image_features, text_features, backbone.model.logit_scale.exp() * image_features @ text_features.t()


# -- fedlit's pieces on the same tensors --------------------------------------------------------------------------
def fedlit_forward(backbone, learner, image):
    """fedlit's MaPLe forward with the public learner's tensors: PromptLearner's text features with deep prompts,
    :func:`couple`, the split vision tower."""
    ours = PromptLearner(backbone, CLASSNAMES, n_ctx=learner.ctx.shape[0]).to(learner.ctx.dtype)
    deep_text = torch.stack(list(learner.compound_prompts_text)) if len(learner.compound_prompts_text) else \
        learner.ctx.new_zeros(0, *learner.ctx.shape)
    projections = learner.compound_prompt_projections
    deep_w = torch.stack([p.weight for p in projections]) if len(projections) else \
        learner.proj.weight.new_zeros(0, *learner.proj.weight.shape)
    deep_b = torch.stack([p.bias for p in projections]) if len(projections) else \
        learner.proj.bias.new_zeros(0, *learner.proj.bias.shape)
    shallow, deep = couple(learner.ctx, deep_text, learner.proj.weight, learner.proj.bias, deep_w, deep_b)
    text = ours.text_features(backbone, learner.ctx, deep=list(deep_text.unbind(0)))
    image_features = nn.functional.normalize(visual_tower(backbone.model, visual_tokens(backbone.model, image), 0,
                                                          shallow, deep), dim=-1)
    return image_features, text, backbone.logit_scale * image_features @ text.t()


def _case(backbone, depth, dtype, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        width = backbone.model.visual.class_embedding.shape[0]
        learner = PublicMultiModalPromptLearner(backbone, CLASSNAMES, 2, depth, width).to(dtype)
        images = torch.randn(4, 3, 32, 32, dtype=dtype)
    return learner, images


@pytest.mark.parametrize("which,depth", [("tiny", 1), ("tiny", 2), ("mixed", 1), ("mixed", 3)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@torch.no_grad()
def test_forward_equals_the_public_code(tiny_backbone, which, depth, dtype, tol):
    backbone = copy.deepcopy(tiny_backbone if which == "tiny" else build_mixed_vit()).to(dtype)
    learner, images = _case(backbone, depth, dtype)
    expected = public_forward(backbone, learner, images)
    got = fedlit_forward(backbone, learner, images)
    for ours, theirs in zip(got[:2], expected[:2]):  # unit-norm image and text features
        torch.testing.assert_close(ours, theirs, rtol=0, atol=tol)
    scale = float(backbone.logit_scale)  # logits are s (= 1/0.07 here) times a cosine
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=tol * scale)


def test_couple_is_the_public_projections():
    g = torch.Generator().manual_seed(0)
    ctx, deep_text = torch.randn(2, 32, generator=g), torch.randn(2, 2, 32, generator=g)
    proj, layers = nn.Linear(32, 64), [nn.Linear(32, 64) for _ in range(2)]
    shallow, deep = couple(ctx, deep_text, proj.weight, proj.bias, torch.stack([m.weight for m in layers]),
                           torch.stack([m.bias for m in layers]))
    torch.testing.assert_close(shallow, proj(ctx), rtol=0, atol=1e-6)
    for j, layer in enumerate(layers):
        torch.testing.assert_close(deep[j], layer(deep_text[j]), rtol=0, atol=1e-6)
    # a group of G clients' own couplings: (G, ...) leading dimensions give each client's prompts
    stacked = couple(torch.stack([ctx, 2 * ctx]), torch.stack([deep_text, -deep_text]),
                     torch.stack([proj.weight, proj.weight.flip(0)]), torch.stack([proj.bias, proj.bias]),
                     torch.stack([torch.stack([m.weight for m in layers])] * 2),
                     torch.stack([torch.stack([m.bias for m in layers])] * 2))
    assert torch.equal(stacked[0][0], shallow)
    torch.testing.assert_close(stacked[0][1], 2 * ctx @ proj.weight.flip(0).t() + proj.bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(stacked[1][1][1], layers[1](-deep_text[1]), rtol=0, atol=1e-6)


def test_linear_init_is_nn_linear_default():
    """The coupling starts as ``nn.Linear``'s default (the public ``proj``): U(±1/sqrt(in)) for weight and bias;
    the deep couplings are one draw repeated (the public ``_get_clones`` deep-copies one initialised layer)."""
    weight, bias = linear_init(64, 32, torch.Generator().manual_seed(0))
    bound = 32 ** -0.5
    assert weight.shape == (64, 32) and bias.shape == (64,)
    assert weight.abs().max() <= bound and bias.abs().max() <= bound
    assert weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)  # the uniform's std
    again = linear_init(64, 32, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], weight) and torch.equal(again[1], bias)
    w3, b3 = linear_init(64, 32, torch.Generator().manual_seed(0), copies=3)
    assert w3.shape == (3, 64, 32) and all(torch.equal(w3[j], weight) for j in range(3))
    assert all(torch.equal(b3[j], bias) for j in range(3))


def test_deep_text_prompts_through_the_prompt_learner_match_a_group(tiny_backbone):
    """PromptLearner.text_features with deep prompts: a stack of G contexts with their own deep prompts gives each
    context's features (G = 2), and no deep prompt is the plain CoOp text features."""
    learner = PromptLearner(tiny_backbone, CLASSNAMES, n_ctx=2, seed=0)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(2, 2, 64, generator=g) * 0.02
    deep = torch.randn(2, 2, 64, generator=g) * 0.02  # (G, n, W) for the one deep layer of the tiny tower
    together = learner.text_features(tiny_backbone, ctx, deep=[deep])
    for c in range(2):
        alone = learner.text_features(tiny_backbone, ctx[c], deep=[deep[c]])
        torch.testing.assert_close(together[c], alone, rtol=0, atol=1e-6)
    assert not torch.allclose(together[0], learner.text_features(tiny_backbone, ctx[0]), atol=1e-3)
    assert torch.equal(learner.text_features(tiny_backbone, ctx[0], deep=()),
                       learner.text_features(tiny_backbone, ctx[0]))
    with pytest.raises(ValueError, match="unified context with the class at the end"):
        PromptLearner(tiny_backbone, CLASSNAMES, n_ctx=2, class_position="front").text_features(
            tiny_backbone, deep=[deep[0]])
