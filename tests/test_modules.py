"""Client LightningModules: logits, parameter counts, frozen backbone, optimisers, state, FedProx, training."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedlit.config import GateConfig, OptimConfig, PromptConfig
from fedlit.modules import CoOpClient, PFedMoAPClient, ZeroShotClient
from fedlit.modules.base import cosine_factor

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_GATE = GateConfig(d_gate=16)  # tiny D = 64 -> keep every 4th coordinate, 8 heads of 2


def tiny_moap(backbone, classnames, experts: int = 3, lam: float = 0.5, seed: int = 0, **kwargs) -> PFedMoAPClient:
    torch.manual_seed(seed)  # gate init draws from the global RNG
    module = PFedMoAPClient(backbone, classnames, gate=TINY_GATE, lam=lam, seed=seed, **kwargs)
    if experts:
        gen = torch.Generator().manual_seed(seed + 100)
        module.load_experts(torch.randn(experts, *module.prompt_learner.ctx_shape, generator=gen) * 0.02)
    return module


def image_features(batch: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def backbone_snapshot(backbone) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the frozen backbone (non-persistent ones included), cloned."""
    tensors = dict(backbone.named_parameters())
    tensors.update({f"buffer:{n}": b for n, b in backbone.named_buffers()})
    return {n: t.detach().clone() for n, t in tensors.items()}


def assert_unchanged(backbone, snapshot: dict[str, torch.Tensor]) -> None:
    now = backbone_snapshot(backbone)
    assert now.keys() == snapshot.keys()
    changed = [n for n in now if not torch.equal(now[n], snapshot[n])]
    assert not changed, changed
    assert all(p.grad is None for p in backbone.parameters())
    assert not any(m.training for m in backbone.modules())


def fit(module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int = 16) -> L.Trainer:
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the dataloader does not have many workers", "srun is available", ...
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, loader)
    return trainer


