"""CoOp prompt learner: with the placeholder words as context it reproduces open_clip's encode_text exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedlit.errors import UserError
from fedlit.prompts import PromptLearner, clean_classname, init_context

BACKBONES = ["tiny_backbone", "vitb32_backbone"]

pytestmark = pytest.mark.usefixtures("single_thread")


def backbone_and_names(request, name: str, classnames: list[str]):
    """The backbone fixture ``name``; ViT-B-32 gets two classes only (its full 77-token pass is the slow part)."""
    return request.getfixturevalue(name), classnames if name == "tiny_backbone" else classnames[1:]


def word_embeddings(bb, words: str) -> torch.Tensor:
    """Token embeddings ``(n, W)`` of ``words`` (between the start and end tokens)."""
    tokens = bb.tokenize([words])
    n = int(tokens.argmax(dim=-1)[0]) - 1
    return bb.token_embeddings(tokens)[0, 1 : 1 + n]


def reference(bb, texts: list[str]) -> torch.Tensor:
    """open_clip's own text features of ``texts`` (full 77 tokens), normalised ``(N, D)``."""
    with torch.no_grad():
        return F.normalize(bb.model.encode_text(bb.tokenize(texts)), dim=-1)


def set_ctx(learner: PromptLearner, value: torch.Tensor) -> PromptLearner:
    with torch.no_grad():
        learner.ctx.copy_(value)
    return learner


def assert_close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("name", BACKBONES)
def test_placeholder_context_reproduces_encode_text(name, request, classnames):
    bb, classnames = backbone_and_names(request, name, classnames)
    placeholder = word_embeddings(bb, "X X X X")
    expected = reference(bb, [f"X X X X {clean_classname(c)}." for c in classnames])
    full = set_ctx(PromptLearner(bb, classnames, n_ctx=4, cut=False), placeholder)
    cut = set_ctx(PromptLearner(bb, classnames, n_ctx=4), placeholder)
    with torch.no_grad():
        assert torch.equal(full.text_features(bb), expected)  # bitwise: the same computation as open_clip
        assert_close(cut.text_features(bb), expected)
    assert full.token_suffix.shape[1] == 77 - 1 - 4
    # The longest prompts ("golden retriever", "sea turtle"): start, 4 X, 2 name tokens, '.', end -> 9 positions.
    assert cut.token_suffix.shape[1] == 9 - 1 - 4
    assert cut.eot_index.tolist() == [7, 8, 8][-len(classnames):]


@pytest.mark.parametrize("name", BACKBONES)
def test_end_token_cut_equals_full_path_for_random_context(name, request, classnames):
    bb, classnames = backbone_and_names(request, name, classnames)
    full = PromptLearner(bb, classnames, n_ctx=4, seed=3, cut=False)
    cut = PromptLearner(bb, classnames, n_ctx=4, seed=3)
    assert torch.equal(full.ctx, cut.ctx)
    with torch.no_grad():
        assert_close(cut.text_features(bb), full.text_features(bb))


def test_end_token_cut_class_specific_and_stacked(tiny_backbone, classnames):
    bb = tiny_backbone
    full = PromptLearner(bb, classnames, n_ctx=6, class_specific=True, seed=1, cut=False)
    cut = PromptLearner(bb, classnames, n_ctx=6, class_specific=True, seed=1)
    stack = init_context(6, 64, len(classnames), std=0.02, seed=7).unsqueeze(0).repeat(2, 1, 1, 1)
    stack[1] *= -1
    with torch.no_grad():
        assert_close(cut.text_features(bb), full.text_features(bb))
        assert_close(cut.text_features(bb, stack), full.text_features(bb, stack))


@pytest.mark.parametrize("position, texts", [
    ("front", ["cat X X X X.", "golden retriever X X X X.", "sea turtle X X X X."]),
    ("middle", ["X X cat X X.", "X X golden retriever X X.", "X X sea turtle X X."]),
    ("end", ["X X X X cat.", "X X X X golden retriever.", "X X X X sea turtle."]),
])
def test_class_positions(tiny_backbone, classnames, position, texts):
    bb = tiny_backbone
    placeholder = word_embeddings(bb, "X X X X")
    full = set_ctx(PromptLearner(bb, classnames, n_ctx=4, class_position=position, cut=False), placeholder)
    cut = set_ctx(PromptLearner(bb, classnames, n_ctx=4, class_position=position), placeholder)
    expected = reference(bb, texts)
    with torch.no_grad():
        assert torch.equal(full.text_features(bb), expected)
        assert_close(cut.text_features(bb), expected)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("position", ["end", "middle"])
