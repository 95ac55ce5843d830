"""FedMGP: the groups' divergence, the similarity-sampled upload (probabilities and the seeded draw) and the
multi-group logits and loss, each against a re-implementation of the public code (weihao-bo/FedMGP:
trainers/fedmgp.py, federated_core/trainers/fedmgp_learner.py); the server's rank-wise averaging and write-back;
batched clients; an end-to-end run."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlit.algorithms.base import client_rng
from fedlit.algorithms.fedmgp import (
    SELECTION_PURPOSE,
    group_similarities,
    sample_groups,
    upload_probabilities,
)
from fedlit.modules.fedmgp import group_divergence


def _public_divergent_loss(features_list: list[torch.Tensor], loss_type: str = "l1") -> torch.Tensor:
    """The public ``CustomCLIP._compute_divergent_loss``: per row (class or image), the mean over pairs i < j of the
    pair loss, averaged over rows."""
    num_prompts, rows = len(features_list), features_list[0].shape[0]
    total = torch.zeros((), dtype=features_list[0].dtype)
    for r in range(rows):
        sample_loss, pairs = torch.zeros((), dtype=total.dtype), 0
        for i in range(num_prompts):
            for j in range(i + 1, num_prompts):
                fi, fj = features_list[i][r], features_list[j][r]
                if loss_type == "l1":
                    pair = -torch.abs(fi - fj).mean()
                else:
                    pair = 1.0 - F.cosine_similarity(fi.unsqueeze(0), fj.unsqueeze(0), dim=1)[0]
                sample_loss, pairs = sample_loss + pair, pairs + 1
        total = total + sample_loss / pairs
    return total / rows


def _unit(*shape, seed=0, dtype=torch.float64):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("groups", [2, 3, 5])
def test_divergence_is_the_public_l1_divergent_loss_without_its_sign(dtype, tol, groups):
    features = _unit(groups, 7, 16, seed=groups, dtype=dtype)  # (M, rows, D)
    expected = -_public_divergent_loss(list(features))
    got = group_divergence(features)
    assert got.dim() == 0 and got.item() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)
    # leading dimensions (G clients) are independent
    stacked = group_divergence(torch.stack([features, features.flip(-1).contiguous()]))
    torch.testing.assert_close(stacked[0], expected, rtol=0, atol=tol)
    torch.testing.assert_close(stacked[1], -_public_divergent_loss(list(features.flip(-1))), rtol=0, atol=tol)


def test_divergence_of_one_group_is_zero_and_of_two_by_hand():
    assert group_divergence(torch.ones(1, 3, 4)).item() == 0.0
    a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)  # M = 2, one row, D = 2
    assert group_divergence(a).item() == 1.0  # mean(|1 - 0|, |0 - 1|)


def _public_similarities(client_prompt: torch.Tensor, global_prompts: list[torch.Tensor]) -> list[tuple]:
    """The public ``_compute_prompt_similarities`` (in float64): per group, the max cosine over the globals."""
    out = []
    for i in range(client_prompt.size(0)):
        prompt_i = client_prompt[i].reshape(-1)
        sims = []
        for g in global_prompts:
            vec = g.reshape(-1)
            ni, ng = torch.norm(prompt_i), torch.norm(vec)
            sims.append((torch.dot(prompt_i, vec) / (ni * ng)).item() if ni > 0 and ng > 0 else 0.0)
        out.append((i, max(sims)))
    return out


def _public_selection(similarities: list[tuple], topk: int, temperature: float, rng) -> list[int]:
    """The public ``_probabilistic_prompt_selection`` (highest similarity favoured) with ``torch.multinomial(p, 1)``
    replaced by the same inverse-CDF draw from ``rng``'s uniforms."""
    sim_values = torch.tensor([s for _, s in similarities], dtype=torch.float64)
    probs = torch.softmax(sim_values / temperature, dim=0)
    selected, remaining = [], list(range(len(similarities)))
    for _ in range(min(topk, len(similarities))):
        curr = probs[remaining] / probs[remaining].sum()
        u = rng.random()
        idx = next((k for k, c in enumerate(torch.cumsum(curr, 0).tolist()) if c > u), len(remaining) - 1)
        selected.append(remaining.pop(idx))
    return selected


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_upload_probabilities_and_draw_are_the_public_selection(temperature):
    g = torch.Generator().manual_seed(3)
    groups = torch.randn(5, 2, 8, generator=g, dtype=torch.float64)  # M = 5 groups of (n = 2, W = 8)
    globals_ = torch.randn(2, 2, 8, generator=g, dtype=torch.float64)  # s = 2 global prompts
    groups[3] = globals_[1] * 2.0  # cosine 1 with a global: the most likely group
    groups[4] = 0.0  # zero norm: similarity 0
    public = _public_similarities(groups, list(globals_))
    sims = group_similarities(groups, globals_)
    torch.testing.assert_close(sims, torch.tensor([s for _, s in public], dtype=torch.float64), rtol=0, atol=1e-12)
    assert sims[3].item() == pytest.approx(1.0, abs=1e-12) and sims[4].item() == 0.0
    probs = upload_probabilities(groups, globals_, temperature)
    torch.testing.assert_close(probs, torch.softmax(sims / temperature, 0), rtol=0, atol=1e-12)
    for cid, rnd in itertools.product(range(6), range(1, 4)):
        ours = sample_groups(probs, 2, client_rng(0, rnd, cid, SELECTION_PURPOSE))
        theirs = _public_selection(public, 2, temperature, client_rng(0, rnd, cid, SELECTION_PURPOSE))
        assert ours == theirs and len(set(ours)) == 2


