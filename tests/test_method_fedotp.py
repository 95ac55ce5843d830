"""FedOTP: the unbalanced transport plan against a direct numpy Sinkhorn, OT logits, per-token image features,
patch caching in the client data, global-only aggregation and an end-to-end run."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from fedlit.backbone import Backbone, load_backbone
from fedlit.config import DataConfig, load_config
from fedlit.data.base import Preprocess
from fedlit.data.features import FeatureCache, feature_key
from fedlit.data.partition import partition_iid
from fedlit.data.shapes import build_shapes
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.client_data import build_client_data
from fedlit.federation.experiment import run_experiment
from fedlit.federation.sampling import client_generator
from fedlit.modules.fedotp import LOCAL, FedOTPClient, ot_logits, unbalanced_plan
from fedlit.pretrain import SHAPES_CLIP_PREPROCESS
from fedlit.state import PROMPT, ClientState, ServerState, Upload
from tests.helpers import fast_config, only_run_dir, read_results

CPU = torch.device("cpu")


def numpy_cot(kernel: np.ndarray, a: np.ndarray, b: np.ndarray, iters: int) -> np.ndarray:
    """FedOTP's entropic_COT_fast for one problem, written directly: u = min(a / K v, 1), v = b / K^T u."""
    u, v = np.ones_like(a), np.ones_like(b)
    for _ in range(iters):
        u = np.minimum(a / (kernel @ v), 1.0)
        v = b / (kernel.T @ u)
    return u[:, None] * kernel * v[None, :]


def _hand_made_sims() -> torch.Tensor:
    """Two problems of M = 4 patches x N = 2 prompts (cosines)."""
    return torch.tensor([[[0.9, 0.2], [0.8, 0.3], [0.1, 0.7], [0.0, 0.1]],
                         [[0.5, 0.5], [0.4, 0.6], [0.3, 0.2], [0.6, 0.1]]], dtype=torch.float64)


@pytest.mark.parametrize("top_percent", [0.8, 1.0])
def test_unbalanced_plan_has_the_prescribed_marginals_and_equals_numpy(top_percent):
    sim = _hand_made_sims()
    kernel = torch.exp(-(1 - sim) / 0.1)
    a = torch.full((2, 4), 0.25, dtype=torch.float64)
    b = torch.full((2, 2), top_percent / 2, dtype=torch.float64)
    plan = unbalanced_plan(kernel, a, b, max_iter=5000, thresh=0.0)
    for p in range(2):
        expected = numpy_cot(kernel[p].numpy(), a[p].numpy(), b[p].numpy(), 5000)
        np.testing.assert_allclose(plan[p].numpy(), expected, rtol=1e-12, atol=1e-15)
    columns, rows = plan.sum(-2), plan.sum(-1)
    assert torch.allclose(columns, b, atol=1e-5, rtol=0)  # each prompt receives exactly top_percent / N
    assert bool((rows <= a + 1e-5).all())  # no patch gives more than its mass 1/M
    assert abs(float(plan.sum(dim=(-1, -2))[0]) - top_percent) < 1e-5
    if top_percent == 1.0:  # total masses equal: the inequality is tight, every patch gives all its mass
        assert torch.allclose(rows, a, atol=1e-5, rtol=0)
    else:  # partial: the patch least similar to both prompts gives less than its mass
        assert float(rows[0, 3]) < 0.25 - 1e-3
        assert torch.allclose(rows[0, :3], a[0, :3], atol=1e-5, rtol=0)


def test_each_problem_stops_at_its_own_convergence_whatever_its_batch():
    sim = _hand_made_sims()
    kernel = torch.exp(-(1 - sim) / 0.01)
    a = torch.full((2, 4), 0.25, dtype=torch.float64)
    b = torch.full((2, 2), 0.4, dtype=torch.float64)
    together = unbalanced_plan(kernel, a, b, max_iter=100, thresh=1e-3)
    for p in range(2):
        alone = unbalanced_plan(kernel[p : p + 1], a[p : p + 1], b[p : p + 1], max_iter=100, thresh=1e-3)
        assert torch.equal(together[p], alone[0])
    assert torch.allclose(together.sum(-2), b, atol=1e-12)  # columns hold after every iteration


