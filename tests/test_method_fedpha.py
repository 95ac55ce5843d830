"""FedPHA: the projection onto the global prompt's kept singular directions, the pull / push terms, the forward and
loss against a re-implementation of the public code (CYFang6/FedPHA ``trainers/GL_SVDMSE_HE.py``), per-client
lengths, FedAvg of the global prompt only with private local prompts, and an end-to-end run."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedlit.algorithms import build_algorithm
from fedlit.algorithms.fedpha import client_lengths
from fedlit.config import load_config
from fedlit.errors import UserError
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.modules.fedpha import LENGTH, LOCAL, FedPHAClient, kept_directions, project_local, pull_push_loss
from fedlit.state import PROMPT, ClientState, StoreEntry, Upload
from tests.helpers import only_run_dir
from tests.method_checks import assert_groups_match_single, assert_run_averages_the_prompt_and_keeps_private
from tests.test_batched import make_orchestrator, next_round, round_plans, train


# -- the public code, re-implemented on an open_clip model (batch-first text tower) -----------------------------------
def public_text_encoder(model, prompts, tokenized, read):
    """``TextEncoder.forward``: positional embedding, causal transformer, ln_final, the row at ``read`` (the public
    code reads ``tokenized_prompts.argmax(-1)``), text projection."""
    x = prompts + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), read]
    proj = model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def public_pad_to_77(prompts, length):
    if prompts.shape[1] < length:
        pad = torch.zeros(prompts.size(0), length - prompts.shape[1], prompts.size(2), dtype=prompts.dtype)
        prompts = torch.cat([prompts, pad], dim=1)
    return prompts[:, :length]


def public_forward(backbone, classnames, ctx_global, ctx_local_list, idx, ratio, image_features, own_eot=False):
    """``PromptLearner`` + ``CustomCLIP.forward`` in training mode: ``(logits, T_g, T_l, T_p, logits_global)``.
    ``own_eot`` reads each prompt at its own end token instead of the longest prompt's (the public code's)."""
    model = backbone.model
    context = model.positional_embedding.shape[0]
    n_global = ctx_global.shape[0]
    max_len = max(n_global, max(c.shape[0] for c in ctx_local_list))
    prefix_text = " ".join(["X"] * max_len)
    names = [name.replace("_", " ") for name in classnames]
    tokenized = backbone.tokenize([prefix_text + " " + name + "." for name in names])
    with torch.no_grad():
        embedding = model.token_embedding(tokenized)
    token_prefix, token_suffix = embedding[:, :1, :], embedding[:, 1 + max_len :, :]
    # compute_null_space
    _, s, v = torch.svd(ctx_global.view(-1, ctx_global.shape[-1]).to(torch.float32))
    cutoff = int(s.shape[0] * (1 - ratio))
    null_space = v[:, cutoff:]
    ctx_local = ctx_local_list[idx]
    projected = torch.mm(ctx_local.view(-1, ctx_local.shape[-1]), torch.mm(null_space, null_space.T))
    n_cls = len(classnames)

    def build(ctx):
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
        return public_pad_to_77(torch.cat([token_prefix, ctx, token_suffix], dim=1), context)

    def encode(ctx):
        read = tokenized.argmax(dim=-1) - ((max_len - ctx.shape[0]) if own_eot else 0)
        features = public_text_encoder(model, build(ctx), tokenized, read)
        return features / features.norm(dim=-1, keepdim=True)

    scale = model.logit_scale.exp()
    t_local, t_global, t_projected = encode(ctx_local), encode(ctx_global), encode(projected)
    logits = scale * image_features @ t_local.t()
    logits_global = scale * image_features @ t_global.t()
    return logits, t_global, t_local, t_projected, logits_global


def public_loss(outputs, labels, alpha):
    """``GL_SVDMSE_HE.forward_backward``'s loss."""
    output, global_features, local_features, projected_local_features, output_global = outputs
    pull_loss = F.mse_loss(local_features, projected_local_features)
    push_loss = F.relu(alpha - torch.norm(local_features - global_features, dim=-1)).mean()
    loss = F.cross_entropy(output, labels)
    loss += F.cross_entropy(output_global, labels)
    loss += pull_loss + push_loss
    return loss


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    """``max |a - b| <= tol * max(1, max |b|)``: fp32 agreement relative to the tensor's scale (logits are ~15)."""
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


