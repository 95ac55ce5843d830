"""The frozen backbone: shapes, freezing, image/text encoding against open_clip's own, weights files, bad input."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time

import open_clip
import pytest
import torch
import torch.nn.functional as F

from fedlit import backbone
from fedlit.backbone import TINY_CLIP_CFG, load_backbone, load_weights_file
from fedlit.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("name, width, image_size", [("tiny_backbone", 64, 32), ("vitb32_backbone", 512, 224)])
def test_backbone_attributes(name, width, image_size, request):
    bb = request.getfixturevalue(name)
    assert (bb.feature_dim, bb.text_width, bb.context_length) == (width, width, 77)
    assert bb.causal and bb.prefix_shareable  # causal mask, argmax pooling, plain residual attention blocks
    assert bb.preprocess.image_size == image_size
    assert not any(p.requires_grad for p in bb.parameters())
    if name == "tiny_backbone":
        assert bb.fingerprint.startswith("tiny:random:")


def test_train_keeps_eval_mode(tiny_resnet_factory):
    bb = tiny_resnet_factory()
    assert not any(m.training for m in bb.modules())  # from construction on, the wrapper included
    assert bb.train() is bb
    assert not any(m.training for m in bb.modules())
    bb.train(True)
    assert not any(m.training for m in bb.modules())


def test_resnet_batchnorm_statistics_stay_fixed(tiny_resnet_factory):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    bb = tiny_resnet_factory()
    before = bb.model.visual.bn1.running_mean.clone()
    bb.train()
    bb.encode_image(images)
    assert torch.equal(bb.model.visual.bn1.running_mean, before)
    # The same forward with the tower really in train mode moves the statistics: the check above can fail.
    torch.nn.Module.train(bb.model, True)
    bb.encode_image(images)
    assert not torch.equal(bb.model.visual.bn1.running_mean, before)


def test_logit_scale_is_exp_of_model_parameter(tiny_backbone):
    s = tiny_backbone.logit_scale
    assert s.dim() == 0 and not s.requires_grad
    assert torch.equal(s, tiny_backbone.model.logit_scale.exp())
    assert s.item() == pytest.approx(1 / 0.07, rel=1e-6)  # open_clip's init


def test_encode_image_is_normalised_model_features(tiny_backbone):
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats = tiny_backbone.encode_image(images)
    assert feats.shape == (5, 64) and not feats.requires_grad
    assert torch.equal(feats, F.normalize(tiny_backbone.model.encode_image(images), dim=-1))
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(5), rtol=0, atol=1e-6)


def test_sequence_length_is_last_end_token_plus_one(tiny_backbone):
    tokens = tiny_backbone.tokenize(["a photo of a cat.", "cat"])
    eot = tokens.argmax(dim=-1)
    assert eot.tolist() == [7, 2]  # start, 6 tokens (".", too), end / start, 1 token, end
    assert tiny_backbone.sequence_length(eot) == 8


@pytest.mark.parametrize("name", ["tiny_backbone", "vitb32_backbone"])
def test_encode_prompts_full_length_equals_open_clip_encode_text(name, request):
    bb = request.getfixturevalue(name)
    tokens = bb.tokenize(["a photo of a cat.", "a sketch of a golden retriever."])
    expected = bb.model.encode_text(tokens)
    full = bb.encode_prompts(bb.token_embeddings(tokens), tokens.argmax(dim=-1), normalize=False)
    assert torch.equal(full, expected)
    # encode_text (end-token cut, normalised) agrees with the full 77-token path.
    cut = bb.encode_text(["a photo of a cat.", "a sketch of a golden retriever."])
    torch.testing.assert_close(cut, F.normalize(expected, dim=-1), rtol=0, atol=1e-6)


def test_encode_prompts_keeps_leading_dims_and_grad(tiny_backbone):
    tokens = tiny_backbone.tokenize(["x x cat.", "x x dog.", "x x car."])[:, :8]
    emb = tiny_backbone.token_embeddings(tokens).requires_grad_(True)
    eot = tokens.argmax(dim=-1)
    stacked = tiny_backbone.encode_prompts(emb.unsqueeze(0).expand(2, -1, -1, -1), eot.expand(2, -1))
    single = tiny_backbone.encode_prompts(emb, eot)
    assert stacked.shape == (2, 3, 64)
    torch.testing.assert_close(stacked[1], single, rtol=0, atol=1e-6)
    single.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


SMALL_OPEN_CLIP = "ViT-S-32-alt"  # the smallest plain open_clip CLIP (43 M parameters, built in ~0.5 s)


class _RunsAShellCommand:
    """A pickle payload: unpickling it would run ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_local_weights_file_round_trip(tmp_path):
    """An open_clip model loads a local state dict (here fp16, as checkpoints often are) exactly, and the file name
    enters the fingerprint."""
    random = load_backbone(SMALL_OPEN_CLIP, "random")
    state = {k: v.half() if v.is_floating_point() else v for k, v in random.model.state_dict().items()}
    state["text_projection"] = state["text_projection"] + 1  # differs from the random init that load starts from
    path = tmp_path / "small.pt"
    torch.save(state, path)
    loaded = load_backbone(SMALL_OPEN_CLIP, pretrained=str(path))
    for name, value in loaded.model.state_dict().items():
        assert value.dtype == random.model.state_dict()[name].dtype
        assert torch.equal(value, state[name].to(value.dtype)), name
    assert loaded.fingerprint.startswith(f"{SMALL_OPEN_CLIP}:small.pt:")
    assert loaded.fingerprint != random.fingerprint


