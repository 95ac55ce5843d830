"""CoCoOp: the image-conditioned context against a re-implementation of the public forward and loss
(KaiyangZhou/CoOp, trainers/cocoop.py), chunked text passes, FedAvg of the context and the meta-net, groups, an
end-to-end run and config errors."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlit.algorithms import build_algorithm
from fedlit.algorithms.base import fedavg
from fedlit.algorithms.cocoop import global_names
from fedlit.config import load_config
from fedlit.errors import UserError
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.experiment import run_experiment
from fedlit.modules.cocoop import META, CoCoOpClient, meta_bias, meta_net, shifted_contexts
from fedlit.state import PROMPT, ClientState, StoreEntry, Upload
from tests.helpers import fast_config, only_run_dir
from tests.method_checks import assert_groups_match_single

META_NAMES = [META + n for n in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")]


def public_cocoop(model, classnames: list[str], n_ctx: int, tokenizer, ctx: torch.Tensor, net: nn.Module,
                  image_features: torch.Tensor, labels: torch.Tensor):
    """The public ``CustomCLIP.forward`` of CoCoOp (fp32), op for op on an open_clip model: full 77-token prompts
    ``[SOS, ctx + pi_b, class tokens, EOS]`` per image, its own text pass per image, logits, cross-entropy.
    ``image_features`` are the image encoder's output (normalised here, as the public code does)."""
    prompts = [" ".join(["X"] * n_ctx) + " " + name.replace("_", " ") + "." for name in classnames]
    tokenized = tokenizer(prompts)
    with torch.no_grad():
        embedding = model.token_embedding(tokenized)
    prefix, suffix = embedding[:, :1, :], embedding[:, 1 + n_ctx :, :]
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    bias = net(image_features).unsqueeze(1)  # (batch, 1, ctx_dim)
    ctx_shifted = ctx.unsqueeze(0) + bias
    logits = []
    for ctx_i, imf_i in zip(ctx_shifted, image_features):
        pts_i = torch.cat([prefix, ctx_i.unsqueeze(0).expand(len(classnames), -1, -1), suffix], dim=1)
        x = pts_i + model.positional_embedding
        x = model.transformer(x, attn_mask=model.attn_mask)  # open_clip is batch-first (no NLD -> LND permute)
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection
        text_features = x / x.norm(dim=-1, keepdim=True)
        logits.append(model.logit_scale.exp() * imf_i @ text_features.t())
    logits = torch.stack(logits)
    return logits, F.cross_entropy(logits, labels)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Equal within 1e-6 relative to the larger of 1 and the largest magnitude (fp32 rounding of the two orders of
    summation; gradients here reach 2)."""
    bound = 1e-6 * max(1.0, float(expected.abs().max()))
    assert float((actual - expected).abs().max()) <= bound, (name, float((actual - expected).abs().max()), bound)


def _module(backbone, classnames, chunk: int = 0, **prompt) -> CoCoOpClient:
    torch.manual_seed(3)  # the meta-net's default init draws from the global stream, as in a run
    module = CoCoOpClient(backbone, classnames, chunk=chunk, prompt={"n_ctx": 4, **prompt}, seed=0)
    with torch.no_grad():  # a bias large enough to move the features image by image
        module.meta_net.linear2.weight.mul_(10.0)
        module.meta_net.linear2.bias.normal_(0.0, 0.05)
    return module


def _images(backbone, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, backbone.feature_dim, generator=g)
    return raw, torch.arange(n) % 3


def test_meta_net_is_linear_relu_linear_of_width_d_over_16(tiny_backbone):
    net = meta_net(tiny_backbone.feature_dim, tiny_backbone.text_width)
    assert [type(m) for m in net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert net.linear1.weight.shape == (tiny_backbone.feature_dim // 16, tiny_backbone.feature_dim)
    assert net.linear2.weight.shape == (tiny_backbone.text_width, tiny_backbone.feature_dim // 16)
    x = torch.randn(2, 5, tiny_backbone.feature_dim)
    params = {META + n: p.unsqueeze(0).expand(2, *p.shape) for n, p in net.named_parameters()}
    assert torch.allclose(meta_bias(params, x), net(x), atol=1e-6)
    with pytest.raises(UserError, match="feature width"):
        meta_net(8, 64)


def test_shifted_contexts_add_the_image_bias_to_every_token():
    ctx = torch.arange(6.0).reshape(1, 2, 3)  # G = 1, n_ctx = 2, W = 3
    bias = torch.tensor([[[10.0, 20.0, 30.0], [1.0, 1.0, 1.0]]])  # B = 2 images
    out = shifted_contexts(ctx, bias)
    assert out.shape == (1, 2, 2, 3)
    assert torch.equal(out[0, 0], torch.tensor([[10.0, 21.0, 32.0], [13.0, 24.0, 35.0]]))
    assert torch.equal(out[0, 1], ctx[0] + 1.0)
    class_specific = torch.zeros(1, 4, 2, 3)  # (G, C, n_ctx, W)
    assert torch.equal(shifted_contexts(class_specific, bias)[0, 0, 3], bias[0, 0].expand(2, 3))


def _public_and_fedlit(module: CoCoOpClient, raw: torch.Tensor, labels: torch.Tensor, classnames: list[str]):
    """Logits and loss of the public forward and of ``module`` (sharing its weights), both backpropagated; returns
    ``(logits, loss, grads, logits_ref, loss_ref, grads_ref)`` with grads by client-state name."""
    backbone = module.backbone
    dim = backbone.feature_dim
    net = nn.Sequential(OrderedDict([("linear1", nn.Linear(dim, dim // 16)), ("relu", nn.ReLU(inplace=True)),
                                     ("linear2", nn.Linear(dim // 16, backbone.text_width))])).to(raw.dtype)
    net.load_state_dict(module.meta_net.state_dict())
    ctx = module.prompt_learner.ctx.detach().clone().requires_grad_(True)
    logits_ref, loss_ref = public_cocoop(backbone.model, classnames, 4, backbone.tokenizer, ctx, net, raw, labels)
    loss_ref.backward()
    logits = module(F.normalize(raw, dim=-1))  # fedlit's cached features are normalised
    loss = module.loss(logits, labels)
    loss.backward()
    grads = {n: p.grad for n, p in module.trainable_parameters().items()}
    grads_ref = {PROMPT: ctx.grad, **{META + n: p.grad for n, p in net.named_parameters()}}
    return logits, loss, grads, logits_ref, loss_ref, grads_ref


def test_logits_loss_and_gradients_match_the_public_forward(tiny_backbone, classnames):
    module = _module(tiny_backbone, classnames)
    raw, labels = _images(tiny_backbone)
    logits, loss, grads, logits_ref, loss_ref, grads_ref = _public_and_fedlit(module, raw, labels, classnames)
    scale = tiny_backbone.logit_scale  # 14.3: compare the cosines, fp32 rounds the scaled logits to ~2e-6
    assert torch.allclose(logits / scale, logits_ref / scale, atol=1e-6, rtol=0)
    assert abs(loss.item() - loss_ref.item()) < 1e-6
    for name, grad in grads.items():  # fp32: two summation orders through two layers and the meta-net
        assert torch.allclose(grad, grads_ref[name], atol=1e-5, rtol=1e-5), name
    # the per-image bias matters: the same context without it gives other logits
    with torch.no_grad():
        plain = scale * F.normalize(raw, dim=-1) @ module.prompt_learner.text_features(tiny_backbone).T
    assert (logits - plain).abs().max() > 1e-3


def test_gradients_equal_the_public_ones_in_float64(tiny_backbone, classnames):
    module = copy.deepcopy(_module(tiny_backbone, classnames)).double()  # its own float64 copy of the backbone
    raw, labels = _images(tiny_backbone)
    logits, loss, grads, logits_ref, loss_ref, grads_ref = _public_and_fedlit(module, raw.double(), labels,
                                                                              classnames)
    assert logits.dtype == torch.float64 and torch.allclose(logits, logits_ref, atol=1e-10, rtol=0)
    assert abs(loss.item() - loss_ref.item()) < 1e-6  # fedlit's loss takes the cross-entropy in fp32
    for name, grad in grads.items():
        assert grad.dtype == torch.float64 and torch.allclose(grad, grads_ref[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("chunk", [1, 4])
def test_chunks_and_their_checkpointed_backward_match_one_pass(tiny_backbone, classnames, chunk):
    whole, parts = _module(tiny_backbone, classnames, chunk=0), _module(tiny_backbone, classnames, chunk=chunk)
    raw, labels = _images(tiny_backbone, n=7)
    x = F.normalize(raw, dim=-1)
    for module in (whole, parts):
        module.loss(module(x), labels).backward()
    scale = tiny_backbone.logit_scale
    assert torch.allclose(whole(x) / scale, parts(x) / scale, atol=1e-6, rtol=0)
    for (name, a), b in zip(whole.trainable_parameters().items(), parts.trainable_parameters().values()):
        assert_close(a.grad, b.grad, name)
    with torch.no_grad():  # evaluation chunks too (no graph kept)
        assert torch.allclose(whole(x) / scale, parts(x) / scale, atol=1e-6, rtol=0)


def test_trainable_state_is_the_context_and_the_meta_net_in_one_cosine_group(tiny_backbone, classnames):
    module = _module(tiny_backbone, classnames)
    assert sorted(module.trainable_parameters()) == sorted([PROMPT, *META_NAMES])
    [group] = module.param_groups()
    assert group["schedule"] == "cosine" and len(group["params"]) == 5
    assert group["lr"] == module.optim.prompt_lr


def _algorithm(tmp_path, *overrides):
    return build_algorithm(load_config(None, [f"run.out_dir={tmp_path}", "algorithm=cocoop", *overrides]))


def _state(ctx: float, w: float) -> ClientState:
    params = {PROMPT: torch.full((2, 3), ctx)}
    params.update({name: torch.full((2,), w) for name in META_NAMES})
    return ClientState(params)


def test_aggregation_averages_the_context_and_the_meta_net(tmp_path):
    algorithm = _algorithm(tmp_path)
    initial = _state(0.0, 0.5)
    server = algorithm.init_server(initial)
    assert sorted(server.global_state) == sorted(["ctx", *META_NAMES])
    assert global_names(initial.params) == {PROMPT: "ctx", **{n: n for n in META_NAMES}}
    uploads = {0: Upload(_state(1.0, 2.0), loss=0.0, steps=1), 1: Upload(_state(5.0, 6.0), loss=0.0, steps=1)}
    new = algorithm.aggregate(server, uploads, {0: 1, 1: 3})
    assert torch.equal(new.global_state["ctx"], torch.full((2, 3), 4.0))  # (1 * 1 + 3 * 5) / 4
    for name in META_NAMES:
        assert torch.equal(new.global_state[name], torch.full((2,), 5.0))  # (1 * 2 + 3 * 6) / 4
    store = {c: StoreEntry(u.state, last_round=1) for c, u in uploads.items()}
    for plan in (algorithm.plan(new, 0, store[0], initial), algorithm.eval_plan(new, 1, store[1], initial),
                 algorithm.eval_plan(new, 2, None, initial), algorithm.global_plan(new, initial)):
        assert torch.equal(plan.start.params[PROMPT], torch.full((2, 3), 4.0))
        assert all(torch.equal(plan.start.params[n], torch.full((2,), 5.0)) for n in META_NAMES)
    assert torch.equal(initial.params[META_NAMES[0]], torch.full((2,), 0.5))  # the initial state is not modified


@pytest.mark.parametrize("value", ["-1", "2.5", "true"])
def test_bad_chunk_is_a_user_error(tmp_path, value):
    with pytest.raises(UserError, match=r"method\.cocoop_chunk"):
        _algorithm(tmp_path, f"method.cocoop_chunk={value}")


def test_grouped_training_matches_one_client_at_a_time(tmp_path):
    assert_groups_match_single(tmp_path, "cocoop", [PROMPT, *META_NAMES])


def test_end_to_end_run_averages_the_context_and_the_meta_net(tmp_path):
    [res] = run_experiment(fast_config(tmp_path, "algorithm=cocoop", "fed.rounds=2", "optim.prompt_lr=0.05",
                                       "method.cocoop_chunk=5"))
    last = res["rounds"][-1]
    assert len(last["accuracy"]) == 4 and last["acc_global"] is not None
    run_dir = only_run_dir(tmp_path)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    sizes = json.loads((run_dir / "partition.json").read_text())["train_sizes"]
    store, global_state = ckpt["store"], ckpt["server"]["global_state"]
    for client_name, global_name in global_names(global_state).items():
        uploads = [store[c]["state"][client_name] for c in range(4)]
        assert not torch.equal(uploads[0], uploads[1]), client_name  # every client trained it
        assert torch.equal(global_state[global_name], fedavg([{"x": u} for u in uploads], sizes)["x"]), client_name