def test_first_round_upload_is_uniform_and_the_draw_follows_the_distribution():
    groups = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(upload_probabilities(groups, None, 1.0), torch.full((4,), 0.25, dtype=torch.float64))
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    draws = 20000
    counts: dict[tuple, int] = {}
    for cid in range(draws):
        pair = tuple(sample_groups(probs, 2, client_rng(7, 1, cid, SELECTION_PURPOSE)))
        counts[pair] = counts.get(pair, 0) + 1
    p = probs.tolist()
    for (i, j), n in counts.items():
        exact = p[i] * p[j] / (1 - p[i])  # ordered draw without replacement
        sigma = (exact * (1 - exact) / draws) ** 0.5
        assert abs(n / draws - exact) < 5 * sigma, (i, j)
    assert len(counts) == 12  # every ordered pair of distinct groups occurs; none repeats a group
    # the draw is a function of (seed, round, client) only
    assert sample_groups(probs, 3, client_rng(1, 2, 3, SELECTION_PURPOSE)) == \
        sample_groups(probs, 3, np.random.default_rng([1, 2, 3, SELECTION_PURPOSE]))


# -- the client model against the public CustomCLIP forward ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny64():
    """The tiny ViT CLIP in float64, apart from the session's float32 one (a module converts it in place)."""
    from fedlit.backbone import load_backbone

    torch.manual_seed(0)
    return load_backbone("tiny")


def _public_forward(model, tokenized, prefix, suffix, ctx, vpt, images, labels, weight):
    """The public ``CustomCLIP.forward`` in training mode with ``USE_DIVERGENT_LOSS`` and type ``l1``: per group,
    CoOp's prompt through ``TextEncoder`` and ``VisionTransformer.forward(image, prompt_idx=i)`` (``VPT[i]`` appended
    after the positional embedding, before ``ln_pre``); returns (total_loss, avg_logits)."""
    text_list, image_list = [], []
    for i in range(ctx.shape[0]):
        prompts = torch.cat([prefix, ctx[i].unsqueeze(0).expand(prefix.shape[0], -1, -1), suffix], dim=1)
        x = prompts + model.positional_embedding
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        t = x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection
        text_list.append(t / t.norm(dim=-1, keepdim=True))
        v = model.visual
        y = v.conv1(images).reshape(images.shape[0], v.conv1.out_channels, -1).permute(0, 2, 1)
        y = torch.cat([v.class_embedding.expand(y.shape[0], 1, -1), y], dim=1) + v.positional_embedding
        y = torch.cat([y, vpt[i].expand(y.shape[0], -1, -1)], dim=1)
        y = v.transformer(v.ln_pre(y))
        f = v.ln_post(y[:, 0]) @ v.proj
        image_list.append(f / f.norm(dim=-1, keepdim=True))
    scale = model.logit_scale.exp()
    all_logits = [scale * image_list[i] @ text_list[i].t() for i in range(ctx.shape[0])]
    avg_logits = torch.stack(all_logits).mean(dim=0)
    loss = torch.stack([F.cross_entropy(lg, labels) for lg in all_logits]).mean()
    divergent = (_public_divergent_loss(text_list) + _public_divergent_loss(image_list)) / 2 * weight
    divergent = torch.abs(divergent) if divergent < 0 else divergent
    return loss + divergent, avg_logits, loss