def _write_bad_weights(kind: str, path, marker) -> None:
    if kind == "text":
        path.write_text("these are not weights\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "malicious-torch":
        torch.save({"w": _RunsAShellCommand(marker)}, path)
    elif kind == "malicious-pickle":
        path.write_bytes(pickle.dumps(_RunsAShellCommand(marker), protocol=2))
    elif kind == "not-a-dict":
        torch.save(torch.zeros(3), path)


@pytest.mark.parametrize("kind", ["text", "empty", "truncated", "malicious-torch", "malicious-pickle", "not-a-dict"])
def test_unreadable_weights_file_is_one_user_error_line(kind, tmp_path):
    path, marker = tmp_path / "weights.pt", tmp_path / "pwned"
    _write_bad_weights(kind, path, marker)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    with pytest.raises(UserError) as err:
        load_weights_file(model, path)
    assert str(path) in one_line(err)
    assert not marker.exists()  # the payload never ran (weights_only=True refuses os.system)
    if kind == "malicious-torch":  # names the refused global
        assert "weights_only=True): Trying to load unsupported GLOBAL posix.system" in str(err.value)


def test_corrupt_weights_file_through_load_backbone(tmp_path):
    path = tmp_path / "weights.pt"
    _write_bad_weights("malicious-torch", path, tmp_path / "pwned")
    with pytest.raises(UserError, match="cannot load backbone weights") as err:
        load_backbone(SMALL_OPEN_CLIP, pretrained=str(path))
    assert str(path) in one_line(err) and not (tmp_path / "pwned").exists()


def test_weights_file_that_does_not_match_is_refused(tmp_path, tiny_backbone):
    path = tmp_path / "wrong.pt"
    state = dict(tiny_backbone.model.state_dict())
    for key in ("ln_final.weight", "ln_final.bias", "logit_scale", "token_embedding.weight"):
        del state[key]
    state["something"] = torch.zeros(2)
    torch.save(state, path)
    with pytest.raises(UserError, match="does not match the model") as err:
        load_weights_file(open_clip.CLIP(**TINY_CLIP_CFG), path)
    message = one_line(err)
    assert str(path) in message
    assert "4 missing keys logit_scale, token_embedding.weight, ln_final.weight (+1 more)" in message  # model order
    assert "1 unexpected keys something" in message
    state = dict(tiny_backbone.model.state_dict())
    state["ln_final.weight"] = torch.zeros(3)  # right keys, wrong shape
    torch.save(state, path)
    with pytest.raises(UserError, match="size mismatch for ln_final.weight") as err:
        load_weights_file(open_clip.CLIP(**TINY_CLIP_CFG), path)
    assert str(path) in one_line(err)


@pytest.mark.parametrize("name, pretrained", [("shapes-clip", "openai"), ("tiny", "/some/weights.pt")])
def test_pretrained_with_a_built_in_backbone_is_refused(name, pretrained, tmp_path):
    with pytest.raises(UserError, match=f"backbone.pretrained={pretrained} cannot be used with the built-in "
                                        f"backbone '{name}'") as err:
        load_backbone(name, pretrained=pretrained, cache_dir=tmp_path)
    assert "unset backbone.pretrained" in one_line(err)
    assert not list(tmp_path.iterdir())  # refused before anything was built


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """The Hugging Face cache (where open_clip's tag weights go) pointed at an empty directory."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # open_clip's ~/.cache/clip for URL downloads
    return hub


def test_uncached_tag_offline_fails_fast_with_the_remedy(empty_hub_cache, monkeypatch):
    probed = []
    monkeypatch.setattr(backbone, "network_reachable", lambda url, *a, **k: probed.append(url) or False)
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_backbone("RN50-quickgelu", pretrained="openai")
    elapsed = time.perf_counter() - start
    message = one_line(err)
    assert elapsed < 2.0, elapsed  # open_clip's own download retries take about a minute offline
    assert f"pretrained weights RN50-quickgelu/openai are not in the local cache ({empty_hub_cache})" in message
    assert "huggingface.co cannot be reached" in message
    assert "set backbone.pretrained=/path/to/weights file" in message
    assert probed == ["https://huggingface.co"]


def _put_in_hub_cache(hub, repo: str, filename: str, content: bytes):
    """A file laid out as huggingface_hub caches it (refs/main -> snapshots/<commit>/<filename>)."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    file = folder / "snapshots" / "0123abcd" / filename
    file.parent.mkdir(parents=True)
    file.write_bytes(content)
    return file


def test_cached_tag_loads_from_the_cache_without_the_network(empty_hub_cache, monkeypatch):
    cfg = open_clip.get_pretrained_cfg("RN50-quickgelu", "openai")
    assert backbone.cached_pretrained_file(cfg) is None
    file = _put_in_hub_cache(empty_hub_cache, "timm/resnet50_clip.openai", "open_clip_pytorch_model.bin", b"w")
    assert backbone.cached_pretrained_file(cfg) == file

    def no_network(*args, **kwargs):
        raise AssertionError("the network was probed although the weights are cached")

    calls = []

    def create_model(name, pretrained=None, **kwargs):
        calls.append((name, pretrained, kwargs))
        return open_clip.CLIP(**TINY_CLIP_CFG)

    monkeypatch.setattr(backbone, "network_reachable", no_network)
    monkeypatch.setattr(open_clip, "create_model", create_model)
    loaded = load_backbone("RN50-quickgelu", pretrained="openai")
    [(name, pretrained, kwargs)] = calls
    assert (name, pretrained) == ("RN50-quickgelu", str(file))
    assert kwargs["force_preprocess_cfg"]["mean"] == cfg["mean"]  # the tag's preprocessing, as a tag load sets
    assert loaded.fingerprint.startswith("RN50-quickgelu:openai:")


def test_corrupt_cached_tag_weights_say_delete(empty_hub_cache):
    file = _put_in_hub_cache(empty_hub_cache, "timm/resnet50_clip.openai", "open_clip_pytorch_model.bin",
                             b"truncated download")
    with pytest.raises(UserError, match="delete the file to download it again") as err:
        load_backbone("RN50-quickgelu", pretrained="openai")
    assert str(file) in one_line(err)


def test_network_reachable_probes_a_tcp_connection(monkeypatch):
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert backbone.network_reachable(f"http://127.0.0.1:{port}/", timeout=2.0)
    assert not backbone.network_reachable(f"http://127.0.0.1:{port}/", timeout=2.0)  # closed now
    assert not backbone.network_reachable("", timeout=2.0)


@pytest.mark.parametrize("name, suggestion", [("ViT-B-33", "ViT-B-32"), ("tiyn", "tiny"), ("RN-50", "RN50")])
def test_unknown_backbone_names_close_matches(name, suggestion):
    with pytest.raises(UserError, match=f"unknown backbone '{name}'") as err:
        load_backbone(name)
    assert suggestion in one_line(err)


def test_random_weights_of_an_open_clip_model_are_asked_for_by_name():
    with pytest.raises(UserError) as err:
        load_backbone(SMALL_OPEN_CLIP)
    assert one_line(err) == (f"backbone.name={SMALL_OPEN_CLIP} needs backbone.pretrained: an open_clip pretrained tag "
                             "(e.g. openai), a local weights file, or random to train on random weights on purpose")
    first, second = load_backbone(SMALL_OPEN_CLIP, "random"), load_backbone(SMALL_OPEN_CLIP, "random")
    assert first.fingerprint == second.fingerprint and first.fingerprint.startswith(f"{SMALL_OPEN_CLIP}:random:")
    for name, value in first.model.state_dict().items():  # seeded: the same random weights in every process
        assert torch.equal(value, second.model.state_dict()[name]), name


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pt"
    with pytest.raises(UserError, match="weights file not found") as err:
        load_backbone("ViT-B-32", pretrained=str(missing))
    assert str(missing) in one_line(err)


def test_unknown_pretrained_tag():
    with pytest.raises(UserError, match="unknown pretrained tag 'not-a-tag' for ViT-B-32") as err:
        load_backbone("ViT-B-32", pretrained="not-a-tag")
    assert "openai" in one_line(err)  # lists the tags that exist


def test_backbone_and_pretrain_import_without_a_cycle():
    """pretrain (the shapes-clip recipe) does not import backbone, so backbone can import it at the top: either
    module imports first in a fresh interpreter."""
    code = ("import sys; import fedlit.pretrain; assert 'fedlit.backbone' not in sys.modules, 'pretrain imports "
            "backbone'; import fedlit.backbone")
    for statement in (code, "import fedlit.backbone; import fedlit.sanity"):
        result = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
