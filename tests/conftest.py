"""Shared fixtures: frozen backbones built once per session with seeded random weights (no download)."""

from __future__ import annotations

import open_clip
import pytest
import torch

from fedlit.backbone import Backbone, _preprocess_of, load_backbone

# Class names with an underscore and a multi-token name, so that cleaning and class-token lengths matter.
CLASSNAMES = ["cat", "golden_retriever", "sea turtle"]


def _seeded(build, seed: int):
    """Run ``build()`` under ``torch.manual_seed(seed)`` without disturbing the caller's global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


@pytest.fixture(scope="session")
def classnames() -> list[str]:
    return list(CLASSNAMES)


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    """The random ``tiny`` CLIP (ViT tower, D = W = 64), seed 0."""
    return _seeded(lambda: load_backbone("tiny"), 0)


@pytest.fixture(scope="session")
def vitb32_backbone() -> Backbone:
    """A randomly initialised open_clip ``ViT-B-32`` (D = W = 512); about 1-2 s to build, nothing downloaded."""
    return _seeded(lambda: load_backbone("ViT-B-32", pretrained="random"), 0)


def build_tiny_resnet(seed: int = 0) -> Backbone:
    """A random CLIP with a small ModifiedResNet image tower (BatchNorm buffers) and a 1-layer text tower."""

    def build() -> Backbone:
        model = open_clip.CLIP(
            embed_dim=64,
            vision_cfg=dict(image_size=32, layers=(1, 1, 1, 1), width=16, head_width=16),
            text_cfg=dict(width=64, heads=2, layers=1),
        )
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        return Backbone(model, tokenizer, "tiny-resnet", f"tiny-resnet:random:{seed}", _preprocess_of(model))

    return _seeded(build, seed)


def build_mixed_vit(seed: int = 0) -> Backbone:
    """A random ViT CLIP whose text (32) and vision (64) widths differ, three blocks per tower: image-side prompt
    methods' text-to-vision maps (MaPLe's coupling) are real ``Linear(32, 64)`` layers and depth 3 has deep prompts."""

    def build() -> Backbone:
        model = open_clip.CLIP(
            embed_dim=48,
            vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=3, head_width=32),
            text_cfg=dict(width=32, heads=2, layers=3),
        )
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        return Backbone(model, tokenizer, "mixed-vit", f"mixed-vit:random:{seed}", _preprocess_of(model))

    return _seeded(build, seed)


@pytest.fixture(scope="session")
def tiny_resnet_factory():
    """Builds a fresh tiny ResNet-tower backbone (about 0.1 s) for tests that must not share one."""
    return build_tiny_resnet


@pytest.fixture
def single_thread():
    """One intra-op thread for the test: the tensors are tiny, and on a busy 2-core machine thread barriers
    cost far more than the arithmetic. The previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