def test_shared_prefix_equals_per_class_path_with_gradients(name, request, classnames, position):
    bb = request.getfixturevalue(name)
    shared = PromptLearner(bb, classnames, n_ctx=6, seed=2, class_position=position)
    plain = PromptLearner(bb, classnames, n_ctx=6, seed=2, class_position=position, share_prefix=False)
    assert shared.shared_length == {"end": 7, "middle": 4}[position] and plain.shared_length == 0
    weights = torch.randn(len(classnames), bb.feature_dim, generator=torch.Generator().manual_seed(0))
    grads = []
    for learner in (shared, plain):
        features = learner.text_features(bb)
        (features * weights).sum().backward()
        grads.append(learner.ctx.grad)
    assert_close(shared.text_features(bb), plain.text_features(bb))
    # Float rounding only: within 1e-5 of the gradient's scale (sums over classes come in another order).
    assert_close(grads[0], grads[1], tol=1e-5 * grads[1].abs().max().item())
    stack = torch.stack([init_context(6, bb.text_width, None, 0.02, seed=s) for s in range(3)])
    with torch.no_grad():
        assert_close(shared.text_features(bb, stack), plain.text_features(bb, stack))


@pytest.mark.parametrize("kwargs", [dict(class_position="front"), dict(class_specific=True), dict(cut=False),
                                    dict(share_prefix=False)])
def test_prefix_is_not_shared_when_classes_share_only_the_start_token_or_run_full_length(
        tiny_backbone, classnames, kwargs):
    assert PromptLearner(tiny_backbone, classnames, n_ctx=4, **kwargs).shared_length == 0


def test_shared_prefix_needs_a_plain_causal_tower(tiny_backbone, classnames, monkeypatch):
    monkeypatch.setattr(tiny_backbone, "prefix_shareable", False)
    assert PromptLearner(tiny_backbone, classnames, n_ctx=4).shared_length == 0
    prefix, suffix = torch.zeros(1, 5, 64), torch.zeros(1, 3, 4, 64)
    with pytest.raises(ValueError, match="cannot be shared") as err:
        tiny_backbone.encode_shared_prefix(prefix, suffix, torch.tensor([6, 7, 8]))
    assert "\n" not in str(err.value)


def test_class_positions_differ_for_non_placeholder_context(tiny_backbone, classnames):
    with torch.no_grad():
        end, front = (PromptLearner(tiny_backbone, classnames, n_ctx=4, seed=0, class_position=p).text_features(
            tiny_backbone) for p in ("end", "front"))
    assert (end - front).abs().max() > 1e-3


def test_class_specific_context(tiny_backbone, classnames):
    bb = tiny_backbone
    learner = PromptLearner(bb, classnames, n_ctx=4, class_specific=True, cut=False)
    assert learner.ctx_shape == (3, 4, 64)
    words = ["X X X X", "a photo of a", "a sketch of the"]
    set_ctx(learner, torch.stack([word_embeddings(bb, w) for w in words]))
    expected = reference(bb, [f"{w} {clean_classname(c)}." for w, c in zip(words, classnames)])
    with torch.no_grad():
        assert torch.equal(learner.text_features(bb), expected)


@pytest.mark.parametrize("name", BACKBONES)
def test_ctx_init_words(name, request, classnames):
    bb, classnames = backbone_and_names(request, name, classnames)
    learner = PromptLearner(bb, classnames, n_ctx=16, ctx_init="a photo of a")
    assert learner.n_ctx == 4 and learner.ctx_shape == (4, bb.text_width)
    assert torch.equal(learner.ctx.detach(), word_embeddings(bb, "a photo of a"))
    expected = reference(bb, [f"a photo of a {clean_classname(c)}." for c in classnames])
    with torch.no_grad():
        assert_close(learner.text_features(bb), expected)


def test_ctx_init_class_specific_and_underscores(tiny_backbone, classnames):
    learner = PromptLearner(tiny_backbone, classnames, ctx_init="a_photo_of_a", class_specific=True, cut=False)
    assert learner.ctx_shape == (3, 4, 64)
    for c in range(3):
        assert torch.equal(learner.ctx[c].detach(), word_embeddings(tiny_backbone, "a photo of a"))
    expected = reference(tiny_backbone, [f"a photo of a {clean_classname(c)}." for c in classnames])
    with torch.no_grad():
        assert torch.equal(learner.text_features(tiny_backbone), expected)


def test_underscores_become_spaces(tiny_backbone):
    assert clean_classname(" golden_retriever ") == "golden retriever"
    learner = PromptLearner(tiny_backbone, ["golden_retriever", "sea_turtle"], n_ctx=2)
    assert learner.classnames == ["golden retriever", "sea turtle"]
    assert learner.name_lens == [2, 2]
    spaced = PromptLearner(tiny_backbone, ["golden retriever", "sea turtle"], n_ctx=2)
    assert torch.equal(learner.token_suffix, spaced.token_suffix)
    assert torch.equal(learner.eot_index, spaced.eot_index)


