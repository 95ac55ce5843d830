"""DP-FPL: the public code's factorisation, forward and local-prompt gradient re-implemented verbatim and compared
with fedlit's, the global and personalised models, batched clients, and its configuration errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlit import privacy
from fedlit.algorithms import build_algorithm
from fedlit.algorithms.dpfpl import factor_generator
from fedlit.config import ConfigError, load_config
from fedlit.modules.dpfpl import LOCAL, DPFPLClient, factorize_context
from fedlit.state import PROMPT, ClientState, ServerState, StoreEntry, SyncStep
from tests.helpers import fast_config, train_cli
from tests.method_checks import assert_groups_match_single


# -- the public code (linhhtran/DP-FPL, trainers/DP_FPL.py), verbatim but for the draw passed in -----------------------
def public_orthogonalize(matrix):
    m = matrix.shape[1]
    for i in range(m):
        col = matrix[:, i : i + 1]
        col /= torch.sqrt(torch.sum(col ** 2))
        if i + 1 < m:
            rest = matrix[:, i + 1 :]
            rest -= torch.sum(col * rest, dim=0) * col


def public_factorize_ctx(origin, rank, draw):
    with torch.no_grad():
        v = draw.clone()  # torch.normal(0, 1, size=(origin.shape[1], rank)) in the public code
        u = torch.matmul(origin, v)
        public_orthogonalize(u)
        v = torch.matmul(origin.t(), u)
        public_orthogonalize(v)
        v = v.t()
        residual = origin - torch.matmul(u, v)
    return (u, v, residual)


def public_compute_full_grad(left, right, dtype):
    left_w, left_g = left.data.type(dtype), left.grad.type(dtype) / 10.0
    right_w, right_g = right.data.type(dtype), right.grad.type(dtype) / 10.0
    left_g_right_w = torch.matmul(left_g, right_w)
    m1 = left_g_right_w + torch.matmul(left_w, right_g)
    m2 = torch.matmul(left_w, torch.matmul(left_w.T, left_g_right_w))
    return m1 + m2


def public_clip(param, thresh):
    grad = param.grad.data
    norm = grad.norm(2)
    if norm > thresh:
        param.grad *= thresh / norm
# ------------------------------------------------------------------------------------------------------------------


def _setup(tiny_backbone, classnames, *overrides):
    cfg = load_config(None, ["algorithm=dpfpl", "prompt.n_ctx=6", "method.dpfpl_rank=3", *overrides])
    algorithm = build_algorithm(cfg)
    algorithm.bind_steps(4)
    torch.manual_seed(0)
    module = DPFPLClient(tiny_backbone, classnames, prompt={"n_ctx": 6}, seed=0)
    with torch.no_grad():
        module.prompt_learner.ctx.add_(0.3 * torch.randn_like(module.prompt_learner.ctx))
        module.local_ctx.add_(0.5 * torch.randn_like(module.local_ctx))
    x = F.normalize(torch.randn(5, tiny_backbone.feature_dim), dim=-1)
    y = torch.tensor([0, 1, 2, 1, 0])
    return cfg, algorithm, module, x, y


def _draw(local, rank, seed, round_index, step, cid):
    return torch.randn((local.shape[-1], rank), generator=factor_generator(seed, round_index, step, cid))


def test_factorisation_is_the_public_codes(tiny_backbone, classnames):
    _, _, module, _, _ = _setup(tiny_backbone, classnames)
    local = module.local_ctx.detach()
    u, v, residual = factorize_context(local, 3, factor_generator(0, 1, 2, 3))
    pu, pv, presidual = public_factorize_ctx(local.clone(), 3, _draw(local, 3, 0, 1, 2, 3))
    for mine, theirs in ((u, pu), (v, pv), (residual, presidual)):
        assert torch.allclose(mine, theirs, atol=1e-6)
    assert torch.allclose(u.T @ u, torch.eye(3), atol=1e-5) and torch.allclose(v @ v.T, torch.eye(3), atol=1e-5)
    assert factorize_context(local, 50)[0].shape == (6, 6)  # the rank is capped at n_ctx


def test_forward_is_the_public_codes_global_plus_low_rank_plus_residual(tiny_backbone, classnames):
    _, _, module, x, _ = _setup(tiny_backbone, classnames)
    learner = module.prompt_learner
    u, v, residual = public_factorize_ctx(module.local_ctx.detach().clone(), 3, torch.randn(64, 3))
    public_ctx = learner.ctx + u @ v + residual
    with torch.no_grad():
        theirs = tiny_backbone.logit_scale * x @ learner.text_features(tiny_backbone, public_ctx).T
        assert torch.allclose(module(x), theirs, atol=1e-6 * float(tiny_backbone.logit_scale))


@pytest.mark.parametrize("dp", [False, True])
def test_local_prompt_gradient_is_the_public_codes_clipped_noised_factor_gradients(tiny_backbone, classnames, dp):
    extra = ["privacy.clip=0.05", "privacy.noise_multiplier=0.7"] if dp else []
    cfg, algorithm, module, x, y = _setup(tiny_backbone, classnames, *extra)
    learner = module.prompt_learner
    step = SyncStep(round=2, step=1, clients=(3,))
    # fedlit: autograd through ctx_g + ctx_l, then the algorithm's map of the local gradient
    F.cross_entropy(module(x), y).backward()
    mine = algorithm.private_gradients(3, {LOCAL: module.local_ctx.detach()}, {LOCAL: module.local_ctx.grad}, step)
    # the public code: u, v leaves of the same factorisation, clipped and noised, then compute_full_grad
    local = module.local_ctx.detach().clone()
    u, v, residual = public_factorize_ctx(local, 3, _draw(local, 3, 0, 2, 1, 3))
    u, v = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    global_ctx = learner.ctx.detach().clone().requires_grad_(True)
    features = learner.text_features(tiny_backbone, global_ctx + torch.matmul(u, v) + residual)
    F.cross_entropy(tiny_backbone.logit_scale * x @ features.T, y).backward()
    if dp:
        noise = torch.from_numpy(privacy.local_noise(u.numel() + v.numel(), 0.7 * 0.05, 0, 2, 3, step=1)).float()
        for param, part in ((u, noise[: u.numel()]), (v, noise[u.numel() :])):
            assert float(param.grad.norm()) > 0.05  # the clip bites
            public_clip(param, 0.05)
            param.grad += part.reshape(param.shape)
    theirs = public_compute_full_grad(u, v, torch.float32)
    assert torch.allclose(mine[LOCAL], theirs, atol=1e-6 * float(theirs.abs().max()))
    assert torch.allclose(learner.ctx.grad, global_ctx.grad, atol=1e-6 * float(global_ctx.grad.abs().max()))


def test_personalised_model_is_the_global_prompt_plus_the_own_local_prompt(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=dpfpl")
    algorithm = build_algorithm(cfg)
    initial = ClientState({PROMPT: torch.zeros(4, 64), LOCAL: torch.full((4, 64), 0.1)})
    server = ServerState(global_state={"ctx": torch.ones(4, 64)})
    own = ClientState({PROMPT: torch.full((4, 64), 5.0), LOCAL: torch.full((4, 64), 0.2)})
    plan = algorithm.eval_plan(server, 1, StoreEntry(own), initial)
    assert torch.equal(plan.start.params[PROMPT], torch.ones(4, 64))
    assert torch.equal(plan.start.params[LOCAL], torch.full((4, 64), 0.2))
    glob = algorithm.global_plan(server, initial).start.params
    assert torch.equal(glob[PROMPT], torch.ones(4, 64)) and torch.equal(glob[LOCAL], torch.zeros(4, 64))
    assert algorithm.synchronous and algorithm.shared_parameters() == (PROMPT,)


def test_groups_match_single_clients(tmp_path):
    assert_groups_match_single(tmp_path, "dpfpl", [PROMPT, LOCAL])


def test_bad_dpfpl_settings_are_one_line_before_anything_is_written(tmp_path):
    done = train_cli("algorithm=dpfpl", "method.dpfpl_rank=0", f"run.out_dir={tmp_path / 'out'}")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: method.dpfpl_rank must be >= 1 (got 0)"]
    assert not (tmp_path / "out").exists()
    for overrides, message in (
        (["method.dpfpl_rank=two"], "dpfpl_rank"),
        (["method.dpfpl_rank=1.5"], "dpfpl_rank"),
        (["algorithm=dpfpl", "robust.aggregator=median"], "robust.aggregator=median / robust.pre=none acts on round "
                                                          "uploads, but algorithm=dpfpl combines per-step"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, overrides)
    assert load_config(None, ["algorithm=promptfl", "robust.aggregator=median"]).robust.aggregator == "median"
    assert load_config(None, ["algorithm=dpfpl", "attack.kind=label_flip"]).attack.kind == "label_flip"


def test_noise_of_a_client_step_differs_across_steps_and_clients():
    draws = [privacy.local_noise(8, 1.0, 0, 1, c, step=s) for c, s in ((0, 0), (0, 1), (1, 0))]
    assert not np.allclose(draws[0], draws[1]) and not np.allclose(draws[0], draws[2])
    assert np.array_equal(draws[0], privacy.local_noise(8, 1.0, 0, 1, 0, step=0))
