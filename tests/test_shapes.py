"""The offline default: generated shapes and the tiny CLIP pretrained on them."""

from __future__ import annotations

import dataclasses
import math
import os

import open_clip
import pytest
import torch

from fedlit import pretrain
from fedlit.backbone import Backbone, load_backbone
from fedlit.config import DataConfig
from fedlit.data.base import Preprocess
from fedlit.data.shapes import (
    SHAPES_CLASSNAMES,
    SHAPES_COLORS,
    SHAPES_SHAPES,
    SHAPES_TEMPLATES,
    SHAPES_TEST_SEED,
    build_shapes,
    generate_shapes,
    render_shapes,
    shapes_captions,
)
from fedlit.errors import UserError
from fedlit.io import default_cache_dir
from fedlit.pretrain import (
    DEFAULT_RECIPE,
    SHAPES_CLIP_PREPROCESS,
    ShapesClipRecipe,
    build_shapes_clip,
    contrastive_loss,
    encode_text_cut,
    load_shapes_clip,
    normalize_images,
    recipe_hash,
    shapes_clip_path,
)
from fedlit.sanity import zero_shot_accuracy

TINY = ShapesClipRecipe(embed_dim=32, patch_size=8, vision_width=32, vision_layers=1, vision_head_width=16,
                        text_width=32, text_heads=2, text_layers=1, steps=3, batch_size=8, warmup_steps=1)


def _foreground(images: torch.Tensor) -> torch.Tensor:
    """Mask ``(N, H, W)`` of saturated pixels: the shape (the background is a near-grey)."""
    return (images.amax(1) - images.amin(1)) > 0.3


# --- generation -----------------------------------------------------------------------------------------

def test_classnames_are_colour_by_shape_in_label_order():
    assert len(SHAPES_CLASSNAMES) == 32 == len(SHAPES_COLORS) * len(SHAPES_SHAPES)
    assert SHAPES_CLASSNAMES[:5] == ["red circle", "red square", "red triangle", "red cross", "orange circle"]
    assert len(set(SHAPES_CLASSNAMES)) == 32


def test_generate_is_deterministic_per_seed():
    labels = torch.arange(32)
    a, b, c = generate_shapes(labels, 7), generate_shapes(labels, 7), generate_shapes(labels, 8)
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.equal(a, c)
    assert (a - c).abs().mean() > 0.05


def test_rendering_in_chunks_changes_no_pixel():
    labels = torch.arange(32).repeat_interleave(3)  # 96 images: chunks of 7 end mid-class and leave a remainder
    whole = render_shapes(labels, torch.Generator().manual_seed(3), chunk=10_000)
    assert torch.equal(render_shapes(labels, torch.Generator().manual_seed(3), chunk=7), whole)
    assert torch.equal(generate_shapes(labels, 3), whole)


def test_generate_shape_dtype_range():
    images = generate_shapes(torch.tensor([0, 31, 5]), 0)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert generate_shapes(torch.tensor([3]), 0, image_size=48).shape == (1, 3, 48, 48)
    assert generate_shapes(torch.zeros(0, dtype=torch.long), 0).shape == (0, 3, 32, 32)


def test_generate_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels must lie in"):
        generate_shapes(torch.tensor([32]), 0)
    with pytest.raises(ValueError, match="1-D integer"):
        generate_shapes(torch.tensor([0.5]), 0)


