"""MaPLe: the coupled prompts and the whole forward (text tower with deep compound prompts, vision tower with the
projected prompts) against a re-implementation of the public code (muzairkhattak/multimodal-prompt-learning,
trainers/maple.py and clip/model.py), on the tiny ViT CLIP and on a CLIP whose text and vision widths differ."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedlit.errors import UserError
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.experiment import build_job, run_experiment
from fedlit.modules.ivlp import DEEP_TEXT
from fedlit.modules.maple import (
    DEEP_PROJ_BIAS,
    DEEP_PROJ_WEIGHT,
    PROJ_BIAS,
    PROJ_WEIGHT,
    MaPLeClient,
    couple,
    linear_init,
)
from fedlit.prompts import PromptLearner
from fedlit.state import PROMPT
from tests.conftest import CLASSNAMES, build_mixed_vit
from tests.helpers import FAST, cache_dir, fast_config, only_run_dir, read_results, train_cli
from tests.method_checks import assert_run_averages_the_global_model


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


# -- fedlit's module on the same tensors ---------------------------------------------------------------------------
def fedlit_forward(backbone, learner, image):
    """MaPLeClient with the public learner's tensors: its normalised image and text features and logits."""
    depth = len(learner.compound_prompts_text) + 1
    module = MaPLeClient(backbone, CLASSNAMES, prompt={"n_ctx": learner.ctx.shape[0], "depth": depth}, seed=0)
    module = module.to(learner.ctx.dtype)
    state = {PROMPT: learner.ctx, PROJ_WEIGHT: learner.proj.weight, PROJ_BIAS: learner.proj.bias}
    if depth > 1:
        projections = learner.compound_prompt_projections
        state.update({DEEP_TEXT: torch.stack(list(learner.compound_prompts_text)),
                      DEEP_PROJ_WEIGHT: torch.stack([p.weight for p in projections]),
                      DEEP_PROJ_BIAS: torch.stack([p.bias for p in projections])})
    assert set(state) == set(module.trainable_parameters())
    module.load_client_state(state)
    logits = module(image)
    assert torch.equal(module(module.frozen_image_inputs(image)), logits)  # from the tokens the cache holds
    return module.image_features(image), module.class_text_features(), logits


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


# -- the module: init, groups of clients ------------------------------------------------------------------------
def test_initial_state_follows_the_public_init(tiny_backbone):
    module = MaPLeClient(tiny_backbone, CLASSNAMES, prompt={"n_ctx": 2, "depth": 2}, seed=0)
    params = module.trainable_parameters()
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        PROMPT: (2, 64), DEEP_TEXT: (1, 2, 64), PROJ_WEIGHT: (64, 64), PROJ_BIAS: (64,),
        DEEP_PROJ_WEIGHT: (1, 64, 64), DEEP_PROJ_BIAS: (1, 64)}
    assert not torch.equal(params[PROMPT], params[DEEP_TEXT][0])  # independent draws
    g = torch.Generator().manual_seed(0 + 32_452)
    first, deeper = linear_init(64, 64, g), linear_init(64, 64, g, copies=1)
    assert torch.equal(params[PROJ_WEIGHT], first[0]) and torch.equal(params[PROJ_BIAS], first[1])
    assert torch.equal(params[DEEP_PROJ_WEIGHT], deeper[0]) and torch.equal(params[DEEP_PROJ_BIAS], deeper[1])
    again = MaPLeClient(tiny_backbone, CLASSNAMES, prompt={"n_ctx": 2, "depth": 2}, seed=0).trainable_parameters()
    assert all(torch.equal(v, again[k]) for k, v in params.items())
    shallow = MaPLeClient(tiny_backbone, CLASSNAMES, prompt={"n_ctx": 2, "depth": 1}, seed=0)
    assert set(shallow.trainable_parameters()) == {PROMPT, PROJ_WEIGHT, PROJ_BIAS}
    # depth None: every layer both towers have (2 here); the mixed CLIP from block 1: 2 coupled layers of 3 text
    assert MaPLeClient(tiny_backbone, CLASSNAMES, prompt={"n_ctx": 2}).text_depth == 2
    mixed = MaPLeClient(build_mixed_vit(), CLASSNAMES, prompt={"n_ctx": 2, "vision_start_layer": 1})
    assert mixed.text_depth == 2 and mixed.trainable_parameters()[DEEP_PROJ_WEIGHT].shape == (1, 64, 32)


def test_depth_beyond_the_towers_is_one_line(tiny_backbone):
    with pytest.raises(UserError, match="do not fit the 2 image-tower layers of backbone tiny"):
        MaPLeClient(tiny_backbone, CLASSNAMES, prompt={"depth": 3})
    with pytest.raises(UserError, match="unified context with the class name at the end"):
        MaPLeClient(tiny_backbone, CLASSNAMES, prompt={"class_specific": True})