def test_ot_logits_are_the_scaled_transport_weighted_similarity_and_train_the_text_only():
    generator = torch.Generator().manual_seed(0)
    patches = F.normalize(torch.randn(3, 5, 8, generator=generator, dtype=torch.float64), dim=-1)  # B=3, M=5
    text = F.normalize(torch.randn(2, 4, 8, generator=generator, dtype=torch.float64), dim=-1).requires_grad_()
    logits = ot_logits(patches, text, 10.0, eps=0.1, top_percent=0.8, max_iter=3000, thresh=0.0)
    assert logits.shape == (3, 4)
    for i in range(3):
        for c in range(4):
            sim = (patches[i] @ text[:, c].detach().T).numpy()  # (M, N)
            plan = numpy_cot(np.exp(-(1 - sim) / 0.1), np.full(5, 0.2), np.full(2, 0.4), 3000)
            assert abs(float(logits[i, c].detach()) - 10.0 * float((plan * sim).sum())) < 1e-10
    logits.sum().backward()  # the plan is a constant: d logit / d text = s * sum_m T_mn patch_m
    sim = torch.einsum("bmd,ncd->bcmn", patches, text.detach())
    plan = unbalanced_plan(torch.exp(-(1 - sim) / 0.1), torch.full(sim.shape[:-1], 0.2, dtype=torch.float64),
                           torch.full((*sim.shape[:-2], 2), 0.4, dtype=torch.float64), 3000, 0.0)
    expected = 10.0 * torch.einsum("bcmn,bmd->ncd", plan, patches)
    assert torch.allclose(text.grad, expected, atol=1e-10)


def test_patch_features_of_the_tiny_vit_are_open_clips_own_tokens_projected():
    backbone = load_backbone("tiny")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = backbone.encode_image_patches(images)
    assert tokens.shape == (3, 1 + (32 // 8) ** 2, 64)  # pooled token + 16 patches, D = 64
    visual = backbone.model.visual
    visual.output_tokens = True
    try:
        pooled, patches = visual(images)  # open_clip: tokens after ln_post, before proj
    finally:
        visual.output_tokens = False
    assert torch.allclose(tokens[:, 1:], F.normalize(patches @ visual.proj, dim=-1), atol=1e-6)
    assert torch.allclose(tokens[:, 0], backbone.encode_image(images), atol=1e-6)
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(3, 17), atol=1e-5)


def test_patch_features_of_a_modified_resnet_are_the_attention_pool_at_every_position():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(embed_dim=32, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, image_size=64,
                                                             head_width=32), text_cfg=dict(width=32, heads=2, layers=1))
    preprocess = Preprocess(64, (0.0,) * 3, (1.0,) * 3)
    backbone = Backbone(model, open_clip.get_tokenizer("RN50"), "rn-test", "rn-test", preprocess)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    tokens = backbone.encode_image_patches(images)
    assert tokens.shape == (2, 1 + 2 * 2, 32)  # mean query + a 2 x 2 grid
    assert torch.allclose(tokens[:, 0], backbone.encode_image(images), atol=1e-6)  # open_clip's pool is query 0
    visual = model.visual  # each grid cell as a query of the pool's multi-head attention, written out by hand
    pool = visual.attnpool
    grid = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images))))).flatten(2).transpose(1, 2)
    x = torch.cat([grid.mean(1, keepdim=True), grid], dim=1) + pool.positional_embedding  # (B, 5, C)
    heads = pool.num_heads
    q, k, v = (proj(x).unflatten(-1, (heads, -1)).transpose(1, 2) for proj in (pool.q_proj, pool.k_proj, pool.v_proj))
    attention = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    expected = pool.c_proj((attention @ v).transpose(1, 2).flatten(2))
    assert torch.allclose(tokens, F.normalize(expected, dim=-1), atol=1e-5)


@pytest.fixture(scope="module")
def shapes_data():
    bundle = build_shapes(DataConfig(train_per_class=2, test_per_class=1), SHAPES_CLIP_PREPROCESS)
    return bundle, partition_iid(bundle.train.targets, bundle.test.targets, 2, seed=0)


