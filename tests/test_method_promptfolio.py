"""PromptFolio: the theta mix of normalised text features, FedAvg of the global prompt only with private local
prompts, and an end-to-end run."""

from __future__ import annotations

import pytest
import torch

from fedlit.algorithms import build_algorithm
from fedlit.config import load_config
from fedlit.errors import UserError
from fedlit.modules.coop import CoOpClient
from fedlit.modules.promptfolio import LOCAL, PromptFolioClient, local_prompt_init, mix_features
from fedlit.state import PROMPT, ClientState, StoreEntry, Upload
from tests.method_checks import assert_groups_match_single, assert_run_averages_the_prompt_and_keeps_private


def test_mix_is_a_convex_combination_of_normalised_features_without_renormalisation():
    global_features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    local_features = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    mixed = mix_features(global_features, local_features, 0.25)
    assert torch.equal(mixed, torch.tensor([[0.75, 0.25], [0.0, 1.0]]))
    # per client theta over a group (G = 2)
    grouped = mix_features(torch.stack([global_features] * 2), torch.stack([local_features] * 2),
                           torch.tensor([0.25, 0.5]))
    assert torch.equal(grouped[1], torch.tensor([[0.5, 0.5], [0.0, 1.0]]))


def test_logits_use_the_mix_with_clip_logit_scale(tiny_backbone, classnames):
    module = PromptFolioClient(tiny_backbone, classnames, theta=0.4, prompt={"n_ctx": 4}, seed=0)
    with torch.no_grad():
        module.local_ctx.add_(0.5)  # make the two prompts clearly different
    features = module.prompt_learner.text_features(tiny_backbone, torch.stack([module.prompt_learner.ctx,
                                                                               module.local_ctx]))
    expected = 0.6 * features[0] + 0.4 * features[1]
    text = module.class_text_features()
    assert torch.equal(text, expected)
    # each prompt's features are unit vectors; their mix is not renormalised
    assert torch.allclose(features.norm(dim=-1), torch.ones(2, 3), atol=1e-6)
    assert (text.norm(dim=-1) < 1 - 1e-4).all()
    # one text-tower pass per prompt gives the same up to float rounding
    alone = module.prompt_learner.text_features(tiny_backbone, module.local_ctx)
    assert torch.allclose(features[1], alone, atol=1e-6)
    image = torch.nn.functional.normalize(torch.randn(5, tiny_backbone.feature_dim), dim=-1)
    assert torch.equal(module(image), tiny_backbone.logit_scale * image @ expected.T)


def test_theta_zero_extras_give_exactly_the_global_prompt_logits(tiny_backbone, classnames):
    module = PromptFolioClient(tiny_backbone, classnames, theta=0.4, prompt={"n_ctx": 4}, seed=0)
    coop = CoOpClient(tiny_backbone, classnames, prompt={"n_ctx": 4}, seed=0)
    assert torch.equal(module.prompt_learner.ctx, coop.prompt_learner.ctx)
    module.set_extras({"theta": 0.0})
    features = module.prompt_features(module.prompt_learner.ctx, module.local_ctx)[0]
    assert torch.equal(module.class_text_features(), features)
    assert torch.allclose(features, coop.class_text_features(), atol=1e-6)
    module.set_extras({})
    assert module.theta == 0.4


def test_local_prompt_init_is_an_independent_seeded_draw_or_the_init_words(tiny_backbone, classnames):
    module = PromptFolioClient(tiny_backbone, classnames, prompt={"n_ctx": 4, "init_std": 0.02}, seed=3)
    assert torch.equal(module.local_ctx, local_prompt_init((4, tiny_backbone.text_width), 0.02, 3))
    assert not torch.equal(module.local_ctx, module.prompt_learner.ctx)
    assert module.local_ctx.std().item() == pytest.approx(0.02, rel=0.25)
    worded = PromptFolioClient(tiny_backbone, classnames, prompt={"ctx_init": "a photo of a"}, seed=3)
    assert torch.equal(worded.local_ctx, worded.prompt_learner.ctx)
    assert set(module.trainable_parameters()) == {PROMPT, LOCAL}
    [group] = module.param_groups()
    assert group["schedule"] == "cosine" and len(group["params"]) == 2


def _algorithm(tmp_path, *overrides):
    return build_algorithm(load_config(None, [f"run.out_dir={tmp_path}", "algorithm=promptfolio", *overrides]))


def _state(ctx: float, local: float) -> ClientState:
    return ClientState({PROMPT: torch.full((2, 3), ctx), LOCAL: torch.full((2, 3), local)})


def test_aggregation_averages_only_the_global_prompt_and_local_prompts_stay_private(tmp_path):
    algorithm = _algorithm(tmp_path)
    initial = _state(0.0, -1.0)
    server = algorithm.init_server(initial)
    assert set(server.global_state) == {"ctx"}
    uploads = {0: Upload(_state(1.0, 10.0), loss=0.0, steps=1), 1: Upload(_state(5.0, 20.0), loss=0.0, steps=1)}
    new = algorithm.aggregate(server, uploads, {0: 1, 1: 3})
    assert set(new.global_state) == {"ctx"} and new.round == 1
    assert torch.equal(new.global_state["ctx"], torch.full((2, 3), 4.0))  # (1 * 1 + 3 * 5) / 4
    store = {c: StoreEntry(u.state, last_round=1) for c, u in uploads.items()}
    for cid, local in ((0, 10.0), (1, 20.0)):
        for plan in (algorithm.plan(new, cid, store[cid], initial), algorithm.eval_plan(new, cid, store[cid], initial)):
            assert torch.equal(plan.start.params[PROMPT], torch.full((2, 3), 4.0))
            assert torch.equal(plan.start.params[LOCAL], torch.full((2, 3), local))
            assert plan.extras == {}
    never = algorithm.eval_plan(new, 2, None, initial)  # never trained: P_g with the initial local prompt
    assert torch.equal(never.start.params[LOCAL], initial.params[LOCAL])
    glob = algorithm.global_plan(new, initial)
    assert glob.extras == {"theta": 0.0} and torch.equal(glob.start.params[PROMPT], torch.full((2, 3), 4.0))
    assert torch.equal(uploads[0].state.params[PROMPT], torch.full((2, 3), 1.0))  # uploads are not modified


def test_theta_out_of_range_is_a_user_error(tmp_path):
    for theta in (1.5, -0.1):  # refused by config validation, before anything is built
        with pytest.raises(UserError, match=r"method\.theta"):
            _algorithm(tmp_path, f"method.theta={theta}")


def test_grouped_training_matches_one_client_at_a_time(tmp_path):
    assert_groups_match_single(tmp_path, "promptfolio", [PROMPT, LOCAL])


def test_end_to_end_run_keeps_private_local_prompts_and_averages_the_global_one(tmp_path):
    assert_run_averages_the_prompt_and_keeps_private(tmp_path, "promptfolio", [LOCAL])
