"""The pFedMoAP gate against an explicit einsum implementation of SPEC §2 items 4-7 and 10."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedlit.gating import AttentionGate, downsample

LOGIT_SCALE = 100.0  # CLIP's exp(logit_scale) after training


def make_inputs(dim: int, batch: int = 4, classes: int = 5, experts: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    text = F.normalize(torch.randn(experts, classes, dim, generator=gen), dim=-1)
    return image, text


def make_gate(dim: int, seed: int = 0, **kwargs) -> AttentionGate:
    torch.manual_seed(seed)
    return AttentionGate(dim, **kwargs)


def reference(gate: AttentionGate, image, text, scale: float, top_k: int | None = None):
    """SPEC §2 written out: returns (T_moe (C, B, d_g), moe logits (B, C), attention weights (C, B, H, E))."""
    d_g, heads = gate.d_gate, gate.num_heads
    r = image.shape[-1] // d_g
    q_in, kv_in = image[:, ::r], text[..., ::r]  # (B, d_g), (E, C, d_g)
    n_exp, n_cls, _ = kv_in.shape
    batch = q_in.shape[0]

    def lin(x, layer):
        return torch.einsum("...i,oi->...o", x, layer.weight) + layer.bias

    q = lin(q_in, gate.q_proj).reshape(batch, heads, d_g // heads)
    k = lin(kv_in, gate.k_proj).reshape(n_exp, n_cls, heads, d_g // heads)
    v = lin(kv_in, gate.v_proj).reshape(n_exp, n_cls, heads, d_g // heads)
    attn = torch.softmax(scale * torch.einsum("bhd,echd->cbhe", q, k), dim=-1)
    if top_k is not None:
        kth = attn.sort(dim=-1, descending=True).values[..., top_k - 1 : top_k]
        attn = attn * (attn >= kth)
    out = torch.einsum("cbhe,echd->cbhd", attn, v).reshape(n_cls, batch, d_g)
    t_moe = lin(out, gate.out_proj)
    return t_moe, LOGIT_SCALE * torch.einsum("bd,cbd->bc", q_in, t_moe), attn


def assert_close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def assert_grad_close(actual, expected, tol=1e-6):
    """Gradients summed over many terms reach O(10): compare to 1e-6 of their own scale (fp32 rounding)."""
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(1.0, expected.abs().max().item()))


def test_downsample_is_a_stride_not_a_pooling():
    z = torch.arange(2 * 1024, dtype=torch.float32).reshape(2, 1024)
    p = downsample(z, 128)
    assert p.shape == (2, 128)
    assert torch.equal(p[0], torch.arange(0, 1024, 8, dtype=torch.float32))
    assert torch.equal(p[1], torch.arange(1024, 2048, 8, dtype=torch.float32))
    assert torch.equal(downsample(torch.arange(512.0), 128), torch.arange(0.0, 512.0, 4.0))
    assert torch.equal(downsample(torch.arange(128.0), 128), torch.arange(128.0))


@pytest.mark.parametrize("dim, d_gate", [(1000, 128), (512, 1024), (512, 0)])
def test_downsample_rejects_bad_width(dim, d_gate):
    with pytest.raises(ValueError, match="must divide"):
        downsample(torch.zeros(3, dim), d_gate)


@pytest.mark.parametrize("dim, d_gate, heads", [(1024, 128, 8), (512, 128, 8), (64, 16, 2)])
def test_gate_matches_einsum_reference(dim, d_gate, heads):
    image, text = make_inputs(dim)
    gate = make_gate(dim, d_gate=d_gate, num_heads=heads)
    t_ref, logits_ref, _ = reference(gate, image, text, scale=10.0)
    with torch.no_grad():
        t_moe = gate(image, text)
        logits = gate.moe_logits(image, text, torch.tensor(LOGIT_SCALE))
    assert t_moe.shape == (5, 4, d_gate)
    assert logits.shape == (4, 5)
    assert_close(t_moe, t_ref)
    assert_close(logits, logits_ref)


def test_gate_matches_reference_exactly_in_float64():
    image, text = make_inputs(1024)
    gate = make_gate(1024).double()
    image, text = image.double(), text.double()
    t_ref, logits_ref, _ = reference(gate, image, text, scale=10.0)
    with torch.no_grad():
        assert_close(gate(image, text), t_ref, tol=1e-12)
        assert_close(gate.moe_logits(image, text, LOGIT_SCALE), logits_ref, tol=1e-12)


def test_fixed_scale_is_used_not_inverse_sqrt_head_dim():
    image, text = make_inputs(512)
    gate = make_gate(512)
    with torch.no_grad():
        t_moe = gate(image, text)
    t_ten, _, attn_ten = reference(gate, image, text, scale=10.0)
    t_sdpa, _, attn_sdpa = reference(gate, image, text, scale=1 / 16**0.5)
    assert_close(t_moe, t_ten)
    # The two scales give visibly different attention, hence different outputs.
    assert (attn_ten - attn_sdpa).abs().max() > 1e-2
    assert (t_moe - t_sdpa).abs().max() > 1e-4
    # A gate built with the other scale follows its own scale.
    other = make_gate(512, scale=0.25)
    with torch.no_grad():
        assert_close(other(image, text), t_sdpa)


def test_experts_are_mixed_per_class_and_order_free():
    image, text = make_inputs(512, experts=5)
    gate = make_gate(512)
    with torch.no_grad():
        base = gate(image, text)
        # Attention has no positional term: permuting the non-local experts changes nothing.
        assert_close(gate(image, text[[0, 3, 1, 4, 2]]), base)
        # Changing class 2's features of one expert changes only class 2's mixed embedding.
        edited = text.clone()
        edited[3, 2] = F.normalize(torch.randn(512), dim=-1)
        out = gate(image, edited)
    assert torch.equal(out[[0, 1, 3, 4]], base[[0, 1, 3, 4]])
    assert (out[2] - base[2]).abs().max() > 1e-4


def test_gradient_reaches_local_expert_only():
    image, text = make_inputs(1024, experts=4)
    gate = make_gate(1024)
    local = text[0].clone().requires_grad_(True)
    frozen = text[1:].clone()  # non-local experts: computed without grad
    experts = torch.cat([local.unsqueeze(0), frozen])
    weights = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))

    (gate.moe_logits(image, experts, LOGIT_SCALE) * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in gate.named_parameters()}
    local_grad = local.grad.clone()
    assert frozen.grad is None and not frozen.requires_grad

    gate.zero_grad()
    local_ref = text[0].clone().requires_grad_(True)
    _, logits_ref, _ = reference(gate, image, torch.cat([local_ref.unsqueeze(0), frozen]), scale=10.0)
    (logits_ref * weights).sum().backward()

    assert local_grad.abs().sum() > 0
    # Only the coordinates the stride keeps are reached.
    assert torch.count_nonzero(local_grad) == local_grad.shape[0] * 128
    assert local_grad.reshape(5, 128, 8)[..., 1:].abs().max() == 0
    assert_grad_close(local_grad, local_ref.grad)
    for name, p in gate.named_parameters():
        assert grads[name].abs().sum() > 0, name
        assert_grad_close(grads[name], p.grad)


def test_gradient_is_zero_for_detached_experts():
    image, text = make_inputs(512, experts=4)
    gate = make_gate(512)
    text = text.clone().requires_grad_(True)
    gate.moe_logits(image, torch.cat([text[:1], text[1:].detach()]), LOGIT_SCALE).sum().backward()
    assert text.grad[0].abs().sum() > 0
    assert torch.equal(text.grad[1:], torch.zeros(3, 5, 512))


def test_gradient_of_all_experts_when_not_detached():
    image, text = make_inputs(512, experts=3)
    gate = make_gate(512)
    text = text.clone().requires_grad_(True)
    gate(image, text).sum().backward()
    per_expert = text.grad.abs().sum(dim=(1, 2))
    assert (per_expert > 0).all()


def test_gradcheck_float64():
    image, text = make_inputs(64, batch=3, classes=2, experts=3)
    gate = make_gate(64, d_gate=16, num_heads=2).double()
    image = image.double().requires_grad_(True)
    text = text.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, t: gate.moe_logits(i, t, 3.0), (image, text))


def test_top1_is_hard_routing():
    image, text = make_inputs(512, experts=5)
    gate = make_gate(512, top_k=1)
    t_ref, logits_ref, attn = reference(gate, image, text, scale=10.0, top_k=1)
    # Exactly one expert per (class, image, head), carrying its un-renormalised softmax probability.
    assert torch.equal((attn > 0).sum(-1), torch.ones(5, 4, 8, dtype=torch.long))
    _, _, attn_full = reference(gate, image, text, scale=10.0)
    assert_close(attn.sum(-1), attn_full.max(-1).values)
    assert (attn.sum(-1) < 1 - 1e-3).any()
    with torch.no_grad():
        assert_close(gate(image, text), t_ref)
        assert_close(gate.moe_logits(image, text, LOGIT_SCALE), logits_ref)
        full_gate = make_gate(512)
        assert (gate(image, text) - full_gate(image, text)).abs().max() > 1e-4


@pytest.mark.parametrize("top_k", [2, 3])
def test_top_k_matches_reference(top_k):
    image, text = make_inputs(1024, experts=5)
    gate = make_gate(1024, top_k=top_k)
    t_ref, _, attn = reference(gate, image, text, scale=10.0, top_k=top_k)
    assert torch.equal((attn > 0).sum(-1), torch.full((5, 4, 8), top_k))
    with torch.no_grad():
        assert_close(gate(image, text), t_ref)


@pytest.mark.parametrize("top_k", [4, 7])
def test_top_k_at_least_num_experts_is_full_softmax(top_k):
    image, text = make_inputs(512, experts=4)
    gate = make_gate(512, top_k=top_k)
    t_ref, _, _ = reference(gate, image, text, scale=10.0)
    with torch.no_grad():
        assert_close(gate(image, text), t_ref)


def test_top_k_gradients_reach_gate_weights():
    image, text = make_inputs(512, experts=4)
    gate = make_gate(512, top_k=1)
    local = text[0].clone().requires_grad_(True)
    experts = torch.cat([local.unsqueeze(0), text[1:]])
    gate.moe_logits(image, experts, LOGIT_SCALE).logsumexp(-1).sum().backward()
    grads = {name: p.grad.clone() for name, p in gate.named_parameters()}
    local_grad = local.grad.clone()

    gate.zero_grad()
    local_ref = text[0].clone().requires_grad_(True)
    _, logits_ref, _ = reference(gate, image, torch.cat([local_ref.unsqueeze(0), text[1:]]), 10.0, top_k=1)
    logits_ref.logsumexp(-1).sum().backward()
    # The query and key projections only act through the routing probabilities: they must still learn.
    for name in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "v_proj.weight", "out_proj.weight"):
        assert grads[name].abs().sum() > 0, name
    for name, p in gate.named_parameters():
        assert_grad_close(grads[name], p.grad)
    assert_grad_close(local_grad, local_ref.grad)


def test_parameter_count_and_default_init():
    gate = make_gate(1024)
    assert sum(p.numel() for p in gate.parameters()) == 66_048
    assert [n for n, _ in gate.named_children()] == ["q_proj", "k_proj", "v_proj", "out_proj"]
    # Same seed, same gate, whatever the feature width (every client starts from the same init).
    twin = make_gate(512)
    for a, b in zip(gate.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 128)
    assert torch.equal(gate.q_proj.weight, layer.weight) and torch.equal(gate.q_proj.bias, layer.bias)
    bound = 1 / 128**0.5
    assert all(p.abs().max() <= bound for p in gate.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(feature_dim=1000), "d_gate=128 must divide feature_dim=1000"),
        (dict(feature_dim=64), "d_gate=128 must divide feature_dim=64"),
        (dict(feature_dim=512, num_heads=3), "num_heads=3 must divide d_gate=128"),
        (dict(feature_dim=512, top_k=0), "top_k=0"),
    ],
)
def test_bad_configuration_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionGate(**kwargs)


def test_bad_input_shapes_are_one_clear_error():
    gate = make_gate(512)
    image, text = make_inputs(512)
    with pytest.raises(ValueError, match=r"image_features must be \(B, 512\)"):
        gate(image[:, :256], text)
    with pytest.raises(ValueError, match=r"expert_text_features must be \(E, C, 512\)"):
        gate(image, text[0])
    with pytest.raises(ValueError, match="no experts"):
        gate(image, text[:0])


@pytest.mark.parametrize("top_k", [None, 1])
def test_bf16_autocast(top_k):
    image, text = make_inputs(512)
    gate = make_gate(512, top_k=top_k)
    text = text.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = gate.moe_logits(image, text, torch.tensor(LOGIT_SCALE))
    logits.float().sum().backward()
    with torch.no_grad():
        expected = gate.moe_logits(image, text, LOGIT_SCALE)
    assert logits.shape == (4, 5)
    assert torch.isfinite(text.grad).all() and gate.q_proj.weight.grad is not None
    torch.testing.assert_close(logits.float(), expected, rtol=0.05, atol=0.05)
