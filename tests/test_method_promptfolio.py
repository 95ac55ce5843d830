"""PromptFolio: the theta mix of normalised text features, FedAvg of the global prompt only with private local
prompts, and an end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from fedlit.algorithms import build_algorithm
from fedlit.algorithms.base import fedavg
from fedlit.algorithms.promptfolio import PromptFolio
from fedlit.config import Config, load_config
from fedlit.errors import UserError
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.experiment import build_job, run_experiment
from fedlit.modules.coop import CoOpClient
from fedlit.modules.promptfolio import LOCAL, PromptFolioClient, local_prompt_init, mix_features
from fedlit.state import PROMPT, ClientState, ServerState, StoreEntry, Upload
from tests.helpers import fast_config, only_run_dir, read_results


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
    with pytest.raises(UserError, match=r"method\.theta"):  # refused by config validation
        _algorithm(tmp_path, "method.theta=1.5")
    cfg = Config()  # and by the algorithm itself, for a config built without validation
    cfg.method.theta = -0.1
    with pytest.raises(UserError, match=r"method.theta must be in \[0, 1\]"):
        PromptFolio(cfg)


def test_grouped_training_matches_one_client_at_a_time(tmp_path):
    orch = build_job(fast_config(tmp_path, "algorithm=promptfolio", "optim.prompt_lr=0.05")).orchestrator(
        tmp_path / "run")
    server = ServerState(global_state={"ctx": orch.initial.params[PROMPT] + 0.01})
    plans = {c: orch.algorithm.plan(server, c, None, orch.initial) for c in range(orch.num_clients)}
    results = {}
    for size in (1, 4):
        orch.trainer.client_batch = size
        results[size] = orch.trainer.train(plans, 1)
    for cid, upload in results[1].items():
        grouped = results[4][cid]
        assert upload.steps == grouped.steps and upload.loss == pytest.approx(grouped.loss, abs=1e-6)
        for name in (PROMPT, LOCAL):
            assert torch.allclose(upload.state.params[name], grouped.state.params[name], atol=1e-6), (cid, name)


def test_end_to_end_run_keeps_private_local_prompts_and_averages_the_global_one(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=promptfolio", "fed.rounds=2", "optim.prompt_lr=0.05")
    [res] = run_experiment(cfg)
    run_dir = only_run_dir(tmp_path)
    assert read_results(run_dir)["final"] == res["final"]
    last = res["rounds"][-1]
    assert len(last["accuracy"]) == 4 and all(0.0 <= a <= 1.0 for a in last["accuracy"])
    assert last["acc_global"] is not None
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    sizes = json.loads((run_dir / "partition.json").read_text())["train_sizes"]
    store = ckpt["store"]
    assert sorted(store) == [0, 1, 2, 3] and all(e["last_round"] == 2 for e in store.values())
    uploads = [store[c]["state"][PROMPT] for c in range(4)]
    global_ctx = ckpt["server"]["global_state"]["ctx"]
    assert torch.equal(global_ctx, fedavg([{"ctx": u} for u in uploads], sizes)["ctx"])
    direct = sum(n * u.double() for n, u in zip(sizes, uploads)) / sum(sizes)
    assert torch.allclose(global_ctx.double(), direct, atol=1e-7)
    locals_ = [store[c]["state"][LOCAL] for c in range(4)]
    assert all(not torch.equal(locals_[i], locals_[j]) for i in range(4) for j in range(i + 1, 4))
