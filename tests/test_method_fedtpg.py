"""FedTPG: the prompt generator and the whole forward against a re-implementation of the public code
(boschresearch/FedTPG, model/prompt_net.py and model/FedTPG.py), the conditioning on the candidate class names,
FedAvg of the generator as the global model, grouped training and an end-to-end run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlit.algorithms import build_algorithm
from fedlit.config import load_config
from fedlit.errors import UserError
from fedlit.federation.evaluation import EvalModel
from fedlit.federation.experiment import build_job
from fedlit.modules.fedtpg import FedTPGClient, PromptGenerator, generate
from tests.helpers import fast_config
from tests.method_checks import assert_groups_match_single, assert_run_averages_the_global_model


# -- the public code's PromptTranslator (prompt_net.py), verbatim but for einops' repeat (an expand here) ---------
class PreNorm(nn.Module):
    def __init__(self, dim, fn, context_dim=None):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None

    def forward(self, x_q, x_kv=None, **kwargs):
        x_q = self.norm(x_q)
        x_kv = self.norm_context(x_kv) if x_kv is not None else x_q
        return self.fn(x_q, x_kv, x_kv, **kwargs)


class GEGLU(nn.Module):
    def forward(self, x):
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult * 2), GEGLU(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    def __init__(self, latent_dim, kv_dim, cross_heads=4):
        super().__init__()
        self.cross_attend_blocks = nn.ModuleList([
            PreNorm(latent_dim, nn.MultiheadAttention(latent_dim, num_heads=cross_heads, kdim=kv_dim, vdim=kv_dim,
                                                      dropout=0.0, batch_first=True), context_dim=kv_dim),
            FeedForward(latent_dim)])

    def forward(self, data, soft_prompt, mask=None):
        x = soft_prompt.unsqueeze(0).expand(data.shape[0], -1, -1)  # repeat(soft_prompt, 'n d -> b n d', b=b)
        cross_attn, cross_ff = self.cross_attend_blocks
        x, _ = cross_attn(x, data, key_padding_mask=mask)
        x = cross_ff(x) + x
        return x


class SelfAttention(nn.Module):
    def __init__(self, depth, latent_dim, latent_heads=4):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([
            PreNorm(latent_dim, nn.MultiheadAttention(latent_dim, num_heads=latent_heads, batch_first=True)),
            FeedForward(latent_dim)]) for _ in range(depth)])

    def forward(self, x, mask=None):
        for self_attn, self_ff in self.layers:
            x = self_attn(x, key_padding_mask=mask)[0] + x
            x = self_ff(x) + x
        return x


class PromptTranslator(nn.Module):
    def __init__(self, prompt_len, prompt_depth, prompt_dim=512, depth=4, self_heads=4, cross_heads=4,
                 textemb_dim=512):
        super().__init__()
        self.prompt_len, self.prompt_depth = prompt_len, prompt_depth
        soft_prompt = torch.empty(prompt_len * prompt_depth, prompt_dim)
        nn.init.normal_(soft_prompt, std=0.02)
        self.soft_prompt = nn.Parameter(soft_prompt)
        self.encoder = CrossAttention(latent_dim=prompt_dim, kv_dim=textemb_dim, cross_heads=cross_heads)
        if depth > 0:
            self.transformer = SelfAttention(depth=depth, latent_dim=prompt_dim, latent_heads=self_heads)
        self.depth = depth

    def forward(self, text_emb):
        prompt = self.encoder(text_emb, self.soft_prompt)
        if self.depth > 0:
            prompt = self.transformer(prompt)
        prompt = prompt.reshape(self.prompt_depth, self.prompt_len, -1)
        return prompt, prompt


def public_name(name: str) -> str:
    """The public PromptTranslator's state-dict name of a fedlit PromptGenerator parameter."""
    pairs = [("cross_attn.", "encoder.cross_attend_blocks.0.fn."),
             ("cross_norm.", "encoder.cross_attend_blocks.0.norm."),
             ("context_norm.", "encoder.cross_attend_blocks.0.norm_context."),
             ("cross_ff.norm.", "encoder.cross_attend_blocks.1.net.0."),
             ("cross_ff.fc1.", "encoder.cross_attend_blocks.1.net.1."),
             ("cross_ff.fc2.", "encoder.cross_attend_blocks.1.net.3.")]
    for ours, theirs in pairs:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    if name.startswith("blocks."):
        _, i, rest = name.split(".", 2)
        for ours, theirs in (("attn.", "0.fn."), ("norm.", "0.norm."), ("ff.norm.", "1.net.0."),
                             ("ff.fc1.", "1.net.1."), ("ff.fc2.", "1.net.3.")):
            if rest.startswith(ours):
                return f"transformer.layers.{i}.{theirs}{rest[len(ours):]}"
    return name


