"""Federated VPT, the reference image-side method: its module against the public VPT forward, the frozen-token cache
against the uncached path (bitwise), grouped clients against one at a time, and the one-line refusals."""

from __future__ import annotations

import pytest
import torch

from fedlit.algorithms import algorithm_class
from fedlit.backbone import load_backbone
from fedlit.config import ALGORITHMS, IMAGE_SIDE_ALGORITHMS, load_config, method_conflict, runnable_algorithms
from fedlit.data.features import TOKENS, token_kind
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.experiment import build_job, run_experiment
from fedlit.modules.vpt import VISION_PROMPT, VPTClient, split_prompt
from tests.helpers import fast_config, only_run_dir, train_cli
from tests.test_clip_vision import _reference_vpt

VPT_FAST = ["algorithm=vpt", "fed.rounds=2", "optim.prompt_lr=0.5"]


def test_image_side_algorithms_are_the_algorithms_caching_tokens():
    declared = {n for n in ALGORITHMS if getattr(algorithm_class(n), "image_feature_kind", None) == TOKENS}
    assert declared == set(IMAGE_SIDE_ALGORITHMS) and "vpt" in declared


@pytest.mark.parametrize("depth", [1, 2])
def test_vpt_logits_equal_the_public_forward(tiny_backbone, classnames, depth):
    module = VPTClient(load_backbone("tiny"), classnames, prompt={"vision_n_ctx": 3, "depth": depth}, seed=0).double()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prompt = module.vision_prompt
    assert prompt.shape == (depth, 3, 64)
    features = _reference_vpt(module.backbone.model, images, prompt[0], list(prompt[1:]))
    features = features / features.norm(dim=-1, keepdim=True)
    text = module.text_features
    expected = module.backbone.logit_scale * features @ text.T
    torch.testing.assert_close(module(images), expected, rtol=0, atol=1e-12)
    # the same logits from the frozen tokens the cache holds
    torch.testing.assert_close(module(module.frozen_image_inputs(images)), expected, rtol=0, atol=1e-12)


def test_group_logits_are_each_clients_own_logits(classnames):
    """In float64, so that the bound does not depend on the CPU's float32 summation order."""
    module = VPTClient(load_backbone("tiny"), classnames, prompt={"vision_n_ctx": 2}, seed=0).double()
    g = torch.Generator().manual_seed(3)
    prompts = torch.randn(2, *module.vision_prompt.shape, generator=g, dtype=torch.float64) * 0.5
    images = torch.randn(2, 5, 3, 32, 32, generator=g, dtype=torch.float64)
    tokens = module.frozen_image_inputs(images.flatten(0, 1)).unflatten(0, (2, 5))
    grouped = module.group_logits({VISION_PROMPT: prompts}, tokens, {})
    assert grouped.dtype == torch.float64
    for client in range(2):
        with torch.no_grad():
            module.vision_prompt.copy_(prompts[client])
        torch.testing.assert_close(grouped[client], module(tokens[client]), rtol=0, atol=1e-12)
    shallow, deep = split_prompt(prompts)
    assert shallow.shape == (2, 1, 2, 64) and len(deep) == 1


def _final(results):
    return [r["accuracy"] for r in results["rounds"]], [r["loss"] for r in results["rounds"]]


@pytest.mark.parametrize("start", [0, 1])
def test_cached_tokens_give_the_uncached_run_bitwise(tmp_path, start):
    runs = {}
    for cached in ("true", "false"):
        cfg = fast_config(tmp_path / cached, *VPT_FAST, f"perf.cache_features={cached}",
                          f"prompt.vision_start_layer={start}")
        [runs[cached]] = run_experiment(cfg)
        runs[cached + "_ckpt"] = load_checkpoint(only_run_dir(tmp_path / cached) / "checkpoint.pt")
    assert _final(runs["true"]) == _final(runs["false"])
    a, b = (runs[k + "_ckpt"]["server"]["global_state"][VISION_PROMPT] for k in ("true", "false"))
    assert torch.equal(a, b)
    assert runs["true"]["rounds"][-1]["loss"] < runs["true"]["rounds"][0]["loss"] * 1.5