def _module(backbone, classnames, n_ctx, length, rows=None, **kwargs):
    return FedPHAClient(backbone, classnames, local_length=length, max_local_length=rows, ratio=0.8, alpha=1.0,
                        prompt={"n_ctx": n_ctx}, seed=0, **kwargs)


def _batch(backbone):
    generator = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(6, backbone.feature_dim, generator=generator), dim=-1)
    return image, torch.tensor([0, 1, 2, 0, 1, 2])


# -- the distinctive math -------------------------------------------------------------------------------------------
def test_kept_directions_drop_the_leading_singular_vectors_as_the_public_code_counts_them():
    generator = torch.Generator().manual_seed(0)
    global_ctx = torch.randn(16, 40, generator=generator)
    v2 = kept_directions(global_ctx, 0.8)
    assert v2.shape == (40, 13)  # cutoff = int(16 * (1 - 0.8)) = int(3.1999...) = 3
    _, s, v = torch.svd(global_ctx)
    assert torch.allclose(v2 @ v2.T, v[:, 3:] @ v[:, 3:].T, atol=1e-6)
    assert kept_directions(global_ctx, 1.0).shape == (40, 16) and kept_directions(global_ctx, 0.0).shape == (40, 0)
    local = torch.randn(5, 40, generator=generator)
    projected = project_local(local, global_ctx, 0.8)
    assert torch.allclose(project_local(projected, global_ctx, 0.8), projected, atol=1e-5)  # a projection
    # what is left is orthogonal to the kept directions; with ratio 1 the global rows project onto themselves
    assert (local - projected) @ v2 == pytest.approx(torch.zeros(5, 13), abs=1e-5)
    assert torch.allclose(project_local(global_ctx, global_ctx, 1.0), global_ctx, atol=1e-5)
    assert torch.equal(project_local(local, global_ctx, 0.0), torch.zeros(5, 40))
    grouped = project_local(torch.stack([local, 2 * local]), torch.stack([global_ctx, global_ctx.flip(0)]), 0.8)
    assert torch.allclose(grouped[0], projected, atol=1e-6)  # G clients at once (a batched SVD)


def test_pull_push_loss_by_hand():
    local = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    glob = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # class 0 at distance sqrt(2), class 1 at 0
    projected = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
    # pull: mean of squares (0.25 + 0 + 0 + 0) / 4; push: (relu(1 - sqrt 2) + relu(1 - 0)) / 2
    expected = 0.25 / 4 + 0.5
    assert pull_push_loss(local, glob, projected, 1.0).item() == pytest.approx(expected, abs=1e-7)
    grouped = pull_push_loss(torch.stack([local, local]), torch.stack([glob, local]), torch.stack([projected, local]),
                             2.0)
    assert grouped.shape == (2,)
    assert grouped[0].item() == pytest.approx(0.25 / 4 + ((2 - 2**0.5) + 2) / 2, abs=1e-6)
    assert grouped[1].item() == pytest.approx(2.0, abs=1e-7)