@pytest.mark.parametrize("algorithm", ["maple", "ivlp"])
def test_group_logits_are_each_clients_own_logits(tmp_path, algorithm):
    """G = 2 clients' own parameters (the initial ones plus different noise) on their own tokens, in one pass of
    each tower, against each client alone: within 1e-12 in float64 (in float32 the two orders of the sums differ
    by rounding, about 3e-7 of the logit, which depends on the CPU's kernels)."""
    module = build_job(fast_config(tmp_path, f"algorithm={algorithm}")).build()[1].double()
    g = torch.Generator().manual_seed(3)
    initial = module.client_state()
    params = {k: torch.stack([v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for _ in range(2)])
              for k, v in initial.items()}
    images = torch.randn(2, 5, 3, 32, 32, generator=g, dtype=torch.float64)
    tokens = module.frozen_image_inputs(images.flatten(0, 1)).unflatten(0, (2, 5))
    with torch.no_grad():
        grouped = module.group_logits(params, tokens, {})
        assert grouped.dtype == torch.float64
        for client in range(2):
            module.load_client_state({k: v[client] for k, v in params.items()})
            torch.testing.assert_close(grouped[client], module(tokens[client]), rtol=0, atol=1e-12)
            torch.testing.assert_close(grouped[client], module(images[client]), rtol=0, atol=1e-12)


# -- runs ------------------------------------------------------------------------------------------------------------
RUN = ["fed.rounds=2", "optim.prompt_lr=0.05"]


@pytest.mark.parametrize("algorithm", ["maple", "ivlp"])
def test_run_averages_every_tensor_into_the_global_model(tmp_path, algorithm):
    res = assert_run_averages_the_global_model(tmp_path, algorithm, "optim.prompt_lr=0.05")
    assert res["rounds"][-1]["loss"] < res["rounds"][0]["loss"]


@pytest.mark.parametrize("algorithm", ["maple", "ivlp"])
def test_cached_tokens_give_the_uncached_run_bitwise(tmp_path, algorithm):
    runs, states = {}, {}
    for cached in ("true", "false"):
        [runs[cached]] = run_experiment(fast_config(tmp_path / cached, f"algorithm={algorithm}", *RUN,
                                                    f"perf.cache_features={cached}"))
        states[cached] = load_checkpoint(only_run_dir(tmp_path / cached) / "checkpoint.pt")["server"]["global_state"]
    assert [(r["accuracy"], r["loss"]) for r in runs["true"]["rounds"]] == \
        [(r["accuracy"], r["loss"]) for r in runs["false"]["rounds"]]
    assert set(states["true"]) == set(states["false"]) and len(states["true"]) >= 2
    assert all(torch.equal(v, states["false"][k]) for k, v in states["true"].items())


@pytest.mark.parametrize("algorithm", ["maple", "ivlp"])
def test_grouped_clients_agree_with_one_at_a_time(tmp_path, algorithm):
    one = run_experiment(fast_config(tmp_path / "one", f"algorithm={algorithm}", *RUN, "perf.client_batch=1"))[0]
    two = run_experiment(fast_config(tmp_path / "two", f"algorithm={algorithm}", *RUN, "perf.client_batch=2"))[0]
    for r1, r2 in zip(one["rounds"], two["rounds"]):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-6)
        assert r1["accuracy"] == pytest.approx(r2["accuracy"], abs=1e-6)
    a, b = (load_checkpoint(only_run_dir(tmp_path / d) / "checkpoint.pt")["server"]["global_state"]
            for d in ("one", "two"))
    assert all(torch.allclose(v, b[k], rtol=0, atol=1e-6) for k, v in a.items())


@pytest.mark.parametrize("overrides, message", [
    (["algorithm=maple", "prompt.class_specific=true"],
     "algorithm=maple replaces the context after the start token by deep text prompts"),
    (["algorithm=ivlp", "prompt.class_position=front"],
     "algorithm=ivlp replaces the context after the start token by deep text prompts"),
    (["algorithm=maple", "backbone.name=RN50", "backbone.pretrained=random"],
     "algorithm=maple puts prompt tokens inside the image tower, which needs a ViT"),
    (["algorithm=ivlp", "prompt.depth=3"], "prompt.depth=3 layers from prompt.vision_start_layer=0 exceed the 2"),
])
def test_bad_settings_are_one_line_before_anything_is_written(tmp_path, overrides, message):
    done = train_cli("backbone.name=tiny", f"run.out_dir={tmp_path}", *overrides)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "default").exists()


def test_fedlit_train_runs_maple_end_to_end(tmp_path):
    done = train_cli(*FAST, f"backbone.cache_dir={cache_dir()}", "algorithm=maple", "fed.rounds=2",
                     f"run.out_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(only_run_dir(tmp_path))
    assert len(results["rounds"]) == 2 and results["final"]["acc_mean"] is not None