def _module(backbone, classnames, groups=3, **kwargs):
    from fedlit.modules.fedmgp import FedMGPClient

    return FedMGPClient(backbone, classnames, groups=groups, prompt={"n_ctx": 4, "vision_n_ctx": 2}, seed=0,
                        share_prefix=False, **kwargs)


@pytest.mark.parametrize("pull", [True, False])
def test_logits_and_loss_equal_the_public_forward_in_fp64(tiny64, classnames, pull):
    module = _module(tiny64, classnames, diversity_weight=0.7, pull_groups=pull).double()
    module.train()
    model = tiny64.model
    learner = module.prompt_learner
    names = [n.replace("_", " ") for n in classnames]
    tokenized = tiny64.tokenize([f"X X X X {n}." for n in names])
    with torch.no_grad():
        embedding = model.token_embedding(tokenized)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1, 0])
    total, avg_logits, ce = _public_forward(model, tokenized, embedding[:, :1], embedding[:, 1 + learner.n_ctx:],
                                            module.text_prompts, module.vision_prompts, images, labels, 0.7)
    logits = module(images)
    torch.testing.assert_close(logits, avg_logits, rtol=0, atol=1e-12)
    loss = module.loss(logits, labels)
    expected = total if pull else ce - (total - ce)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    # the gradient reaches every group of both towers
    loss.backward()
    assert module.text_prompts.grad.abs().flatten(1).sum(1).min() > 0
    assert module.vision_prompts.grad.abs().flatten(1).sum(1).min() > 0
    assert all(p.grad is None for p in tiny64.parameters())


# -- the server: rank-wise averages of the sampled groups, written back into the groups that were uploaded ------

def _fedmgp(*overrides):
    from fedlit.algorithms import build_algorithm
    from fedlit.config import load_config

    return build_algorithm(load_config(None, ["algorithm=fedmgp", "method.mgp_groups=4", "method.mgp_upload=2",
                                              "seed=5", *overrides]))


def _state(seed):
    from fedlit.modules.fedmgp import TEXT_GROUPS, VISION_GROUPS
    from fedlit.state import ClientState

    g = torch.Generator().manual_seed(seed)
    return ClientState(params={TEXT_GROUPS: torch.randn(4, 3, 8, generator=g),
                               VISION_GROUPS: torch.randn(4, 2, 6, generator=g)})