def test_forward_and_loss_match_the_public_code_at_equal_lengths(tiny_backbone, classnames):
    module = _module(tiny_backbone, classnames, n_ctx=4, length=4)  # cut sequences, shared prefix (defaults)
    image, labels = _batch(tiny_backbone)
    module.train()
    logits = module(image)
    loss = module.loss(logits, labels)
    loss.backward()
    learner = module.prompt_learner
    with torch.no_grad():
        features = module.prompt_features(learner.ctx[None], module.local_ctx[None], [4])

    ctx_global = learner.ctx.detach().clone().requires_grad_(True)
    ctx_local = module.local_ctx.detach().clone().requires_grad_(True)
    outputs = public_forward(tiny_backbone, classnames, ctx_global, [ctx_local], 0, 0.8, image)
    reference = public_loss(outputs, labels, 1.0)
    reference.backward()
    for ours, theirs in zip(features, outputs[1:4]):  # T_g, T_l, T_p
        assert close(ours[0], theirs)
    assert close(logits[0], outputs[0]) and close(logits[1], outputs[4])
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)
    assert close(learner.ctx.grad, ctx_global.grad) and close(module.local_ctx.grad, ctx_local.grad)
    module.eval()  # test logits: the local prompt alone (CustomCLIP.forward outside training)
    assert close(module(image), outputs[0])


def test_different_lengths_read_each_prompt_at_its_own_end_token(tiny_backbone, classnames):
    # client 0 of a run whose lengths are [6, 8], global 4: the public code reads every prompt shorter than 8 at
    # the 8-token prompt's end position (a padding token); fedlit reads each at its own end token
    module = _module(tiny_backbone, classnames, n_ctx=4, length=6, rows=8, cut=False, share_prefix=False)
    assert module.local_ctx.shape == (8, tiny_backbone.text_width)
    assert torch.equal(module.local_ctx[6:], torch.zeros(2, tiny_backbone.text_width))
    image, labels = _batch(tiny_backbone)
    module.train()
    logits = module(image)
    loss = module.loss(logits, labels)
    ctx_global, ctx_local = module.prompt_learner.ctx.detach(), module.local_ctx.detach()
    other = torch.zeros(8, ctx_local.shape[1])
    own = public_forward(tiny_backbone, classnames, ctx_global, [ctx_local[:6], other], 0, 0.8, image, own_eot=True)
    assert close(logits[0], own[0]) and close(logits[1], own[4])
    assert loss.item() == pytest.approx(public_loss(own, labels, 1.0).item(), abs=1e-6)
    public = public_forward(tiny_backbone, classnames, ctx_global, [ctx_local[:6], other], 0, 0.8, image)
    assert (public[0] - own[0]).abs().max() > 1e-2  # the public read differs
    cut = _module(tiny_backbone, classnames, n_ctx=4, length=6, rows=8)  # cut + shared prefix: same numbers
    cut.load_client_state(module.client_state())
    cut.train()
    assert close(cut(image), logits)


def test_the_length_extra_selects_the_local_rows_and_zero_gives_the_global_prompt(tiny_backbone, classnames):
    module = _module(tiny_backbone, classnames, n_ctx=4, length=8, rows=8)
    module.eval()
    image, _ = _batch(tiny_backbone)
    module.set_extras({LENGTH: 3})
    assert module.client_extras()[LENGTH].item() == 3
    expected = module.encode_contexts([module.local_ctx[:3]])[0]
    assert torch.equal(module.class_text_features(), expected)
    module.set_extras({LENGTH: 0})
    glob = module.class_text_features()
    assert torch.allclose(glob, module.prompt_learner.text_features(tiny_backbone), atol=1e-6)
    assert torch.allclose(module(image), tiny_backbone.logit_scale * image @ glob.T, atol=1e-6)
    module.set_extras({})
    assert module.local_length == 8
    with pytest.raises(ValueError, match="pha_length"):
        module.set_extras({LENGTH: 9})
    module.train()
    module.set_extras({LENGTH: 0})
    with pytest.raises(ValueError, match="length 0"):
        module(image)
    assert set(module.trainable_parameters()) == {PROMPT, LOCAL}
    [group] = module.param_groups()
    assert group["schedule"] == "cosine" and len(group["params"]) == 2


def test_module_trains_in_a_lightning_trainer(tiny_backbone, classnames):
    module = _module(tiny_backbone, classnames, n_ctx=4, length=4, rows=6)
    before = module.client_state()
    image, labels = _batch(tiny_backbone)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(image, labels), batch_size=3))
    after = module.client_state()
    assert not torch.equal(before[PROMPT], after[PROMPT]) and not torch.equal(before[LOCAL][:4], after[LOCAL][:4])
    assert torch.equal(after[LOCAL][4:], torch.zeros(2, tiny_backbone.text_width))  # unused rows stay zero


