"""KgCoOp: the knowledge-guided loss against a re-implementation of the public forward and loss (htyao89/KgCoOp,
KgCoOp/trainers/kgcoop.py), FedAvg of the prompt, groups, an end-to-end run and config errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fedlit.algorithms import build_algorithm
from fedlit.config import load_config
from fedlit.errors import UserError
from fedlit.modules.coop import CoOpClient
from fedlit.modules.kgcoop import KgCoOpClient, knowledge_guidance
from fedlit.state import PROMPT
from tests.method_checks import assert_groups_match_single, assert_run_averages_the_prompt_and_keeps_private

TEMPLATE = "a photo of a {}, a type of pet."  # one of the public code's CUSTOM_TEMPLATES (OxfordPets)


def public_kgcoop(model, classnames: list[str], tokenizer, ctx: torch.Tensor, ctx_words: str, template: str,
                  image_features: torch.Tensor, labels: torch.Tensor, w: float):
    """The public ``CustomCLIP.forward`` and ``forward_backward`` of KgCoOp (fp32), op for op on an open_clip model:
    full 77-token prompts ``[SOS, ctx, class tokens, EOS]``, the hand-crafted prompt's features from the frozen
    CLIP's ``encode_text``, ``score = 1 - mean(cos(text, text_old))``, ``loss = CE + w * score``."""
    prompts = [ctx_words + " " + name.replace("_", " ") + "." for name in classnames]
    tokenized = tokenizer(prompts)
    n_ctx = ctx.shape[0]
    with torch.no_grad():
        embedding = model.token_embedding(tokenized)
        old = model.encode_text(tokenizer([template.format(c.replace("_", " ")) for c in classnames]))
        old = old / old.norm(dim=-1, keepdim=True)
    prompts = torch.cat([embedding[:, :1, :], ctx.unsqueeze(0).expand(len(classnames), -1, -1),
                         embedding[:, 1 + n_ctx :, :]], dim=1)
    x = prompts + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)  # open_clip is batch-first (no NLD -> LND permute)
    x = model.ln_final(x)
    text_features = x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp() * image_features @ text_features.t()
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-07)
    text_features_old = old / old.norm(dim=-1, keepdim=True)
    score = 1.0 - torch.mean(cos(text_features, text_features_old))
    return logits, F.cross_entropy(logits, labels) + w * score, score


def _module(backbone, classnames, weight: float = 8.0, **prompt) -> KgCoOpClient:
    return KgCoOpClient(backbone, classnames, weight=weight, template=TEMPLATE, prompt={"n_ctx": 4, **prompt}, seed=0)


def test_score_is_one_minus_mean_cosine_and_half_the_mean_squared_distance():
    learned = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    anchor = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert knowledge_guidance(learned, anchor).item() == pytest.approx(1.0 - (1.0 + 0.6) / 2, abs=1e-7)
    half_sq = ((learned - anchor) ** 2).sum(-1).mean() / 2
    assert knowledge_guidance(learned, anchor).item() == pytest.approx(half_sq.item(), abs=1e-7)
    grouped = knowledge_guidance(torch.stack([learned, anchor]), anchor)  # G = 2 clients, one anchor
    assert grouped.shape == (2,) and grouped[1].item() == pytest.approx(0.0, abs=1e-7)


def _public_and_fedlit(module: KgCoOpClient, raw: torch.Tensor, labels: torch.Tensor, classnames: list[str],
                       words: str):
    """Logits, loss and context gradient of ``module`` and of the public forward (sharing its context), then the
    public score: ``(logits, loss, grad, logits_ref, loss_ref, grad_ref, score_ref)``."""
    backbone, learner = module.backbone, module.prompt_learner
    ctx = learner.ctx.detach().clone().requires_grad_(True)
    logits_ref, loss_ref, score_ref = public_kgcoop(backbone.model, classnames, backbone.tokenizer, ctx, words,
                                                    TEMPLATE, raw, labels, 8.0)
    loss_ref.backward()
    logits = module(F.normalize(raw, dim=-1))
    loss = module.loss(logits, labels)
    loss.backward()
    return logits, loss, learner.ctx.grad, logits_ref, loss_ref, ctx.grad, score_ref


def _moved(module: KgCoOpClient) -> KgCoOpClient:
    """``module`` with its context moved away from the init, so that the regulariser is not negligible."""
    ctx = module.prompt_learner.ctx
    with torch.no_grad():
        ctx.add_(0.3 * torch.randn(ctx.shape, generator=torch.Generator().manual_seed(1)).to(ctx))
    return module