def perturbed_pair(n_ctx: int, width: int, dim: int, depth: int, heads: int) -> tuple[PromptGenerator, nn.Module]:
    """A fedlit generator with every parameter moved off its init (LayerNorms and zero biases too), and the public
    PromptTranslator holding the same weights."""
    torch.manual_seed(1)
    ours = PromptGenerator(n_ctx, width, dim, depth, heads, seed=3)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    theirs = PromptTranslator(n_ctx, 1, prompt_dim=width, depth=depth, self_heads=heads, cross_heads=heads,
                              textemb_dim=dim)
    state = {public_name(n): p.detach() for n, p in ours.named_parameters()}
    theirs.load_state_dict(state)  # strict: every public parameter has its fedlit twin
    return ours, theirs


@pytest.mark.parametrize("width, dim, depth", [(64, 64, 0), (32, 48, 2)])  # kdim = W (in_proj) and kdim != W
def test_generator_equals_the_public_prompt_translator(width, dim, depth):
    ours, theirs = perturbed_pair(4, width, dim, depth, heads=4)
    names = F.normalize(torch.randn(5, dim), dim=-1)
    with torch.no_grad():
        expected = theirs(names.unsqueeze(0))[0][0]  # text_ctx[0]: (n_ctx, W)
    got = ours(names)
    tol = 1e-6 * float(expected.abs().max())  # fp32 rounding relative to the output's scale (about 3 here)
    assert got.shape == (4, width) and torch.allclose(got, expected, rtol=0, atol=tol)
    # G = 2 stacked generators: each gets its own context
    params = {n: torch.stack([p.detach(), p.detach() * 0.5]) for n, p in ours.named_parameters()}
    grouped = generate(params, names, depth, 4, prefix="")
    halved = generate({n: v[1] for n, v in params.items()}, names, depth, 4, prefix="")
    assert torch.allclose(grouped[0], expected, rtol=0, atol=tol)
    assert torch.allclose(grouped[1], halved, rtol=0, atol=tol)


def public_text_features(backbone, classnames: list[str], ctx: torch.Tensor) -> torch.Tensor:
    """FedTPG.encode_text with the full 77-token sequences of open_clip: 'X X X X <name>.' tokens, positions
    1..n_ctx replaced by ``ctx``, the text transformer, the end token's row, the projection; normalised."""
    model = backbone.model
    names = [n.replace("_", " ") for n in classnames]
    tokens = backbone.tokenize([" ".join(["X"] * ctx.shape[0]) + " " + n + "." for n in names])
    embedding = model.token_embedding(tokens)
    prompts = torch.cat([embedding[:, :1], ctx.unsqueeze(0).expand(len(names), -1, -1),
                         embedding[:, 1 + ctx.shape[0]:]], dim=1)
    x = model.transformer(prompts + model.positional_embedding, attn_mask=model.attn_mask)
    x = model.ln_final(x)[torch.arange(len(names)), tokens.argmax(dim=-1)] @ model.text_projection
    return x / x.norm(dim=-1, keepdim=True)


