"""FedCLIP: the attention adapter and the CLIP contrastive loss against a re-implementation of the public code
(microsoft/PersonalizedFL, fedclip/), FedAvg of the adapter as the global model, grouped training and an
end-to-end run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlit.algorithms import build_algorithm
from fedlit.config import load_config
from fedlit.errors import UserError
from fedlit.modules.fedclip import FedCLIPClient, clip_contrastive_loss
from fedlit.state import ClientState, StoreEntry, Upload
from tests.method_checks import assert_groups_match_single, assert_run_averages_the_global_model

NAMES = ["adapter.fc1.weight", "adapter.fc1.bias", "adapter.fc2.weight", "adapter.fc2.bias"]


def public_adapter(dim: int) -> nn.Sequential:
    """``ClipModelat.initdgatal``'s ``img_adap``."""
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim), nn.Softmax(dim=1))


def public_loss(img_adap: nn.Module, image_features, text_features, logit_scale):
    """``fed_at_clip.train``'s loss for one batch (``text_features``: one prompt per image, unnormalised ok)."""
    image_features_att = img_adap(image_features)
    image_features = torch.mul(image_features_att, image_features)
    image_features = image_features / image_features.norm(dim=1, keepdim=True)
    text_features = text_features / text_features.norm(dim=1, keepdim=True)
    logits_per_image = logit_scale * image_features @ text_features.t()
    logits_per_text = logits_per_image.t()
    ground_truth = torch.arange(len(image_features), dtype=torch.long)
    return (nn.CrossEntropyLoss()(logits_per_image, ground_truth) + nn.CrossEntropyLoss()(logits_per_text,
                                                                                           ground_truth)) / 2


def _shared_weights(module: FedCLIPClient) -> nn.Sequential:
    """The public adapter holding the module's weights (perturbed away from PyTorch's init first)."""
    with torch.no_grad():
        for p in module.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    reference = public_adapter(module.adapter.fc1.in_features)
    reference[0].load_state_dict(module.adapter.fc1.state_dict())
    reference[2].load_state_dict(module.adapter.fc2.state_dict())
    return reference


def test_adapter_logits_and_loss_equal_the_public_forward(tiny_backbone, classnames):
    torch.manual_seed(0)
    module = FedCLIPClient(tiny_backbone, classnames)
    reference = _shared_weights(module)
    assert set(module.trainable_parameters()) == set(NAMES)
    texts = [f"a picture of a {n.replace('_', ' ')}" for n in classnames]  # the code's 'a picture of a' + ' ' + name
    assert torch.equal(module.text_features, tiny_backbone.encode_text(texts))
    image = F.normalize(torch.randn(8, tiny_backbone.feature_dim), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2])  # repeated classes: each other's negatives in the code too
    s = tiny_backbone.logit_scale
    logits = module(image)
    # the code's test(): similarity of the adapted features with every class prompt
    adapted = torch.mul(reference(image), image)
    expected = s * (adapted / adapted.norm(dim=-1, keepdim=True)) @ module.text_features.t()
    assert torch.allclose(logits, expected, atol=1e-6 * float(s))
    assert torch.allclose(module.adapter(image), reference(image), atol=1e-6)  # the attention weights themselves
    # evaluation scores cached features with logits_from: the adapter applies there too
    assert torch.equal(module.logits_from(image, module.class_text_features()), logits)
    assert not torch.allclose(logits, s * image @ module.text_features.t(), atol=1e-3)
    # training: one prompt per image (the batch's ``text``), symmetric cross-entropy against arange(B)
    loss = module.loss(logits, labels)
    per_image_text = tiny_backbone.encode_text([texts[y] for y in labels.tolist()])
    assert loss.item() == pytest.approx(public_loss(reference, image, per_image_text, s).item(), abs=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.adapter.parameters())
    assert all(p.grad is None for p in tiny_backbone.parameters())


def test_contrastive_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0], [0.5, 0.5]])  # 3 images, 2 classes
    labels = torch.tensor([0, 1, 0])
    pairs = logits[:, [0, 1, 0]]  # image i against image j's class prompt
    by_hand = 0.5 * (F.cross_entropy(pairs, torch.arange(3)) + F.cross_entropy(pairs.t(), torch.arange(3)))
    assert clip_contrastive_loss(logits, labels).item() == pytest.approx(by_hand.item(), abs=1e-7)
    assert clip_contrastive_loss(logits[:1], labels[:1]).item() == 0.0  # one image: nothing to contrast


def _algorithm(tmp_path, *overrides):
    return build_algorithm(load_config(None, [f"run.out_dir={tmp_path}", "algorithm=fedclip", *overrides]))


def _state(value: float) -> ClientState:
    return ClientState({n: torch.full((2, 2) if "weight" in n else (2,), value) for n in NAMES})


def test_the_global_adapter_is_the_fedavg_and_every_client_is_evaluated_with_it(tmp_path):
    algorithm = _algorithm(tmp_path)
    initial = _state(0.0)
    server = algorithm.init_server(initial)
    assert set(server.global_state) == set(NAMES)
    uploads = {0: Upload(_state(1.0), loss=0.0, steps=1), 1: Upload(_state(5.0), loss=0.0, steps=1)}
    new = algorithm.aggregate(server, uploads, {0: 1, 1: 3})
    assert new.round == 1 and all(torch.equal(v, torch.full_like(v, 4.0)) for v in new.global_state.values())
    store = {c: StoreEntry(u.state, last_round=1) for c, u in uploads.items()}
    for cid in (0, 1):
        for plan in (algorithm.plan(new, cid, store[cid], initial), algorithm.eval_plan(new, cid, store[cid], initial),
                     algorithm.global_plan(new, initial)):
            assert all(torch.equal(plan.start.params[n], new.global_state[n]) for n in NAMES)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in initial.params.values())  # not modified


def test_central_dp_clips_the_adapter_update(tmp_path):
    algorithm = _algorithm(tmp_path, "privacy.clip=0.5")
    server = algorithm.init_server(_state(0.0))
    new = algorithm.aggregate(server, {0: Upload(_state(1.0), loss=0.0, steps=1)}, {0: 1})
    update = torch.cat([new.global_state[n].reshape(-1) for n in NAMES])  # 12 coordinates of 1, clipped to 0.5
    assert float(update.norm()) == pytest.approx(0.5, abs=1e-6)
    assert torch.allclose(update, torch.full_like(update, 0.5 / 12**0.5), atol=1e-7)


@pytest.mark.parametrize("override, key", [("method.clip_adapter_lr=0", "clip_adapter_lr"),
                                           ("method.clip_adapter_lr=-1", "clip_adapter_lr"),
                                           ("method.clip_adapter_template=a picture", "clip_adapter_template")])
def test_bad_settings_are_user_errors(tmp_path, override, key):
    with pytest.raises(UserError, match=rf"method\.{key}"):
        _algorithm(tmp_path, override)


def test_grouped_training_matches_one_client_at_a_time(tmp_path):
    assert_groups_match_single(tmp_path, "fedclip", NAMES)


def test_end_to_end_run_averages_the_adapter(tmp_path):
    res = assert_run_averages_the_global_model(tmp_path, "fedclip")
    assert res["rounds"][0]["loss"] != res["rounds"][1]["loss"]
