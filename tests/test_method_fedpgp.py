"""FedPGP: the low-rank personalised prompt sigma + U V, the prompt-wise contrastive loss, FedAvg of sigma only
with private U and V, and an end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch

from fedlit.algorithms import build_algorithm
from fedlit.config import load_config
from fedlit.errors import UserError
from fedlit.modules.fedpgp import LOW_U, LOW_V, FedPGPClient, lowrank_init, personal_context, prompt_contrastive_loss
from fedlit.state import PROMPT, ClientState, StoreEntry, Upload
from tests.method_checks import assert_groups_match_single, assert_run_averages_the_prompt_and_keeps_private


def test_personal_context_is_sigma_plus_u_times_v():
    sigma = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # (n_ctx = 2, W = 3)
    u = torch.tensor([[1.0], [2.0]])  # (n_ctx, r = 1)
    v = torch.tensor([[10.0, 20.0, 30.0]])  # (r, W)
    assert torch.equal(personal_context(sigma, u, v), torch.tensor([[11.0, 22.0, 33.0], [24.0, 45.0, 66.0]]))
    # G = 2 stacked clients, rank 2
    u2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [1.0, 1.0]]])
    v2 = torch.tensor([[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]] * 2)
    out = personal_context(torch.stack([sigma, sigma]), u2, v2)
    assert torch.equal(out[0], sigma + torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]))
    assert torch.equal(out[1], sigma + torch.tensor([[0.0, 0.0, 0.0], [3.0, 3.0, 3.0]]))


def test_contrastive_loss_matches_the_two_way_cross_entropy_by_hand():
    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    global_features = torch.tensor([[2.0, 0.0], [0.6, 0.8]])  # cosine, so the scale of a row does not matter
    personal = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    # class 0: p = 1, n = 0; class 1: p = 0.8, n = 1; tau = 0.5
    expected = (-math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0)))
                - math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(2.0)))) / 2
    loss = prompt_contrastive_loss(anchor, global_features, personal, 0.5)
    assert loss.dim() == 0 and loss.item() == pytest.approx(expected, abs=1e-6)
    # per client over a group, anchor shared
    grouped = prompt_contrastive_loss(anchor, torch.stack([global_features, anchor]), torch.stack([personal, anchor]),
                                      0.5)
    assert grouped.shape == (2,) and grouped[0].item() == pytest.approx(expected, abs=1e-6)
    assert grouped[1].item() == pytest.approx(math.log(2.0), abs=1e-6)  # p = n = 1: chance


def _module(backbone, classnames, **prompt):
    return FedPGPClient(backbone, classnames, rank=2, weight=0.5, temperature=0.5,
                        prompt={"n_ctx": 4, **prompt}, seed=0)


def test_text_features_use_the_personal_context_and_the_anchor_is_the_prompt_words(tiny_backbone, classnames):
    module = _module(tiny_backbone, classnames)
    learner = module.prompt_learner
    assert module.U.shape == (4, 2) and module.V.shape == (2, tiny_backbone.text_width)
    by_hand = learner.ctx + module.U @ module.V
    assert torch.equal(module.personal_context(), by_hand)
    assert torch.equal(module.class_text_features(), learner.text_features(tiny_backbone, by_hand))
    x_ids = tiny_backbone.tokenize(["X X X X"])[0, 1:5]
    assert torch.equal(module.anchor_ctx, tiny_backbone.token_embeddings(x_ids[None])[0].float())
    assert torch.equal(module.anchor_features(), learner.text_features(tiny_backbone, module.anchor_ctx))
    worded = _module(tiny_backbone, classnames, ctx_init="a photo of a")
    assert torch.equal(worded.anchor_ctx, worded.prompt_learner.ctx)  # the hand-crafted prompt is the anchor
    assert set(module.trainable_parameters()) == {PROMPT, LOW_U, LOW_V}
    [group] = module.param_groups()
    assert group["schedule"] == "cosine" and len(group["params"]) == 3


def test_loss_adds_the_weighted_contrastive_term_with_gradients_to_sigma_u_and_v(tiny_backbone, classnames):
    module = _module(tiny_backbone, classnames)
    learner = module.prompt_learner
    with torch.no_grad():
        module.U.mul_(50.0)  # a personal term large enough to move the features
    image = torch.nn.functional.normalize(torch.randn(6, tiny_backbone.feature_dim), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = module(image)
    t_sigma = learner.text_features(tiny_backbone, learner.ctx)
    t_personal = learner.text_features(tiny_backbone, module.personal_context())
    contrastive = prompt_contrastive_loss(module.anchor_features(), t_sigma, t_personal, 0.5)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    loss = module.loss(logits, labels)
    assert loss.item() == pytest.approx((ce + 0.5 * contrastive).item(), abs=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (learner.ctx, module.U, module.V))
    silent = FedPGPClient(tiny_backbone, classnames, rank=2, weight=0.0, prompt={"n_ctx": 4}, seed=0)
    assert silent.regularizer() is None


def test_lowrank_init_is_seeded_normal_with_the_prompt_std():
    u, v = lowrank_init((16, 64), 8, 0.02, seed=5)
    u2, v2 = lowrank_init((16, 64), 8, 0.02, seed=5)
    assert torch.equal(u, u2) and torch.equal(v, v2) and u.shape == (16, 8) and v.shape == (8, 64)
    assert v.std().item() == pytest.approx(0.02, rel=0.15)
    u3, v3 = lowrank_init((3, 16, 64), 8, 0.02, seed=5)  # class-specific contexts: one U, V per class
    assert u3.shape == (3, 16, 8) and v3.shape == (3, 8, 64)


def _algorithm(tmp_path, *overrides):
    return build_algorithm(load_config(None, [f"run.out_dir={tmp_path}", "algorithm=fedpgp", *overrides]))


def _state(sigma: float, u: float, v: float) -> ClientState:
    return ClientState({PROMPT: torch.full((2, 3), sigma), LOW_U: torch.full((2, 1), u), LOW_V: torch.full((1, 3), v)})


def test_aggregation_averages_only_sigma_and_u_v_stay_private(tmp_path):
    algorithm = _algorithm(tmp_path)
    initial = _state(0.0, 0.5, 0.5)
    server = algorithm.init_server(initial)
    uploads = {0: Upload(_state(1.0, 1.0, 2.0), loss=0.0, steps=1), 1: Upload(_state(5.0, 3.0, 4.0), loss=0.0, steps=1)}
    new = algorithm.aggregate(server, uploads, {0: 1, 1: 3})
    assert set(new.global_state) == {"ctx"} and new.round == 1
    assert torch.equal(new.global_state["ctx"], torch.full((2, 3), 4.0))  # (1 * 1 + 3 * 5) / 4
    store = {c: StoreEntry(u.state, last_round=1) for c, u in uploads.items()}
    for cid, (u, v) in ((0, (1.0, 2.0)), (1, (3.0, 4.0))):
        for plan in (algorithm.plan(new, cid, store[cid], initial), algorithm.eval_plan(new, cid, store[cid], initial)):
            assert torch.equal(plan.start.params[PROMPT], torch.full((2, 3), 4.0))
            assert torch.equal(plan.start.params[LOW_U], torch.full((2, 1), u))
            assert torch.equal(plan.start.params[LOW_V], torch.full((1, 3), v))
            start = plan.start.params
            assert torch.equal(personal_context(start[PROMPT], start[LOW_U], start[LOW_V]),
                               torch.full((2, 3), 4.0 + u * v))
    never = algorithm.eval_plan(new, 2, None, initial)
    assert torch.equal(never.start.params[LOW_U], initial.params[LOW_U])
    glob = algorithm.global_plan(new, initial).start.params
    assert torch.equal(personal_context(glob[PROMPT], glob[LOW_U], glob[LOW_V]), torch.full((2, 3), 4.0))
    assert torch.equal(initial.params[LOW_U], torch.full((2, 1), 0.5))  # the initial state is not modified


@pytest.mark.parametrize("key, value", [("pgp_rank", 0), ("pgp_weight", -1.0), ("pgp_temp", 0.0)])
def test_out_of_range_settings_are_user_errors(tmp_path, key, value):
    with pytest.raises(UserError, match=rf"method\.{key}"):  # refused by config validation
        _algorithm(tmp_path, f"method.{key}={value}")


def test_grouped_training_matches_one_client_at_a_time(tmp_path):
    assert_groups_match_single(tmp_path, "fedpgp", [PROMPT, LOW_U, LOW_V])


def test_end_to_end_run_keeps_private_low_rank_terms_and_averages_sigma(tmp_path):
    assert_run_averages_the_prompt_and_keeps_private(tmp_path, "fedpgp", [LOW_U, LOW_V])
