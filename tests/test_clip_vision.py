"""The ViT image tower split into frozen tokens + prompted blocks, and deep text prompts (fedlit.clip_vision,
fedlit.clip_text): without prompts they are the plain towers; with prompts they equal a direct re-implementation of
the public VPT/MaPLe forward (prompts concatenated after the image tokens before ln_pre, replaced at later layers)."""

import pytest
import torch

from fedlit.backbone import load_backbone
from fedlit.clip_text import text_tower
from fedlit.clip_vision import prompt_tower, visual_tokens, visual_tower
from fedlit.errors import UserError


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny").double()


def _images(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("start", [0, 1, 2])
def test_split_tower_without_prompts_is_encode_image(tiny, start):
    images = _images()
    expected = tiny.model.encode_image(images)
    got = visual_tower(tiny.model, visual_tokens(tiny.model, images, start), start)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def _reference_vpt(model, images, shallow, deep):
    """The public code's VisionTransformer forward with VPT prompts, written out."""
    v = model.visual
    x = v.conv1(images).reshape(images.shape[0], v.conv1.out_channels, -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = torch.cat([x, shallow.expand(x.shape[0], -1, -1)], dim=1)
    x = v.ln_pre(x)
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, : -shallow.shape[0]], deep[i - 1].expand(x.shape[0], -1, -1)], dim=1)
        x = block(x)
    return v.ln_post(x[:, 0]) @ v.proj


@pytest.mark.parametrize("n_deep", [0, 1])
def test_prompted_tower_equals_the_public_forward(tiny, n_deep):
    g = torch.Generator().manual_seed(1)
    shallow = torch.randn(3, 64, generator=g, dtype=torch.float64)
    deep = [torch.randn(3, 64, generator=g, dtype=torch.float64) for _ in range(n_deep)]
    images = _images()
    got = visual_tower(tiny.model, visual_tokens(tiny.model, images), 0, shallow, deep)
    torch.testing.assert_close(got, _reference_vpt(tiny.model, images, shallow, deep), rtol=0, atol=1e-12)
    # checkpointing recomputes, it does not change the numbers
    again = visual_tower(tiny.model, visual_tokens(tiny.model, images), 0, shallow, deep, use_checkpoint=True)
    assert torch.equal(got, again)


def test_prompts_broadcast_over_a_group_of_clients(tiny):
    g = torch.Generator().manual_seed(2)
    prompts = torch.randn(2, 1, 3, 64, generator=g, dtype=torch.float64)  # two clients' own prompts
    tokens = visual_tokens(tiny.model, _images(4)).reshape(2, 2, -1, 64)
    together = visual_tower(tiny.model, tokens, 0, prompts)
    for c in range(2):
        alone = visual_tower(tiny.model, tokens[c], 0, prompts[c, 0])
        torch.testing.assert_close(together[c], alone, rtol=0, atol=1e-12)


def test_prompted_tower_backpropagates_to_prompts_only(tiny):
    shallow = torch.zeros(2, 64, dtype=torch.float64, requires_grad=True)
    visual_tower(tiny.model, visual_tokens(tiny.model, _images()), 0, shallow).sum().backward()
    assert shallow.grad is not None and shallow.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


def test_resnet_tower_is_refused_in_one_line():
    rn = load_backbone("RN50", "random")
    with pytest.raises(UserError, match="ModifiedResNet image tower; visual prompts need a ViT"):
        prompt_tower(rn.model, "RN50")


def test_deep_text_prompts_replace_the_context_before_each_block(tiny):
    model = tiny.model
    tokens = tiny.tokenize(["a photo of a cat.", "a dog"])
    emb = model.token_embedding(tokens).double()
    eot = tokens.argmax(-1)
    assert torch.equal(text_tower(model, emb, eot, deep=()), text_tower(model, emb, eot))
    deep = [torch.randn(2, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)]
    x = emb + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if i == 1:
            x = torch.cat([x[:, :1], deep[0].expand(2, -1, -1), x[:, 3:]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)[torch.arange(2), eot] @ model.text_projection
    torch.testing.assert_close(text_tower(model, emb, eot, deep=deep), x, rtol=0, atol=1e-12)