@torch.no_grad()
def accuracy(module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (module(x).argmax(dim=-1) == y).float().mean().item()


def separable_features(num_classes: int = 4, per_class: int = 16, noise: float = 0.3, seed: int = 1):
    """Cached image features ``(N, 64)``: a random unit prototype per class plus Gaussian noise, normalised."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(num_classes, 64, generator=gen), dim=-1)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = F.normalize(prototypes[y] + noise * torch.randn(len(y), 64, generator=gen), dim=-1)
    return x, y


# -- parameter counts ----------------------------------------------------------------------------------------
def test_pfedmoap_trainable_parameters_vitb32(vitb32_backbone, classnames):
    module = PFedMoAPClient(vitb32_backbone, classnames)
    params = module.trainable_parameters()
    ctx = module.prompt_learner.ctx
    assert ctx.shape == (16, 512)
    assert sum(p.numel() for p in params.values()) == ctx.numel() + 66_048 == 74_240
    assert sum(p.numel() for n, p in params.items() if n.startswith("gate.")) == 66_048
    gate_names = {f"gate.{proj}.{kind}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
                  for kind in ("weight", "bias")}
    assert set(params) == {"prompt_learner.ctx"} | gate_names
    # The optimiser sees exactly these tensors, never the backbone's.
    opt = module.configure_optimizers()["optimizer"]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params.values()}


def test_coop_trainable_parameters(tiny_backbone, classnames):
    module = CoOpClient(tiny_backbone, classnames, prompt=PromptConfig(n_ctx=8, class_specific=True))
    assert {n: tuple(p.shape) for n, p in module.trainable_parameters().items()} == {
        "prompt_learner.ctx": (3, 8, 64)
    }


# -- frozen backbone ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_backbone_bit_identical_after_optimisation_step(tower, tiny_backbone, tiny_resnet_factory, classnames):
    backbone = tiny_backbone if tower == "vit" else tiny_resnet_factory()
    module = tiny_moap(backbone, classnames)
    snapshot = backbone_snapshot(backbone)
    ctx_before = module.prompt_learner.ctx.detach().clone()
    gate_before = module.gate.q_proj.weight.detach().clone()
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()  # what Lightning does before fitting; the backbone must stay in eval mode
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(2):
        optimizer.zero_grad()
        module.loss(module(images), labels).backward()
        optimizer.step()
    assert not torch.equal(module.prompt_learner.ctx, ctx_before)
    assert not torch.equal(module.gate.q_proj.weight, gate_before)
    assert_unchanged(backbone, snapshot)
    if tower == "resnet":
        assert any("running_mean" in n for n in snapshot)  # BatchNorm statistics were among the checked buffers


def test_resnet_backbone_untouched_by_lightning_fit(tiny_resnet_factory):
    # Lightning 2.x does not call module.train() in fit; it keeps (and restores) each submodule's flag, so what
    # protects the BatchNorm statistics here is that the backbone is built in eval mode.
    backbone = tiny_resnet_factory()
    module = tiny_moap(backbone, ["a", "b", "c", "d"], experts=2)
    snapshot = backbone_snapshot(backbone)
    ctx_before = module.prompt_learner.ctx.detach().clone()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fit(module, images, torch.arange(4).repeat(2), epochs=1, batch_size=4)
    assert not torch.equal(module.prompt_learner.ctx, ctx_before)
    assert_unchanged(backbone, snapshot)


# -- optimisers -----------------------------------------------------------------------------------------------
def test_configure_optimizers_sgd_cosine_prompt_constant_gate(tiny_backbone, classnames):
    epochs = 5
    module = tiny_moap(tiny_backbone, classnames, epochs=epochs)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    assert isinstance(optimizer, torch.optim.SGD)
    prompt_group, gate_group = optimizer.param_groups
    for group in (prompt_group, gate_group):
        assert group["momentum"] == 0.9 and group["weight_decay"] == 5e-4
    assert prompt_group["params"] == [module.prompt_learner.ctx]
    assert len(gate_group["params"]) == 8
    optimizer.step()  # no gradients: parameters untouched, and no "scheduler before optimizer" warning
    for epoch in range(epochs + 1):
        assert prompt_group["lr"] == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi * epoch / epochs)), rel=1e-12)
        assert gate_group["lr"] == 0.01
        scheduler.step()
    assert cosine_factor(0, epochs) == 1.0 and cosine_factor(epochs, epochs) == 0.0
    assert cosine_factor(epochs + 3, epochs) == 0.0  # past the end it stays at zero instead of rising again


def test_configure_optimizers_custom_values_and_coop(tiny_backbone, classnames):
    optim = OptimConfig(prompt_lr=0.1, gate_lr=0.3, momentum=0.5, weight_decay=0.0)
    coop = CoOpClient(tiny_backbone, classnames, optim=optim, epochs=2)
    (group,) = coop.configure_optimizers()["optimizer"].param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.5, 0.0)
    assert ZeroShotClient(tiny_backbone, classnames).configure_optimizers() is None


# -- pFedMoAP logits ------------------------------------------------------------------------------------------
def test_pfedmoap_without_experts_gives_local_logits(tiny_backbone, classnames):
    module = tiny_moap(tiny_backbone, classnames, experts=0)
    assert module.num_loaded_experts == 0
    feats = image_features(5)
    with torch.no_grad():
        text = module.prompt_learner.text_features(tiny_backbone)
        expected = tiny_backbone.logit_scale * feats @ text.t()
        assert torch.equal(module(feats), expected)
        coop = CoOpClient(tiny_backbone, classnames, seed=0)
        assert torch.equal(coop(feats), expected)  # same seed, same prompt: PromptFL's logits


def test_pfedmoap_with_experts_mixes_local_and_gate(tiny_backbone, classnames):
    module = tiny_moap(tiny_backbone, classnames, experts=3, lam=0.25)
    assert module.num_loaded_experts == 3 and module.expert_features.shape == (3, 3, 64)
    assert not module.expert_features.requires_grad
    feats = image_features(5)
    with torch.no_grad():
        local_text = module.prompt_learner.text_features(tiny_backbone)
        s = tiny_backbone.logit_scale
        local = s * feats @ local_text.t()
        experts = torch.cat([local_text.unsqueeze(0), module.expert_features])
        expected = 0.25 * local + module.gate.moe_logits(feats, experts, s)
        logits = module(feats)
    assert torch.equal(logits, expected)
    assert (logits - local).abs().max() > 1e-3  # the gate term is really there
    module.load_experts(None)
    with torch.no_grad():
        assert torch.equal(module(feats), local)


def test_expert_features_are_the_experts_prompt_features(tiny_backbone, classnames):
    module = tiny_moap(tiny_backbone, classnames, experts=0)
    experts = torch.stack([torch.randn(module.prompt_learner.ctx_shape) * 0.02 for _ in range(2)])
    module.load_experts(experts)
    with torch.no_grad():
        for k in range(2):
            torch.testing.assert_close(module.expert_features[k],
                                       module.prompt_learner.text_features(tiny_backbone, experts[k]),
                                       rtol=0, atol=1e-6)


def test_gradient_reaches_ctx_through_local_and_gate_paths(tiny_backbone, classnames):
    feats = image_features(6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    def ctx_grad(lam: float, experts: int) -> torch.Tensor:
        module = tiny_moap(tiny_backbone, classnames, experts=experts, lam=lam)
        module.loss(module(feats), labels).backward()
        return module.prompt_learner.ctx.grad

    local_only = ctx_grad(1.0, experts=0)
    gate_only = ctx_grad(0.0, experts=3)  # lam = 0: ctx is reached only through the gate's local expert
    assert local_only.abs().sum() > 0
    assert gate_only is not None and gate_only.abs().sum() > 0 and torch.isfinite(gate_only).all()

    # Both paths at once: d/dctx of (local + moe) summed over a linear loss is the sum of the two gradients.
    module = tiny_moap(tiny_backbone, classnames, experts=3, lam=1.0)
    text = module.class_text_features()
    local = module.backbone.logit_scale * feats @ text.t()
    experts = torch.cat([text.unsqueeze(0), module.expert_features])
    moe = module.gate.moe_logits(feats, experts, module.backbone.logit_scale)
    g_local, = torch.autograd.grad(local.sum(), module.prompt_learner.ctx, retain_graph=True)
    g_moe, = torch.autograd.grad(moe.sum(), module.prompt_learner.ctx, retain_graph=True)
    g_all, = torch.autograd.grad(module.logits_from(feats, text).sum(), module.prompt_learner.ctx)
    assert g_local.abs().sum() > 0 and g_moe.abs().sum() > 0
    # Equal up to float32 summation order (the two upstream gradients meet before the text tower in g_all).
    torch.testing.assert_close(g_all, g_local + g_moe, rtol=0, atol=1e-6 * g_all.abs().max().item())


# -- client state ---------------------------------------------------------------------------------------------
def test_client_state_round_trip(tiny_backbone, classnames):
    module = tiny_moap(tiny_backbone, classnames, seed=0)
    state = module.client_state()
    assert set(state) == set(module.trainable_parameters())
    assert not any(n.startswith("backbone.") for n in state)
    assert all(not t.requires_grad for t in state.values())
    feats = image_features(4)
    with torch.no_grad():
        before = module(feats)
        for p in module.trainable_parameters().values():
            p.add_(1.0)  # the saved state is a copy, not a view
        assert not torch.equal(module(feats), before)
    module.load_client_state(state)
    for name, value in module.client_state().items():
        assert torch.equal(value, state[name]), name
    with torch.no_grad():
        assert torch.equal(module(feats), before)

    # Into a different client (other seed -> other prompt and gate) that holds the same experts.
    other = tiny_moap(tiny_backbone, classnames, seed=5)
    other.set_expert_features(module.expert_features)
    other.load_client_state(state)
    with torch.no_grad():
        assert torch.equal(other(feats), before)
    with pytest.raises(KeyError, match="unknown client state entries"):
        other.load_client_state({"backbone.model.logit_scale": torch.zeros(())})


# -- FedProx --------------------------------------------------------------------------------------------------
def test_fedprox_regularizer_value_and_gradient(tiny_backbone, classnames):
    mu = 0.01
    module = CoOpClient(tiny_backbone, classnames, prox_mu=mu, seed=0)
    assert module.regularizer() is None  # no centre yet
    center = torch.randn(16, 64, generator=torch.Generator().manual_seed(9)) * 0.02
    module.set_prox_center(center)
    ctx = module.prompt_learner.ctx
    value = module.regularizer()
    expected = mu / 2 * (ctx.detach().double() - center.double()).pow(2).sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    assert torch.equal(ctx.grad, mu * (ctx.detach() - center))

    feats, labels = image_features(4), torch.tensor([0, 1, 2, 0])
    logits = module(feats)
    assert torch.equal(module.loss(logits, labels), F.cross_entropy(logits, labels) + module.regularizer())
    module.set_prox_center(None)
    assert module.regularizer() is None
    assert CoOpClient(tiny_backbone, classnames, prox_mu=0.0).regularizer() is None


# -- zero-shot ------------------------------------------------------------------------------------------------
def test_zeroshot_logits(tiny_backbone, classnames):
    module = ZeroShotClient(tiny_backbone, classnames)
    assert module.trainable_parameters() == {}
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        img = F.normalize(tiny_backbone.model.encode_image(images), dim=-1)
        tokens = tiny_backbone.tokenize(["a photo of a cat.", "a photo of a golden retriever.",
                                         "a photo of a sea turtle."])
        text = F.normalize(tiny_backbone.model.encode_text(tokens), dim=-1)
        expected = tiny_backbone.logit_scale * img @ text.t()
        torch.testing.assert_close(module(images), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(module(img), expected, rtol=0, atol=1e-5)  # cached features take the same path
        custom = ZeroShotClient(tiny_backbone, classnames, template="itap of a {}.")
        assert (custom.text_features - module.text_features).abs().max() > 1e-3


# -- training with a plain Lightning Trainer ------------------------------------------------------------------
def test_pfedmoap_trains_with_lightning_trainer(tiny_backbone):
    names = ["cat", "dog", "car", "tree"]
    x, y = separable_features()
    module = tiny_moap(tiny_backbone, names, experts=3, prompt=PromptConfig(class_specific=True))
    snapshot = backbone_snapshot(tiny_backbone)
    gate_before = {n: p.detach().clone() for n, p in module.gate.named_parameters()}
    experts_before = module.expert_features.clone()
    before = accuracy(module, x, y)
    trainer = fit(module, x, y, epochs=5)
    after = accuracy(module, x, y)
    print(f"pFedMoAP train accuracy {before:.3f} -> {after:.3f}")
    assert before <= 0.3 and after >= 0.85, (before, after)  # chance is 0.25
    assert trainer.callback_metrics["train_acc"] >= 0.8
    assert all(not torch.equal(p, gate_before[n]) for n, p in module.gate.named_parameters())
    assert torch.equal(module.expert_features, experts_before)  # experts are frozen
    assert_unchanged(tiny_backbone, snapshot)
    # Lightning stepped the epoch scheduler: after 5 of 5 epochs the cosine prompt lr is 0, the gate lr unchanged.
    prompt_group, gate_group = trainer.optimizers[0].param_groups
    assert prompt_group["lr"] == pytest.approx(0.0, abs=1e-12) and gate_group["lr"] == 0.01


def test_coop_trains_with_lightning_trainer(tiny_backbone):
    names = ["cat", "dog", "car", "tree"]
    x, y = separable_features()
    torch.manual_seed(0)
    module = CoOpClient(tiny_backbone, names, prompt=PromptConfig(class_specific=True), seed=0)
    before = accuracy(module, x, y)
    fit(module, x, y, epochs=5)
    after = accuracy(module, x, y)
    print(f"CoOp train accuracy {before:.3f} -> {after:.3f}")
    assert before <= 0.3 and after >= 0.85, (before, after)


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_gate", [48, 128, 0])
def test_gate_width_must_divide_feature_width(tiny_backbone, classnames, d_gate):
    with pytest.raises(ValueError, match=f"d_gate={d_gate} must divide feature_dim=64") as err:
        PFedMoAPClient(tiny_backbone, classnames, gate=GateConfig(d_gate=d_gate))
    assert "\n" not in str(err.value)


def test_prompt_config_errors_surface_through_modules(tiny_backbone, classnames):
    for prompt in (PromptConfig(n_ctx=0), PromptConfig(ctx_init="False"), PromptConfig(class_specific="yes")):
        with pytest.raises(ValueError) as err:
            CoOpClient(tiny_backbone, classnames, prompt=prompt)
        assert "\n" not in str(err.value) and "prompt." in str(err.value)