def test_prompt_settings_the_public_code_cannot_run_are_refused(tiny_backbone, classnames):
    for prompt in ({"ctx_init": "a photo of a"}, {"class_specific": True}, {"class_position": "front"}):
        with pytest.raises(UserError, match="fedpha"):
            FedPHAClient(tiny_backbone, classnames, prompt=prompt)


# -- server rules -----------------------------------------------------------------------------------------------------
def test_client_lengths_are_contiguous_blocks():
    assert client_lengths([16, 32], 100) == [16] * 50 + [32] * 50  # FedPHA's cifar10/cifar100 configs
    assert client_lengths([16, 16, 16, 32, 32, 16], 6) == [16, 16, 16, 32, 32, 16]  # Office31, one per client
    assert client_lengths([4, 8, 16], 4) == [4, 4, 8, 16]


def _algorithm(tmp_path, *overrides):
    return build_algorithm(load_config(None, [f"run.out_dir={tmp_path}", "algorithm=fedpha", "data.num_clients=4",
                                              "method.pha_lengths=[2,3]", *overrides]))


def _state(ctx: float, local: float) -> ClientState:
    return ClientState({PROMPT: torch.full((2, 4), ctx), LOCAL: torch.full((3, 4), local)})


def test_aggregation_averages_only_the_global_prompt_and_local_prompts_stay_private(tmp_path):
    algorithm = _algorithm(tmp_path)
    assert algorithm.lengths == [2, 2, 3, 3]
    initial = _state(0.0, -1.0)
    server = algorithm.init_server(initial)
    uploads = {0: Upload(_state(1.0, 10.0), loss=0.0, steps=1), 2: Upload(_state(5.0, 20.0), loss=0.0, steps=1)}
    new = algorithm.aggregate(server, uploads, {0: 1, 2: 3})
    assert set(new.global_state) == {"ctx"} and new.round == 1
    assert torch.equal(new.global_state["ctx"], torch.full((2, 4), 4.0))  # (1 * 1 + 3 * 5) / 4
    store = {c: StoreEntry(u.state, last_round=1) for c, u in uploads.items()}
    for cid, local in ((0, 10.0), (2, 20.0)):
        for plan in (algorithm.plan(new, cid, store[cid], initial), algorithm.eval_plan(new, cid, store[cid], initial)):
            assert torch.equal(plan.start.params[PROMPT], torch.full((2, 4), 4.0))
            assert torch.equal(plan.start.params[LOCAL], torch.full((3, 4), local))
            assert plan.extras == {LENGTH: algorithm.lengths[cid]}
    for plan in (algorithm.eval_plan(new, 1, None, initial), algorithm.global_plan(new, initial)):
        assert plan.extras == {LENGTH: 0} and torch.equal(plan.start.params[PROMPT], torch.full((2, 4), 4.0))
    assert torch.equal(uploads[0].state.params[PROMPT], torch.full((2, 4), 1.0))  # uploads are not modified


def test_first_local_prompts_are_seeded_per_client_with_zero_rows_past_the_length(tmp_path):
    algorithm = _algorithm(tmp_path, "prompt.init_std=0.5")
    initial = _state(0.0, -1.0)
    server = algorithm.init_server(initial)
    first = {c: algorithm.plan(server, c, None, initial).start.params[LOCAL] for c in range(4)}
    again = _algorithm(tmp_path, "prompt.init_std=0.5").plan(server, 1, None, initial).start.params[LOCAL]
    assert torch.equal(first[1], again)
    assert all(not torch.equal(first[i], first[j]) for i in range(4) for j in range(i + 1, 4))
    assert torch.equal(first[0][2:], torch.zeros(1, 4)) and (first[0][:2] != 0).all() and (first[2] != 0).all()
    other_seed = _algorithm(tmp_path, "prompt.init_std=0.5", "seed=1").plan(server, 1, None, initial)
    assert not torch.equal(other_seed.start.params[LOCAL], first[1])
    assert torch.equal(initial.params[LOCAL], torch.full((3, 4), -1.0))  # the initial state is not modified