def test_the_cache_holds_the_frozen_tokens_below_the_first_prompted_block(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=vpt", "prompt.vision_start_layer=1")
    job = build_job(cfg)
    kind = token_kind(1)
    assert job.data.feature_kind == kind
    tokens = job.data.train_kinds[kind]
    assert tokens.shape == (len(job.bundle.train), 17, 64)  # 16 patches + the class token, width 64
    images = torch.stack([job.bundle.train[i][0] for i in range(3)])
    assert torch.equal(tokens[:3], job.backbone.image_tokens(images, 1).float())


def test_grouped_clients_agree_with_one_at_a_time(tmp_path):
    one = run_experiment(fast_config(tmp_path / "one", *VPT_FAST, "perf.client_batch=1"))[0]
    two = run_experiment(fast_config(tmp_path / "two", *VPT_FAST, "perf.client_batch=2"))[0]
    for r1, r2 in zip(one["rounds"], two["rounds"]):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-5)
        assert r1["accuracy"] == pytest.approx(r2["accuracy"], abs=1e-6)


def test_vpt_training_lowers_the_loss_round_after_round(tmp_path):
    # random tiny CLIP: accuracy stays near chance, but the prompts inside the tower fit the training data
    vpt = run_experiment(fast_config(tmp_path, "algorithm=vpt", "fed.rounds=3", "fed.local_epochs=3",
                                     "optim.prompt_lr=0.05", "prompt.vision_n_ctx=4"))[0]
    losses = [r["loss"] for r in vpt["rounds"]]
    assert losses[0] > losses[1] > losses[2], losses


def test_checkpointed_activations_give_the_same_numbers(tmp_path):
    plain = run_experiment(fast_config(tmp_path / "a", *VPT_FAST))[0]
    checkpointed = run_experiment(fast_config(tmp_path / "b", *VPT_FAST, "perf.checkpoint_activations=true"))[0]
    assert _final(plain) == _final(checkpointed)


@pytest.mark.parametrize("overrides, message", [
    (["backbone.name=RN50", "backbone.pretrained=random"],
     "algorithm=vpt puts prompt tokens inside the image tower, which needs a ViT with class-token pooling; "
     "backbone RN50 has none"),
    (["prompt.vision_start_layer=2"], "prompt.vision_start_layer=2 but backbone tiny has 2 image-tower layers (0..1)"),
    (["prompt.vision_start_layer=1", "prompt.depth=2"],
     "prompt.depth=2 layers from prompt.vision_start_layer=1 exceed the 2 image-tower layers of backbone tiny"),
    (["perf.augmented_views=2"], "perf.augmented_views caches image features of augmented views, but algorithm=vpt"),
])
def test_bad_image_side_settings_are_one_line_before_anything_is_written(tmp_path, overrides, message):
    done = train_cli("backbone.name=tiny", "algorithm=vpt", f"run.out_dir={tmp_path}", *overrides)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "default").exists()


def test_algorithm_all_on_a_resnet_leaves_the_image_side_methods_out():
    cfg = load_config(None, ["algorithm=all", "backbone.name=RN50", "backbone.pretrained=random"])
    assert not set(IMAGE_SIDE_ALGORITHMS) & set(runnable_algorithms(cfg))
    assert method_conflict(cfg, "promptfl") is None
    vit = load_config(None, ["algorithm=all", "backbone.name=ViT-B-16", "backbone.pretrained=random"])
    assert set(IMAGE_SIDE_ALGORITHMS) <= set(runnable_algorithms(vit))


def test_image_activation_estimate_counts_blocks_tokens_and_checkpointing(tiny_backbone, classnames):
    from fedlit.federation.trainer import image_activation_bytes
    from fedlit.modules import ZeroShotClient

    module = VPTClient(tiny_backbone, classnames, prompt={"vision_n_ctx": 2})
    tokens, width, heads, blocks = 17 + 2, 64, 2, 2  # tiny: 16 patches + class token, 2 prompt tokens, 2 blocks
    assert image_activation_bytes(module) == 4 * blocks * tokens * (18 * width + 2 * heads * tokens)
    module.checkpoint_activations = True
    assert image_activation_bytes(module) == 4 * blocks * tokens * width
    module.image_passes = 5  # FedMGP: once per prompt group
    assert image_activation_bytes(module) == 5 * 4 * blocks * tokens * width
    assert image_activation_bytes(ZeroShotClient(tiny_backbone, classnames)) == 0