def test_server_averages_each_rank_unweighted_and_writes_it_back():
    from fedlit.algorithms.fedmgp import GLOBAL_TEXT, GLOBAL_VISION
    from fedlit.modules.fedmgp import TEXT_GROUPS, VISION_GROUPS
    from fedlit.state import StoreEntry, Upload

    alg, initial = _fedmgp(), _state(0)
    server = alg.init_server(initial)
    assert torch.equal(server.global_state[GLOBAL_TEXT], initial.params[TEXT_GROUPS][:2])
    assert torch.equal(server.global_state[GLOBAL_VISION], initial.params[VISION_GROUPS][:2])
    towers = ((TEXT_GROUPS, GLOBAL_TEXT, "text"), (VISION_GROUPS, GLOBAL_VISION, "vision"))
    sizes = {0: 10, 2: 1, 3: 5}  # unequal sizes: the public average is unweighted all the same
    for rnd in (1, 2):
        uploads = {c: Upload(_state(10 * rnd + c), loss=0.0, steps=1) for c in sizes}
        before = dict(server.client_records)
        new = alg.aggregate(server, uploads, sizes)
        assert new.round == rnd and server.round == rnd - 1  # the old state is not modified:
        assert server.client_records.keys() == before.keys()
        assert all(server.client_records[c] is before[c] for c in before)
        for name, global_name, key in towers:
            chosen = {}
            for c in sizes:
                probs = upload_probabilities(uploads[c].state.params[name],
                                             None if rnd == 1 else server.global_state[global_name], 1.0)
                chosen[c] = sample_groups(probs, 2, client_rng(5, rnd, c, SELECTION_PURPOSE))
                assert new.client_records[c][f"{key}_index"] == chosen[c]
            for k in range(2):
                direct = sum(uploads[c].state.params[name][chosen[c][k]].double() for c in sizes) / 3
                torch.testing.assert_close(new.global_state[global_name][k].double(), direct, rtol=0, atol=1e-6)
            for c in sizes:
                assert torch.equal(new.client_records[c][key], new.global_state[global_name])
                plan = alg.plan(new, c, StoreEntry(uploads[c].state, last_round=rnd), initial)
                groups = plan.start.params[name]
                for m in range(4):
                    expected = (new.global_state[global_name][chosen[c].index(m)] if m in chosen[c]
                                else uploads[c].state.params[name][m])
                    assert torch.equal(groups[m], expected), (rnd, c, key, m)
        if rnd == 1:  # round 1 is uniform: both towers draw the same groups from the same stream
            assert all(new.client_records[c]["text_index"] == new.client_records[c]["vision_index"] for c in sizes)
        server = new
    assert alg.global_plan(server, initial) is None
    fresh = alg.eval_plan(server, 1, None, initial)  # never trained: the initial groups
    assert all(torch.equal(fresh.start.params[n], initial.params[n]) for n in (TEXT_GROUPS, VISION_GROUPS))


def test_a_client_that_skips_rounds_keeps_the_global_values_of_its_last_participation():
    from fedlit.modules.fedmgp import TEXT_GROUPS
    from fedlit.state import StoreEntry, Upload

    alg, initial = _fedmgp(), _state(0)
    first = alg.aggregate(alg.init_server(initial), {c: Upload(_state(c + 1), 0.0, 1) for c in (0, 1)}, {0: 1, 1: 1})
    second = alg.aggregate(first, {1: Upload(_state(7), 0.0, 1)}, {1: 1})
    entry = StoreEntry(_state(1), last_round=1)  # client 0 trained in round 1 only
    later = alg.plan(second, 0, entry, initial).start.params[TEXT_GROUPS]
    assert torch.equal(later, alg.plan(first, 0, entry, initial).start.params[TEXT_GROUPS])
    index = first.client_records[0]["text_index"]
    assert torch.equal(later[index], first.global_state["global_text"])
    assert not torch.equal(first.global_state["global_text"], second.global_state["global_text"])