@pytest.mark.parametrize("overrides, key", [
    (["method.pha_lengths=[]"], "pha_lengths"),
    (["method.pha_lengths=[16,0]"], "pha_lengths"),
    (["method.pha_lengths=[1,2,3,4,5]"], "pha_lengths"),
    (["method.pha_ratio=1.5"], "pha_ratio"),
    (["method.pha_alpha=-1"], "pha_alpha"),
    (["prompt.ctx_init=a photo of a"], "fedpha"),
    (["prompt.class_position=front"], "fedpha"),
])
def test_bad_settings_are_user_errors(tmp_path, overrides, key):
    with pytest.raises(UserError, match=key):  # refused by config validation, before anything is built
        load_config(None, [f"run.out_dir={tmp_path}", "algorithm=fedpha", "data.num_clients=4", *overrides])


# -- the federated loop ---------------------------------------------------------------------------------------------
def test_grouped_training_matches_one_client_at_a_time(tmp_path):
    # FAST's 4 clients have lengths 16, 16, 32, 32: one group mixes both lengths
    assert_groups_match_single(tmp_path, "fedpha", [PROMPT, LOCAL])


def test_groups_of_unequal_clients_and_lengths_match_sequential_training(tmp_path):
    # lengths 2, 3, 5, 8 (one per client) and unequal step counts: groups pad, mask finished clients and mix lengths.
    # The SVD's backward scales gradients by 1 / (s_i^2 - s_j^2), large at the 0.02-scale init, so fp32 rounding of
    # batched matmuls reaches the prompts at about 1e-6 of their scale (seen: up to 1e-6 at lr 0.05): checked at 2e-6.
    orch = make_orchestrator(tmp_path, "algorithm=fedpha", "method.pha_lengths=[2,3,5,8]")
    steps = [-(-orch.data.train_size(c) // 16) * 2 for c in range(orch.num_clients)]
    assert len(set(steps)) > 1
    server, store = orch.algorithm.init_server(orch.initial), {}
    for r in (1, 2):
        plans = round_plans(orch, server, store)
        sequential = train(orch, plans, r, 1)
        for size in (2, 4):
            grouped = train(orch, plans, r, size)
            for cid, upload in sequential.items():
                assert upload.steps == grouped[cid].steps == steps[cid]
                assert upload.loss == pytest.approx(grouped[cid].loss, abs=1e-6)
                for name in (PROMPT, LOCAL):
                    assert close(grouped[cid].state.params[name], upload.state.params[name], 2e-6), (r, cid, name)
        for cid, length in enumerate([2, 3, 5, 8]):
            local = sequential[cid].state.params[LOCAL]
            assert (local[:length] - plans[cid].start.params[LOCAL][:length]).abs().max() > 1e-3  # trained
            assert torch.equal(local[length:], torch.zeros_like(local[length:]))
        server, store = next_round(orch, server, sequential)


def test_end_to_end_run_keeps_private_local_prompts_and_averages_the_global_one(tmp_path):
    assert_run_averages_the_prompt_and_keeps_private(tmp_path, "fedpha", [LOCAL])
    run_dir = only_run_dir(tmp_path)
    store = load_checkpoint(run_dir / "checkpoint.pt")["store"]
    width = store[0]["state"][LOCAL].shape[1]
    assert json.loads((run_dir / "partition.json").read_text())["train_sizes"]
    for cid, length in enumerate([16, 16, 32, 32]):
        local = store[cid]["state"][LOCAL]
        assert local.shape == (32, width) and (local[:length] != 0).any()
        assert torch.equal(local[length:], torch.zeros(32 - length, width))  # never read, never trained