@pytest.mark.parametrize("class_specific", [False, True])
def test_stacked_contexts_equal_separate_calls(tiny_backbone, classnames, class_specific):
    learner = PromptLearner(tiny_backbone, classnames, n_ctx=5, class_specific=class_specific, seed=0)
    stack = torch.stack([init_context(5, 64, 3 if class_specific else None, 0.02, seed=s) for s in range(4)])
    with torch.no_grad():
        stacked = learner.text_features(tiny_backbone, stack)
        assert stacked.shape == (4, 3, 64)
        for g in range(4):
            assert_close(stacked[g], learner.text_features(tiny_backbone, stack[g]), tol=1e-6)
        assert learner.build_embeddings(stack).shape == (4, 3, learner.token_prefix.shape[1] + 5 + 4, 64)


def test_gradient_reaches_context_only(tiny_backbone, classnames):
    learner = PromptLearner(tiny_backbone, classnames, n_ctx=4, seed=0)
    feats = learner.text_features(tiny_backbone)
    assert feats.shape == (3, 64)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-6)
    feats[:, 0].sum().backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert [n for n, p in learner.named_parameters()] == ["ctx"]
    assert not any(b.requires_grad for b in learner.buffers())
    assert learner.state_dict().keys() == {"ctx"}  # buffers are rebuilt from the class names, never stored


def test_init_context_is_seeded_normal():
    a = init_context(16, 512, None, std=0.02, seed=5)
    assert a.shape == (16, 512)
    assert torch.equal(a, init_context(16, 512, None, std=0.02, seed=5))
    assert not torch.equal(a, init_context(16, 512, None, std=0.02, seed=6))
    assert a.std().item() == pytest.approx(0.02, rel=0.05) and abs(a.mean().item()) < 1e-3
    assert init_context(16, 512, 10, std=0.02, seed=5).shape == (10, 16, 512)


def test_default_context_shape(vitb32_backbone, classnames):
    learner = PromptLearner(vitb32_backbone, classnames, seed=0)
    assert learner.ctx_shape == (16, 512) and learner.n_ctx == 16
    assert torch.equal(learner.ctx.detach(), init_context(16, 512, None, 0.02, seed=0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_ctx=0), "n_ctx must be >= 1"),
    (dict(n_ctx=-3), "n_ctx must be >= 1"),
    (dict(ctx_init="False"), "looks like a boolean"),
    (dict(ctx_init=" none "), "looks like a boolean"),
    (dict(ctx_init=""), "looks like a boolean"),
    (dict(ctx_init=False), "must be a string of words or null"),
    (dict(class_specific="True"), "class_specific must be a boolean"),
    (dict(class_specific=1), "class_specific must be a boolean"),
    (dict(class_position="back"), "class_position must be end, front or middle"),
])
def test_bad_arguments_are_refused_in_one_line(tiny_backbone, classnames, kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        PromptLearner(tiny_backbone, classnames, **kwargs)
    one_line(err)


def test_context_that_fills_the_tokenizer_context_is_refused_naming_the_key_and_the_class(tiny_backbone, classnames):
    # "golden retriever." is the longest name (3 tokens): 77 - start - end - 3 leaves 72 context tokens.
    assert tiny_backbone.context_length == 77
    fits = PromptLearner(tiny_backbone, classnames, ctx_init="a " * 72)
    assert fits.n_ctx == 72 and fits.eot_index.tolist() == [75, 76, 76]
    words = "a " * 75  # what the check prevents: the tokenizer cuts every class name off, all prompts are equal
    tokens = tiny_backbone.tokenize([f"{words}{name}." for name in ("cat", "sea turtle")])
    assert torch.equal(tokens[0], tokens[1])
    for count in (73, 75):
        with pytest.raises(UserError) as err:
            PromptLearner(tiny_backbone, classnames, ctx_init="a " * count)
        assert one_line(err) == (f"prompt.ctx_init='{'a ' * 18}a...' ({count} tokens) leaves no room for the class "
                                 "name 'golden retriever' (3 tokens with its period) in the 77-token context of the "
                                 "tokenizer; shorten prompt.ctx_init")


def test_n_ctx_longer_than_the_context_is_refused_with_the_largest_that_fits(tiny_backbone, classnames):
    assert PromptLearner(tiny_backbone, classnames, n_ctx=72).ctx_shape == (72, 64)
    for n_ctx in (73, 100):
        with pytest.raises(UserError) as err:
            PromptLearner(tiny_backbone, classnames, n_ctx=n_ctx)
        assert one_line(err) == (f"prompt.n_ctx={n_ctx} leaves no room for the class name 'golden retriever' (3 tokens "
                                 "with its period) in the 77-token context of the tokenizer; set prompt.n_ctx <= 72")
    assert PromptLearner(tiny_backbone, ["cat"], n_ctx=73).n_ctx == 73  # "cat." is 2 tokens: one more fits


def test_class_name_that_fills_the_context_alone_is_refused(tiny_backbone):
    with pytest.raises(UserError, match=r"class name 'x x x .*' is too long for the 77-token context"):
        PromptLearner(tiny_backbone, ["cat", "x " * 80], n_ctx=1)