def _module(backbone, classnames, **kwargs):
    torch.manual_seed(0)
    return FedTPGClient(backbone, classnames, prompt={"n_ctx": 4}, seed=0, **kwargs)


def test_whole_forward_equals_the_public_fedtpg_forward(tiny_backbone, classnames):
    module = _module(tiny_backbone, classnames)
    with torch.no_grad():
        for p in module.generator.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    reference = PromptTranslator(4, 1, prompt_dim=tiny_backbone.text_width, depth=0,
                                 textemb_dim=tiny_backbone.feature_dim)
    reference.load_state_dict({public_name(n): p.detach() for n, p in module.generator.named_parameters()})
    with torch.no_grad():
        names = F.normalize(tiny_backbone.model.encode_text(tiny_backbone.tokenize(
            [n.replace("_", " ") for n in classnames])), dim=-1)  # the plain class names, no template
        ctx = reference(names.unsqueeze(0))[0][0]
        text = public_text_features(tiny_backbone, classnames, ctx)
    assert torch.allclose(module.name_features, names, rtol=0, atol=1e-6)
    assert torch.allclose(module.context(), ctx, rtol=0, atol=1e-6 * float(ctx.abs().max()))
    assert torch.allclose(module.class_text_features(), text, rtol=0, atol=1e-6)
    image = F.normalize(torch.randn(6, tiny_backbone.feature_dim), dim=-1)
    s = tiny_backbone.logit_scale
    assert torch.allclose(module(image), s * image @ text.t(), rtol=0, atol=1e-6 * float(s))
    # only the generator trains (the learner's own ctx is a frozen placeholder)
    assert all(n.startswith("generator.") for n in module.trainable_parameters())
    F.cross_entropy(module(image), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.generator.parameters())
    assert module.prompt_learner.ctx.grad is None


def test_the_context_follows_the_candidate_class_names(tiny_backbone, classnames):
    module = _module(tiny_backbone, classnames)
    full = module.candidate_text_features(None)
    pair = module.candidate_text_features([0, 2])
    names = F.normalize(tiny_backbone.model.encode_text(tiny_backbone.tokenize(["cat", "sea turtle"])), dim=-1)
    ctx = module.generator(names)
    assert torch.allclose(module.context(classes=[0, 2]), ctx, rtol=0, atol=1e-6)
    assert torch.allclose(pair[[0, 2]], public_text_features(tiny_backbone, classnames, ctx)[[0, 2]], rtol=0, atol=1e-6)
    assert not torch.allclose(pair, full, atol=1e-4)  # another class set, another context
    trained = _module(tiny_backbone, classnames, train_classes=[0, 2])
    assert torch.equal(trained.class_text_features(), trained.candidate_text_features([0, 2]))