@pytest.mark.parametrize("ctx_init", [None, "a photo of a"])
def test_loss_and_gradient_match_the_public_forward(tiny_backbone, classnames, ctx_init):
    module = _moved(_module(tiny_backbone, classnames, ctx_init=ctx_init))
    raw = torch.randn(6, tiny_backbone.feature_dim, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    words = ctx_init if ctx_init is not None else " ".join(["X"] * 4)
    logits, loss, grad, logits_ref, loss_ref, grad_ref, score_ref = _public_and_fedlit(module, raw, labels,
                                                                                       classnames, words)
    scale = tiny_backbone.logit_scale  # 14.3: compare the cosines, fp32 rounds the scaled logits to ~2e-6
    assert torch.allclose(logits / scale, logits_ref / scale, atol=1e-6, rtol=0)
    assert score_ref.item() > 0.05  # the term is not negligible here
    with torch.no_grad():
        score = knowledge_guidance(module.class_text_features(), module.anchor_features)
    assert abs(score.item() - score_ref.item()) < 1e-6
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6, abs=1e-6)  # CE + 8 score reaches 6 here
    assert torch.allclose(grad, grad_ref, atol=1e-5, rtol=1e-5)  # fp32, two summation orders, w = 8


def test_gradient_equals_the_public_one_in_float64(tiny_backbone, classnames):
    module = _moved(copy.deepcopy(_module(tiny_backbone, classnames)).double())  # its own float64 backbone
    raw = torch.randn(6, tiny_backbone.feature_dim, generator=torch.Generator().manual_seed(2)).double()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logits, loss, grad, logits_ref, loss_ref, grad_ref, _ = _public_and_fedlit(module, raw, labels, classnames,
                                                                               "X X X X")
    assert grad.dtype == torch.float64 and torch.allclose(logits, logits_ref, atol=1e-10, rtol=0)
    assert abs(loss.item() - loss_ref.item()) < 1e-6  # fedlit's loss takes the cross-entropy in fp32
    assert torch.allclose(grad, grad_ref, atol=1e-6, rtol=0)


def test_the_step_encodes_the_prompt_once_and_the_regulariser_reads_its_features(tiny_backbone, classnames):
    module = _module(tiny_backbone, classnames)
    image = F.normalize(torch.randn(4, tiny_backbone.feature_dim), dim=-1)
    labels = torch.tensor([0, 1, 2, 0])
    calls = []
    encode = module.prompt_learner.text_features
    module.prompt_learner.text_features = lambda *a, **k: calls.append(1) or encode(*a, **k)
    loss = module.loss(module(image), labels)
    assert len(calls) == 1  # the forward's features serve the regulariser too
    text = encode(tiny_backbone)
    fresh = F.cross_entropy(tiny_backbone.logit_scale * image @ text.T, labels) + 8.0 * knowledge_guidance(
        text, module.anchor_features)
    assert torch.equal(loss, fresh)
    assert module.regularizer() is not None and len(calls) == 2  # without a forward it encodes the prompt itself
    with torch.no_grad():  # evaluation keeps nothing
        module(image)
    assert module._step_text is None


def test_anchor_is_the_frozen_clip_features_of_the_template(tiny_backbone, classnames):
    module = _module(tiny_backbone, classnames)
    texts = [TEMPLATE.format(n.replace("_", " ")) for n in classnames]
    expected = F.normalize(tiny_backbone.model.encode_text(tiny_backbone.tokenizer(texts)), dim=-1)
    assert torch.allclose(module.anchor_features, expected, atol=1e-6)
    assert not module.anchor_features.requires_grad
    assert set(module.trainable_parameters()) == {PROMPT}


def test_weight_zero_is_coop(tiny_backbone, classnames):
    module, coop = _module(tiny_backbone, classnames, weight=0.0), CoOpClient(tiny_backbone, classnames,
                                                                               prompt={"n_ctx": 4}, seed=0)
    image = F.normalize(torch.randn(5, tiny_backbone.feature_dim), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert module.regularizer() is None
    assert torch.equal(module.loss(module(image), labels), coop.loss(coop(image), labels))


def _algorithm(tmp_path, *overrides):
    return build_algorithm(load_config(None, [f"run.out_dir={tmp_path}", "algorithm=kgcoop", *overrides]))


def test_defaults_follow_the_public_scripts(tmp_path, tiny_backbone, classnames):
    algorithm = _algorithm(tmp_path)
    assert algorithm.cfg.method.kg_weight == 8.0
    module = algorithm.build_module(tiny_backbone, classnames)
    assert isinstance(module, KgCoOpClient) and module.weight == 8.0 and module.template == "a photo of a {}."


@pytest.mark.parametrize("value", ["-1", "nan", "abc"])
def test_bad_weight_is_a_user_error(tmp_path, value):
    with pytest.raises(UserError, match=r"method\.kg_weight"):
        _algorithm(tmp_path, f"method.kg_weight={value}")


def test_grouped_training_matches_one_client_at_a_time(tmp_path):
    assert_groups_match_single(tmp_path, "kgcoop", [PROMPT])


def test_end_to_end_run_averages_the_prompt(tmp_path):
    assert_run_averages_the_prompt_and_keeps_private(tmp_path, "kgcoop", [])