def test_foreground_colour_is_the_class_colour():
    labels = torch.arange(32).repeat_interleave(8)
    images = generate_shapes(labels, 3)
    fg = _foreground(images)
    assert (fg.flatten(1).sum(1) >= 10).all()  # every image shows its shape
    mean_rgb = (images * fg[:, None]).flatten(2).sum(2) / fg.flatten(1).sum(1, keepdim=True)  # (N, 3)
    palette = torch.tensor(list(SHAPES_COLORS.values()))
    nearest = torch.cdist(mean_rgb, palette).argmin(1)
    assert torch.equal(nearest, labels // len(SHAPES_SHAPES))
    red = mean_rgb[labels // len(SHAPES_SHAPES) == 0]
    assert (red[:, 0] > 0.75).all() and (red[:, 1:] < 0.3).all()


def test_shape_areas_follow_their_geometry():
    # The random draws do not depend on the labels, so the same seed puts every shape kind at the same
    # position and size: the areas must order as circle (pi r^2) > square (2.56 r^2) > cross (2.15 r^2)
    # > triangle (1.72 r^2).
    n = 64
    areas = [_foreground(generate_shapes(torch.full((n,), s), 11)).float().sum().item()
             for s in range(len(SHAPES_SHAPES))]
    circle, square, triangle, cross = areas
    assert circle > square > cross > triangle
    # clipping at the image border shaves a little off the corners; otherwise the ratios are exact
    assert [a / circle for a in areas] == pytest.approx([1.0, 2.56 / math.pi, 1.72 / math.pi, 2.15 / math.pi],
                                                       rel=0.05)


def test_captions_come_from_templates():
    labels = torch.tensor([0, 5, 31, 31])
    caps = shapes_captions(labels, 0)
    assert caps == shapes_captions(labels, 0)
    for cap, label in zip(caps, labels.tolist()):
        assert cap in {t.format(SHAPES_CLASSNAMES[label]) for t in SHAPES_TEMPLATES}
    assert len(set(shapes_captions(torch.zeros(64, dtype=torch.long), 1))) > 1


# --- dataset bundle -------------------------------------------------------------------------------------

def test_build_shapes_bundle():
    cfg = DataConfig(train_per_class=3, test_per_class=2)
    bundle = build_shapes(cfg, SHAPES_CLIP_PREPROCESS)
    assert bundle.name == "shapes" and bundle.classnames == SHAPES_CLASSNAMES and bundle.num_classes == 32
    assert len(bundle.train) == 96 and len(bundle.test) == 64
    assert bundle.train.targets.tolist() == [c for c in range(32) for _ in range(3)]
    assert bundle.test.targets.tolist() == [c for c in range(32) for _ in range(2)]
    assert bundle.augmented is False and bundle.transform_id
    image, label = bundle.train[4]
    assert label == 1 and image.shape == (3, 32, 32)
    raw = bundle.train.load_image(4)
    assert torch.equal(image, normalize_images(raw[None])[0])
    # train and test are different draws; the data does not depend on anything but the sizes
    assert not torch.equal(bundle.train.load_image(0), bundle.test.load_image(0))
    again = build_shapes(cfg, SHAPES_CLIP_PREPROCESS)
    assert torch.equal(again.test.images, bundle.test.images)


def test_build_shapes_resizes_and_keys_the_transform():
    cfg = DataConfig(train_per_class=1, test_per_class=1)
    big = Preprocess(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    bundle = build_shapes(cfg, big)
    assert bundle.test[0][0].shape == (3, 64, 64)
    assert bundle.transform_id != build_shapes(cfg, SHAPES_CLIP_PREPROCESS).transform_id
    assert bundle.transform_id == build_shapes(cfg, big).transform_id
    with pytest.raises(ValueError, match="train_per_class"):
        build_shapes(DataConfig(train_per_class=0), SHAPES_CLIP_PREPROCESS)


# --- pretraining ----------------------------------------------------------------------------------------

def test_recipe_hash_is_stable_and_covers_every_field():
    assert recipe_hash(DEFAULT_RECIPE) == recipe_hash(ShapesClipRecipe())
    assert len(recipe_hash(DEFAULT_RECIPE)) == 16
    hashes = {recipe_hash(DEFAULT_RECIPE)}
    for f in dataclasses.fields(ShapesClipRecipe):
        value = getattr(DEFAULT_RECIPE, f.name)
        hashes.add(recipe_hash(dataclasses.replace(DEFAULT_RECIPE, **{f.name: value * 2 + 1})))
    assert len(hashes) == len(dataclasses.fields(ShapesClipRecipe)) + 1


def test_encode_text_cut_equals_encode_text():
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY.model_cfg()).eval()
    tokens = open_clip.tokenize(["a photo of a red circle.", "a blue cross.", "a shape."])
    with torch.no_grad():
        torch.testing.assert_close(encode_text_cut(model, tokens), model.encode_text(tokens), atol=1e-5, rtol=1e-5)


def test_contrastive_loss_is_clip_loss_when_labels_are_distinct():
    torch.manual_seed(0)
    img, txt = torch.randn(6, 16), torch.randn(6, 16)
    scale = torch.tensor(20.0)
    expected = open_clip.ClipLoss()(torch.nn.functional.normalize(img, dim=-1),
                                    torch.nn.functional.normalize(txt, dim=-1), scale)
    torch.testing.assert_close(contrastive_loss(img, txt, scale, torch.arange(6)), expected)
    # with repeated labels every same-class pair is a positive: a perfect class-level match costs ln(2)
    labels = torch.tensor([0, 0, 1, 1])
    feats = torch.nn.functional.one_hot(labels, 2).float()
    loss = contrastive_loss(feats, feats, torch.tensor(1000.0), labels)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """The TINY recipe built once into a fresh cache dir."""
    return build_shapes_clip(tmp_path_factory.mktemp("cache"), TINY, progress=False)


def test_build_caches_and_reuses(tiny_file, monkeypatch):
    assert tiny_file.name == f"shapes-clip-{recipe_hash(TINY)}.pt" and tiny_file.is_file()
    assert not list(tiny_file.parent.glob("*.tmp"))
    mtime = os.stat(tiny_file).st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached file should have been reused")

    monkeypatch.setattr(pretrain, "train_shapes_clip", no_training)
    assert build_shapes_clip(tiny_file.parent, TINY) == tiny_file
    assert os.stat(tiny_file).st_mtime_ns == mtime

    model = load_shapes_clip(tiny_file.parent, TINY)
    assert not model.training
    saved = torch.load(tiny_file, weights_only=True)
    assert saved["recipe"] == dataclasses.asdict(TINY) and saved["model_cfg"] == TINY.model_cfg()
    state = model.state_dict()
    assert state.keys() == saved["state_dict"].keys()
    assert all(torch.equal(state[k], saved["state_dict"][k]) for k in state)


def test_same_recipe_gives_same_weights(tiny_file, tmp_path, capsys):
    path = build_shapes_clip(tmp_path, TINY, progress=True)
    shown = capsys.readouterr()
    assert "[shapes-clip] built in" in shown.out and shown.err == ""  # the step bar: only on a terminal
    a = torch.load(tiny_file, weights_only=True)["state_dict"]
    b = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = open_clip.CLIP(**TINY.model_cfg()).state_dict()
    assert not torch.equal(a["text_projection"], init["text_projection"])  # it did train


def test_pretraining_bar_is_drawn_on_a_terminal(tiny_file, tmp_path, capsys, monkeypatch):
    from fedlit import progress

    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    path = build_shapes_clip(tmp_path, TINY, progress=True)
    err = capsys.readouterr().err
    assert "shapes-clip pretraining:" in err and f"/{TINY.steps} " in err and err.endswith("\r")  # drawn, removed
    b = torch.load(path, weights_only=True)["state_dict"]
    a = torch.load(tiny_file, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the bar changes nothing


def test_load_rejects_a_file_of_another_recipe(tiny_file, tmp_path):
    payload = torch.load(tiny_file, weights_only=True)
    payload["recipe_hash"] = "0" * 16
    torch.save(payload, tmp_path / tiny_file.name)
    with pytest.raises(UserError, match="delete it to rebuild"):
        load_shapes_clip(tmp_path, TINY)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04 truncated zip"])
def test_load_rejects_a_corrupt_cached_file(tmp_path, content):
    shapes_clip_path(tmp_path, TINY).write_bytes(content)
    with pytest.raises(UserError, match=r"cannot load the cached shapes-clip weights .*shapes-clip-.*\.pt "
                                        r"\(.*\); delete it to rebuild"):
        load_shapes_clip(tmp_path, TINY)


def test_default_cache_dir_honours_fedlit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLIT_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" == pretrain.default_cache_dir()
    monkeypatch.delenv("FEDLIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "fedlit"


def test_zero_shot_accuracy_matches_a_direct_computation(tiny_file):
    """fedlit.sanity.zero_shot_accuracy (the one zero-shot accuracy) on the TINY recipe's CLIP equals open_clip's own
    full-length encode_text / encode_image computation."""
    model = load_shapes_clip(tiny_file.parent, TINY)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    backbone = Backbone(model, tokenizer, "shapes-clip", "tiny-recipe", SHAPES_CLIP_PREPROCESS)
    labels = torch.arange(32).repeat(2)
    images = normalize_images(generate_shapes(labels, 0))
    with torch.no_grad():
        text = model.encode_text(open_clip.tokenize([f"a {c}." for c in SHAPES_CLASSNAMES]))
        pred = (torch.nn.functional.normalize(model.encode_image(images), dim=-1)
                @ torch.nn.functional.normalize(text, dim=-1).T).argmax(-1)
    expected = (pred == labels).sum().item() / len(labels)
    got = zero_shot_accuracy(backbone, SHAPES_CLASSNAMES, backbone.encode_image(images), labels, "a {}.")
    assert got == expected
    assert 0 < got < 1  # a real measurement: some right, some wrong


@pytest.mark.slow
def test_default_recipe_zero_shot_well_above_chance():
    """Builds (or reuses) the default backbone in the real cache dir; also warms the cache for later tests."""
    backbone = load_backbone("shapes-clip", cache_dir=default_cache_dir())
    labels = torch.arange(32).repeat_interleave(32)
    images = normalize_images(generate_shapes(labels, SHAPES_TEST_SEED))  # never seen in pretraining
    accuracy = zero_shot_accuracy(backbone, SHAPES_CLASSNAMES, backbone.encode_image(images), labels)
    assert accuracy >= 0.30, f"zero-shot {accuracy:.3f} on 32 classes (chance 0.031)"


def test_shapes_brightness_darkens_every_image_and_keys_the_transform():
    pre = Preprocess(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    plain = build_shapes(DataConfig(train_per_class=2, test_per_class=1), pre)
    dark = build_shapes(DataConfig(train_per_class=2, test_per_class=1, shapes_brightness=0.5), pre)
    assert torch.equal(dark.train.images, plain.train.images * 0.5)
    assert torch.equal(dark.test.images, plain.test.images * 0.5)
    assert dark.transform_id != plain.transform_id
    with pytest.raises(ValueError, match="shapes_brightness must be in"):
        build_shapes(DataConfig(shapes_brightness=0.0), pre)


def test_shapes_augment_makes_the_train_transform_random():
    plain = build_shapes(DataConfig(train_per_class=2, test_per_class=1), SHAPES_CLIP_PREPROCESS)
    aug = build_shapes(DataConfig(train_per_class=2, test_per_class=1, augment=True), SHAPES_CLIP_PREPROCESS)
    assert aug.augmented is True and plain.augmented is False
    assert aug.transform_id == plain.transform_id  # the (deterministic) test transform keys the feature cache
    torch.manual_seed(0)
    first, second = aug.train[5][0], aug.train[5][0]
    assert first.shape == (3, 32, 32) and not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(aug.train[5][0], first)  # the randomness is torch's global RNG
    assert torch.equal(aug.test[3][0], plain.test[3][0])  # test images are never augmented
    assert torch.equal(aug.train.images, plain.train.images)