def test_logits_and_loss_equal_the_public_forward_in_fp32_with_the_shared_prefix(tiny_backbone, classnames):
    from fedlit.modules.fedmgp import FedMGPClient

    module = FedMGPClient(tiny_backbone, classnames, groups=5, prompt={"n_ctx": 4}, seed=1)  # shared prefix on
    assert module.prompt_learner.shared_length > 0
    module.train()
    model = tiny_backbone.model
    tokenized = tiny_backbone.tokenize([f"X X X X {n.replace('_', ' ')}." for n in classnames])
    with torch.no_grad():
        embedding = model.token_embedding(tokenized)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([2, 0, 1, 2])
    total, avg_logits, ce = _public_forward(model, tokenized, embedding[:, :1], embedding[:, 5:],
                                            module.text_prompts, module.vision_prompts, images, labels, 1.0)
    logits = module(images)
    torch.testing.assert_close(logits, avg_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(module.loss(logits, labels), ce - (total - ce), rtol=0, atol=1e-6)


def test_groups_start_from_one_seeded_draw_and_words_plus_small_noise(tiny_backbone, classnames):
    a = _module(tiny_backbone, classnames, groups=4)
    b = _module(tiny_backbone, classnames, groups=4)
    assert torch.equal(a.text_prompts, b.text_prompts) and torch.equal(a.vision_prompts, b.vision_prompts)
    assert a.text_prompts.shape == (4, 4, tiny_backbone.text_width) and a.vision_prompts.shape == (4, 2, 64)
    assert all(not torch.equal(a.text_prompts[i], a.text_prompts[j]) for i in range(4) for j in range(i + 1, 4))
    assert 0.015 < a.vision_prompts.std().item() < 0.025  # N(0, 0.02²)
    from fedlit.modules.fedmgp import FedMGPClient

    worded = FedMGPClient(tiny_backbone, classnames, groups=3, prompt={"ctx_init": "a photo of a"}, seed=0)
    words = worded.prompt_learner.ctx.detach()
    noise = worded.text_prompts.detach() - words
    assert worded.text_prompts.shape == (3, *words.shape) and 0.007 < noise.std().item() < 0.013  # 0.01 N(0, 1)
    assert sorted(worded.trainable_parameters()) == ["text_prompts", "vision_prompts"]


# -- the federated loop ------------------------------------------------------------------------------------

def test_grouped_clients_equal_one_at_a_time(tmp_path):
    from fedlit.modules.fedmgp import TEXT_GROUPS, VISION_GROUPS
    from tests.method_checks import assert_groups_match_single

    assert_groups_match_single(tmp_path, "fedmgp", [TEXT_GROUPS, VISION_GROUPS])


def test_end_to_end_run_averages_the_sampled_groups_and_keeps_the_rest_private(tmp_path):
    from fedlit.algorithms.fedmgp import GLOBAL_TEXT, GLOBAL_VISION
    from fedlit.federation.checkpoint import load_checkpoint
    from fedlit.federation.experiment import run_experiment
    from fedlit.modules.fedmgp import TEXT_GROUPS, VISION_GROUPS
    from tests.helpers import fast_config, only_run_dir, read_results

    [res] = run_experiment(fast_config(tmp_path, "algorithm=fedmgp", "fed.rounds=2", "optim.prompt_lr=0.05",
                                       "method.mgp_groups=3", "method.mgp_upload=2"))
    run_dir = only_run_dir(tmp_path)
    assert read_results(run_dir)["final"] == res["final"]
    last = res["rounds"][-1]
    assert len(last["accuracy"]) == 4 and all(0.0 <= a <= 1.0 for a in last["accuracy"])
    assert last["acc_global"] is None and np.isfinite(last["loss"])
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    server, store = ckpt["server"], ckpt["store"]
    assert sorted(store) == [0, 1, 2, 3] and all(e["last_round"] == 2 for e in store.values())
    records = server["client_records"]
    for name, global_name, key in ((TEXT_GROUPS, GLOBAL_TEXT, "text"), (VISION_GROUPS, GLOBAL_VISION, "vision")):
        global_groups = server["global_state"][global_name]
        assert global_groups.shape[0] == 2
        for k in range(2):  # each rank is the unweighted mean of the clients' k-th sampled group
            direct = sum(store[c]["state"][name][records[c][f"{key}_index"][k]].double() for c in range(4)) / 4
            torch.testing.assert_close(global_groups[k].double(), direct, rtol=0, atol=1e-6)
        for c in range(4):
            assert torch.equal(records[c][key], global_groups) and len(set(records[c][f"{key}_index"])) == 2
        private = [[m for m in range(3) if m not in records[c][f"{key}_index"]][0] for c in range(4)]
        values = [store[c]["state"][name][private[c]] for c in range(4)]
        assert all(not torch.equal(values[i], values[j]) for i in range(4) for j in range(i + 1, 4))