def test_base_to_novel_evaluation_conditions_on_the_candidates(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=fedtpg", "eval.protocol=base2novel")
    orch = build_job(cfg).orchestrator(tmp_path / "run")
    module, data = orch.trainer.module, orch.trainer.data
    base, novel = orch.split
    assert module.train_classes == base
    model = EvalModel(orch.trainer)
    model.use(orch.algorithm.global_plan(orch.algorithm.init_server(orch.initial), orch.initial))
    with torch.no_grad():
        for classes in (base, novel):
            index = torch.nonzero(torch.isin(data.test_labels, torch.as_tensor(classes)), as_tuple=True)[0]
            inputs, labels = data.test_inputs(index), data.test_labels[index]
            logits = module.logits_from(inputs, module.candidate_text_features(classes))[:, classes]
            correct = int((torch.as_tensor(classes)[logits.argmax(-1)] == labels).sum())
            assert model.counts(inputs, labels, classes) == (correct, len(index))
            assert torch.equal(model.text(classes), module.candidate_text_features(classes))


def _algorithm(tmp_path, *overrides):
    return build_algorithm(load_config(None, [f"run.out_dir={tmp_path}", "algorithm=fedtpg", *overrides]))


@pytest.mark.parametrize("override, message", [
    ("method.tpg_depth=-1", "method.tpg_depth"), ("method.tpg_heads=0", "method.tpg_heads"),
    ("prompt.ctx_init=a photo of a", "prompt.ctx_init"), ("prompt.class_specific=true", "prompt.class_specific"),
    ("method.tpg_client_classes=3", "method.tpg_client_classes")])
def test_bad_settings_are_user_errors(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        _algorithm(tmp_path, override)


def test_heads_must_divide_the_text_width(tiny_backbone, classnames):
    with pytest.raises(UserError, match=r"method\.tpg_heads=3 must divide the text width 64"):
        _module(tiny_backbone, classnames, heads=3)


def test_grouped_training_matches_one_client_at_a_time(tmp_path):
    names = list(build_job(fast_config(tmp_path, "algorithm=fedtpg")).build()[1].trainable_parameters())
    assert_groups_match_single(tmp_path, "fedtpg", names)


def test_end_to_end_run_averages_the_generator(tmp_path):
    res = assert_run_averages_the_global_model(tmp_path, "fedtpg", "method.tpg_depth=1")
    assert res["rounds"][0]["loss"] != res["rounds"][1]["loss"]


def test_training_conditions_on_the_clients_own_classes_as_the_public_client(tiny_backbone, classnames):
    module = _module(tiny_backbone, classnames)
    module.set_client_classes([0, 2])  # what the local trainer does for a client holding classes 0 and 2
    image = F.normalize(torch.randn(4, tiny_backbone.feature_dim), dim=-1)
    labels = torch.tensor([0, 2, 2, 0])
    own = [classnames[0], classnames[2]]
    with torch.no_grad():  # the public Client: FedTPG.forward(images, available_classes), labels within them
        names = F.normalize(tiny_backbone.model.encode_text(tiny_backbone.tokenize(["cat", "sea turtle"])), dim=-1)
        expected = tiny_backbone.logit_scale * image @ public_text_features(tiny_backbone, own,
                                                                            module.generator(names)).t()
    logits = module(image)
    assert torch.allclose(logits[:, [0, 2]], expected, rtol=0, atol=1e-6 * float(tiny_backbone.logit_scale))
    public_loss = F.cross_entropy(expected, torch.tensor([0, 1, 1, 0]))
    assert module.loss(logits, labels).item() == pytest.approx(public_loss.item(), abs=1e-6)
    assert torch.equal(module.client_extras()["condition"], torch.tensor([True, False, True]))
    module.set_client_classes(None)  # outside training (the trainer's load for evaluation): the trained classes
    assert torch.equal(module.client_extras()["condition"], torch.ones(3, dtype=torch.bool))
    off = _module(tiny_backbone, classnames, client_classes=False)
    off.set_client_classes([0, 2])
    assert torch.equal(off.client_extras()["condition"], torch.ones(3, dtype=torch.bool))


def test_the_local_trainer_gives_each_client_its_own_classes(tmp_path, monkeypatch):
    seen: list[list[int]] = []
    original = FedTPGClient.set_client_classes

    def record(self, classes):
        if classes is not None:
            seen.append(list(classes))
        original(self, classes)

    monkeypatch.setattr(FedTPGClient, "set_client_classes", record)
    orch = build_job(fast_config(tmp_path, "algorithm=fedtpg")).orchestrator(tmp_path / "run")
    data = orch.trainer.data
    plans = {c: orch.algorithm.plan(orch.algorithm.init_server(orch.initial), c, None, orch.initial) for c in range(4)}
    orch.trainer.train(plans, 1)
    owned = [sorted(set(data.train_labels[data.partition.train_indices[c]].tolist())) for c in range(4)]
    assert all(len(o) < orch.trainer.module.num_classes for o in owned)  # pathological: a few classes each
    assert seen[::2] == owned and seen[1::2] == owned  # set when prepared and again when trained