def test_client_data_caches_patches_under_their_own_key_and_serves_each_module_its_kind(shapes_data):
    bundle, part = shapes_data
    backbone = load_backbone("tiny")
    cfg = load_config(None, ["backbone.name=tiny", "algorithm=promptfl"])
    cache = FeatureCache(None)
    data = build_client_data(cfg, backbone, bundle, part, CPU, cache, kinds=["pooled", "patches"])
    assert data.feature_kind == "pooled" and data.train_features.shape == (64, 64)
    assert data.train_patches.shape == (64, 17, 64) and data.test_patches.shape == (32, 17, 64)
    assert torch.allclose(data.train_patches[:, 0], data.train_features, atol=1e-6)
    assert feature_key(backbone, bundle.name, "train", bundle.transform_id, 64) != \
        feature_key(backbone, bundle.name, "train", bundle.transform_id, 64, kind="patches")
    module = FedOTPClient(backbone, bundle.classnames, seed=0)
    served = data.for_module(module)
    x, _ = next(served.train_batches(0, client_generator(0, 1, 0), CPU))
    assert x.shape == (32, 17, 64) and served.test_inputs().shape == (32, 17, 64)
    assert data.for_module(torch.nn.Module()).test_inputs().shape == (32, 64)  # no attribute: pooled
    assert data.cached_bytes() == 4 * 64 * (64 + 32)  # the memory report counts what each view serves
    assert served.cached_bytes() == 4 * 17 * 64 * (64 + 32)
    pooled_only = build_client_data(cfg, backbone, bundle, part, CPU, cache)  # promptfl's module: pooled only
    assert pooled_only.train_patches is None and pooled_only.feature_kind == "pooled"
    with pytest.raises(ValueError, match="no cached patches"):
        pooled_only.for_module(module)


def test_fedotp_client_keeps_two_prompts_and_trains_both(shapes_data):
    bundle, _ = shapes_data
    backbone = load_backbone("tiny")
    module = FedOTPClient(backbone, bundle.classnames[:4], seed=0)
    assert set(module.trainable_parameters()) == {PROMPT, LOCAL}
    assert not torch.equal(module.prompt_learner.ctx, module.local_ctx)  # independent random draws
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    logits = module(images)
    assert logits.shape == (6, 4) and bool(torch.isfinite(logits).all())
    tokens = backbone.encode_image_patches(images)
    assert torch.allclose(module(tokens), logits, atol=1e-5)
    module.loss(logits, torch.arange(6) % 4).backward()
    assert module.prompt_learner.ctx.grad.abs().sum() > 0 and module.local_ctx.grad.abs().sum() > 0
    params = {PROMPT: torch.stack([module.prompt_learner.ctx.detach()] * 2),
              LOCAL: torch.stack([module.local_ctx.detach()] * 2)}
    group = module.group_logits(params, torch.stack([tokens, tokens]), {})
    assert torch.allclose(group[0], logits.detach(), atol=1e-5) and torch.allclose(group[1], group[0])


@pytest.fixture
def fedotp_algorithm():
    """The registered algorithm (fedlit/algorithms/fedotp.py)."""
    return pytest.importorskip("fedlit.algorithms.fedotp").FedOTP


def test_aggregation_averages_only_the_global_prompt(tmp_path, fedotp_algorithm):
    algorithm = fedotp_algorithm(fast_config(tmp_path, "algorithm=fedotp"))
    server = ServerState(global_state={"ctx": torch.zeros(2, 3)})
    uploads = {c: Upload(ClientState({PROMPT: torch.full((2, 3), float(c)), LOCAL: torch.full((2, 3), 10.0 + c)}),
                         loss=0.0, steps=1) for c in (1, 4)}
    new = algorithm.aggregate(server, uploads, {1: 1, 4: 3})
    assert set(new.global_state) == {"ctx"} and new.round == 1
    assert torch.allclose(new.global_state["ctx"], torch.full((2, 3), (1 * 1 + 4 * 3) / 4))
    initial = ClientState({PROMPT: torch.zeros(2, 3), LOCAL: torch.full((2, 3), -1.0)})
    plan = algorithm.plan(new, 4, None, initial)
    assert torch.equal(plan.start.params[PROMPT], new.global_state["ctx"])
    assert torch.equal(plan.start.params[LOCAL], initial.params[LOCAL])  # the local prompt never left the client
    assert algorithm.global_plan(new, initial) is None


def test_fedotp_runs_end_to_end_with_private_local_prompts(tmp_path, fedotp_algorithm):
    [res] = run_experiment(fast_config(tmp_path, "algorithm=fedotp", "fed.rounds=2"))
    assert res["algorithm"] == "fedotp"
    assert read_results(only_run_dir(tmp_path))["final"] == res["final"]
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    accuracies = res["rounds"][-1]["accuracy"]
    assert len(accuracies) == 4 and all(0.0 <= a <= 1.0 for a in accuracies)
    ckpt = load_checkpoint(only_run_dir(tmp_path) / "checkpoint.pt")
    assert set(ckpt["server"]["global_state"]) == {"ctx"}  # the local prompts are never aggregated
    store = ckpt["store"]
    local = [store[c]["state"][LOCAL] for c in sorted(store)]
    assert len(local) == 4 and not torch.equal(local[0], local[1])  # each client trained its own local prompt
    assert all(entry["last_round"] == 2 for entry in store.values())
