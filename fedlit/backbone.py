"""The frozen open_clip CLIP that every client of a process shares.

``load_backbone`` builds it from an open_clip model name plus a pretrained tag, a local weights file or ``random``
(random weights, asked for by name), from the offline ``shapes-clip`` recipe, or from the random ``tiny`` test
configuration. :class:`Backbone` encodes images
(normalised features) and prompt embeddings (start token + context + class tokens) with end-token pooling, cutting
text sequences after the last end token when the tower is causal (exact, and 3-4x cheaper), and can run a prefix
shared by many sequences once (:meth:`Backbone.encode_shared_prefix`, exact for causal towers). The text-tower
functions themselves live in :mod:`fedlit.clip_text` (shared with the shapes-clip pretraining, which this module
imports: the dependency goes one way). Every bad input raises a one-line :class:`~fedlit.errors.UserError`.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import logging
import os
import socket
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from fedlit.clip_text import encode_text_cut, text_tower, text_tower_shared_prefix
from fedlit.clip_vision import prompt_tower, visual_tokens, visual_tower
from fedlit.config import RANDOM_WEIGHTS, weights_needed
from fedlit.data.base import Preprocess
from fedlit.errors import UserError
from fedlit.io import default_cache_dir
from fedlit.pretrain import DEFAULT_RECIPE, load_shapes_clip

# A CLIP of ~1.6 M parameters that builds in milliseconds; standard vocab and context so the real tokenizer works.
TINY_CLIP_CFG = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
    text_cfg=dict(width=64, heads=2, layers=2),
)
LOCAL_NAMES = ("tiny", "shapes-clip")
RANDOM_INIT_SEED = 0  # randomly initialised backbones (tests, benchmarks) are identical everywhere
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
LOCAL_WEIGHTS = {"tiny": "its weights are random, seed 0", "shapes-clip": "fedlit builds its weights from a recipe"}
NETWORK_TIMEOUT_S = 2.0  # the probe of the download host before fetching open_clip weights


class Backbone(nn.Module):
    """A frozen CLIP (parameters without grad, always in eval mode) plus its tokenizer.

    Attributes: ``feature_dim`` D (joint embedding width), ``text_width`` W, ``context_length`` (77),
    ``preprocess`` (image size and normalisation), ``fingerprint`` (identifies name + weights; keys caches),
    ``name`` and ``pretrained`` (what :func:`load_backbone` was given).
    """

    def __init__(self, model: nn.Module, tokenizer, name: str, fingerprint: str, preprocess: Preprocess,
                 pretrained: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.pretrained = pretrained  # the tag or weights file it was loaded with (what load_backbone takes again)
        self.fingerprint = fingerprint
        self.preprocess = preprocess
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.eval()  # the wrapper as well as the CLIP inside: Lightning captures and restores every flag
        self.text_width = int(model.token_embedding.weight.shape[1])
        self.context_length = int(model.positional_embedding.shape[0])
        proj = model.text_projection
        self.feature_dim = int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])
        # The end-token cut is exact only when position t never sees positions > t and pooling reads the end token.
        self.causal = getattr(model, "attn_mask", None) is not None and model.text_pool_type == "argmax"
        # A prefix shared by many sequences can then run once (its keys/values reused): needs the plain block.
        self.prefix_shareable = self.causal and all(
            isinstance(block, ResidualAttentionBlock) and block.attn.batch_first and not hasattr(block, "ln_1_kv")
            for block in getattr(model.transformer, "resblocks", [None])
        )

    def train(self, mode: bool = True) -> Backbone:
        """Frozen: stays in eval mode whatever is asked (keeps BatchNorm statistics of ResNet towers fixed)."""
        return super().train(False)

    @property
    def logit_scale(self) -> Tensor:
        """``s = exp(logit_scale)`` of the frozen CLIP, a 0-dim tensor."""
        return self.model.logit_scale.detach().exp()

    def tokenize(self, texts: list[str]) -> Tensor:
        """Token ids ``(N, context_length)`` of ``texts`` with the model's own tokenizer."""
        return self.tokenizer(texts)

    @torch.no_grad()
    def token_embeddings(self, tokens: Tensor) -> Tensor:
        """Token embeddings ``(N, L, W)`` of token ids ``(N, L)`` (no grad)."""
        return self.model.token_embedding(tokens.to(self.model.token_embedding.weight.device))

    def sequence_length(self, eot_index: Tensor) -> int:
        """How many positions the text tower must run: ``max(eot) + 1`` when causal, else the full context."""
        return int(eot_index.max()) + 1 if self.causal else self.context_length

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised image features ``(B, D)`` of preprocessed images ``(B, 3, H, W)``."""
        return F.normalize(self.model.encode_image(images), dim=-1)

    def image_tokens(self, images: Tensor, start_layer: int = 0) -> Tensor:
        """The frozen tokens ``(B, 1+P, W)`` entering block ``start_layer`` of the ViT image tower for preprocessed
        images ``(B, 3, H, W)`` (no grad: they depend on nothing trainable; :func:`fedlit.clip_vision.visual_tokens`).
        A tower that cannot take prompt tokens raises a one-line UserError naming the backbone."""
        prompt_tower(self.model, self.name)
        return visual_tokens(self.model, images, start_layer)

    def encode_image_prompted(self, tokens: Tensor, start_layer: int = 0, shallow: Tensor | None = None,
                              deep: Sequence[Tensor] = (), use_checkpoint: bool = False) -> Tensor:
        """L2-normalised image features ``(..., D)`` of frozen tokens ``(..., T, W)`` (:meth:`image_tokens` at
        ``start_layer``) through the rest of the image tower with prompt tokens: ``shallow (n, W)`` appended at
        ``start_layer``, ``deep[j] (n, W)`` replacing them before block ``start_layer + 1 + j``; prompts may carry
        leading dimensions that broadcast against the tokens' (:func:`fedlit.clip_vision.visual_tower`). Runs with
        grad so that the prompts receive gradients; ``use_checkpoint`` recomputes each block in the backward pass."""
        return F.normalize(visual_tower(self.model, tokens, start_layer, shallow, deep, use_checkpoint), dim=-1)

    @torch.no_grad()
    def encode_image_patches(self, images: Tensor) -> Tensor:
        """L2-normalised per-token image features ``(B, P+1, D)`` of preprocessed images ``(B, 3, H, W)``: row 0 is
        the pooled feature (what :meth:`encode_image` returns), rows 1..P one per patch (ViT) or grid cell
        (ModifiedResNet), all projected to the joint space.

        ViT: every token after the transformer, ``ln_post`` and ``proj`` (open_clip's ``output_tokens=True`` gives
        the same tokens before ``proj``). ModifiedResNet: the attention pool run with every position as a query
        (the mean token, then the ``H/32 x W/32`` grid), as FedOTP's ``ModifiedResNet_GLP_OT`` does. Other image
        towers raise a UserError.
        """
        visual = self.model.visual
        images = images.to(next(visual.parameters()).dtype)
        if isinstance(visual, open_clip.transformer.VisionTransformer):
            if visual.attn_pool is not None or visual.final_ln_after_pool or visual.pool_type != "tok":
                raise UserError(f"backbone {self.name}: patch features need a ViT with class-token pooling and "
                                "ln_post before pooling")
            tokens = visual.ln_post(visual.transformer(visual._embeds(images)))
            tokens = tokens @ visual.proj if visual.proj is not None else tokens
        elif isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
            grid = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
            tokens = _attention_pool_all(visual.attnpool, grid)
        else:
            raise UserError(f"backbone {self.name}: patch features are defined for open_clip ViT and ModifiedResNet "
                            f"image towers, not {type(visual).__name__}")
        return F.normalize(tokens, dim=-1)

    def encode_prompts(self, embeddings: Tensor, eot_index: Tensor, normalize: bool = True,
                       deep: Sequence[Tensor] = ()) -> Tensor:
        """Text features ``(..., D)`` of prompt embeddings ``(..., L, W)`` whose end tokens sit at ``eot_index (...)``.

        ``L`` may be shorter than the context (a cut sequence): positional embeddings and the causal mask are
        sliced to it. Runs with grad so that a learnable context receives gradients. ``deep``: deep text prompts
        ``(n, W)`` (or ``(..., n, W)`` matching the embeddings' leading dimensions) replacing the context positions
        ``1..n`` before blocks ``1..len(deep)`` (:func:`fedlit.clip_text.text_tower`).
        """
        lead = embeddings.shape[:-2]
        x = text_tower(self.model, embeddings.reshape(-1, *embeddings.shape[-2:]), eot_index.reshape(-1),
                       deep=[p if p.dim() == 2 else p.expand(*lead, *p.shape[-2:]) for p in deep])
        x = F.normalize(x, dim=-1) if normalize else x
        return x.reshape(*lead, x.shape[-1])

    def encode_shared_prefix(self, prefix: Tensor, suffix: Tensor, eot_index: Tensor, normalize: bool = True) -> Tensor:
        """Text features ``(G, C, D)`` of ``G x C`` prompts whose first ``P`` positions are shared by the ``C``
        prompts of a group: ``prefix (G, P, W)``, ``suffix (G, C, S, W)``, end tokens at ``eot_index (C,)`` or
        ``(G, C)`` (positions in the whole sequence, all ``>= P``). Equals :meth:`encode_prompts` on the
        concatenated sequences (up to float rounding) at about ``(P + C*S) / (C*(P+S))`` of its cost."""
        if not self.prefix_shareable:
            raise ValueError(f"backbone {self.name} has no plain causal text tower; its prefix cannot be shared")
        groups, classes = suffix.shape[:2]
        eot = eot_index.expand(groups, classes).reshape(-1)
        x = text_tower_shared_prefix(self.model, prefix, suffix, eot)
        x = F.normalize(x, dim=-1) if normalize else x
        return x.reshape(groups, classes, x.shape[-1])

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """L2-normalised features ``(N, D)`` of plain texts (e.g. hand-written prompts), with the end-token cut
        when the tower is causal."""
        tokens = self.tokenize(texts).to(self.model.token_embedding.weight.device)
        return F.normalize(encode_text_cut(self.model, tokens, cut=self.causal), dim=-1)


def _attention_pool_all(pool: nn.Module, x: Tensor) -> Tensor:
    """open_clip's ``AttentionPool2d`` on a grid ``(B, C, H, W)`` with every position as a query, not only the mean
    token: ``(B, H*W + 1, D)``, row 0 equal to the pool's own output."""
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(2, 0, 1)  # (HW, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False,
    )
    return out.permute(1, 0, 2)


def _preprocess_of(model: nn.Module) -> Preprocess:
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    return Preprocess(int(size), mean, std, cfg.get("interpolation", "bicubic") or "bicubic")


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _is_weights_file(pretrained: str) -> bool:
    return pretrained.endswith(WEIGHT_SUFFIXES) or "/" in pretrained or pretrained.startswith(("~", "."))


def load_backbone(
    name: str,
    pretrained: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Backbone:
    """Build the frozen :class:`Backbone`.

    ``name``: an open_clip model name (e.g. ``RN50-quickgelu``, ``ViT-B-16-quickgelu``, ``ViT-B-32``), ``tiny``
    (random, for tests) or ``shapes-clip`` (fedlit's offline recipe, built and cached under ``cache_dir`` on first
    use; None: :func:`fedlit.io.default_cache_dir`). ``pretrained`` (open_clip names only, where it is required): an
    open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``), a local weights file, or ``"random"`` for random
    weights (seeded, the same in every process). Every bad input (unknown name or tag, no ``pretrained`` for an
    open_clip name, missing, corrupt or mismatched weights file, tag weights neither cached nor downloadable) raises
    a one-line :class:`UserError`. ``progress``: report the one-time build of ``shapes-clip`` (a bar on a
    terminal).
    """
    if name in LOCAL_NAMES and pretrained:
        raise UserError(f"backbone.pretrained={pretrained} cannot be used with the built-in backbone '{name}' "
                        f"({LOCAL_WEIGHTS[name]}); unset backbone.pretrained, or set backbone.name to an open_clip "
                        "model (e.g. RN50-quickgelu)")
    if name == "tiny":
        with torch.random.fork_rng(devices=[]):  # random weights, but the same ones in every process and run
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.CLIP(**TINY_CLIP_CFG)
    elif name == "shapes-clip":
        model = load_shapes_clip(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(),
                                 progress=progress)
    else:
        known = open_clip.list_models()
        if name not in known:
            close = difflib.get_close_matches(name, known + list(LOCAL_NAMES), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
            raise UserError(f"unknown backbone '{name}'{hint}")
        if pretrained is None:
            raise UserError(weights_needed(name))
        model = _create_open_clip(name, pretrained)
    tokenizer = open_clip.get_tokenizer("ViT-B-32" if name in LOCAL_NAMES else name)
    fingerprint = f"{name}:{Path(pretrained).name if pretrained else RANDOM_WEIGHTS}:{_weights_digest(model)}"
    return Backbone(model, tokenizer, name, fingerprint, _preprocess_of(model), pretrained).to(device)


def prompt_tower_layers(name: str) -> int | None:
    """Blocks of the ViT image tower of backbone ``name`` (``tiny``, ``shapes-clip`` or an open_clip model name),
    read from its configuration without building it; None when that tower cannot take prompt tokens (a
    ModifiedResNet, a timm tower, attention pooling) or the name is unknown."""
    if name == "tiny":
        vision = TINY_CLIP_CFG["vision_cfg"]
    elif name == "shapes-clip":
        vision = DEFAULT_RECIPE.model_cfg()["vision_cfg"]
    else:
        vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
    layers = vision.get("layers")
    plain = not vision.get("timm_model_name") and not vision.get("attentional_pool")
    return layers if isinstance(layers, int) and plain and vision.get("pool_type", "tok") == "tok" else None


def _create_open_clip(name: str, pretrained: str) -> nn.Module:
    if pretrained == RANDOM_WEIGHTS:
        with _without_random_init_warning():  # asked for by name
            return _random_open_clip(name)
    if _is_weights_file(pretrained):
        file = Path(pretrained).expanduser()
        if not file.is_file():
            raise UserError(f"backbone weights file not found: {file} (download the open_clip checkpoint for {name} "
                            "and set backbone.pretrained to its path, or use a pretrained tag)")
        with _without_random_init_warning():  # the weights are loaded right after
            model = _random_open_clip(name)
        load_weights_file(model, file)
        return model
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise UserError(f"unknown pretrained tag '{pretrained}' for {name}; available: {', '.join(tags) or 'none'} "
                        "(or set backbone.pretrained to a local weights file)")
    return _open_clip_from_tag(name, pretrained)


def _random_open_clip(name: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return open_clip.create_model(name, pretrained=None)


@contextlib.contextmanager
def _without_random_init_warning():
    """Drop open_clip's "initialized randomly" warning (logged on the root logger) inside the block."""
    drop = logging.Filter()
    drop.filter = lambda record: "initialized randomly" not in record.getMessage()  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def load_weights_file(model: nn.Module, file: str | Path) -> None:
    """Load the state dict in ``file`` (``torch.save`` pickle read with ``weights_only=True``, or safetensors; open_clip
    key conversions applied) into ``model``. Unreadable, corrupt, empty or non-tensor files and state dicts whose
    keys or shapes do not match the model raise one :class:`UserError` line naming the file."""
    file = Path(file).expanduser()
    if not file.is_file():
        raise UserError(f"backbone weights file not found: {file} (set backbone.pretrained to an existing file)")
    if file.stat().st_size == 0:
        raise UserError(f"backbone weights file {file} is empty; set backbone.pretrained to a complete checkpoint")
    try:
        missing, unexpected = open_clip.load_checkpoint(model, str(file), strict=False)
    except Exception as err:  # noqa: BLE001 - torch.load, safetensors and load_state_dict fail in many ways
        raise UserError(f"cannot load backbone weights {file}: {_summary(err)}; set backbone.pretrained to an "
                        "open_clip state dict saved with torch.save (tensors only) or safetensors") from None
    if missing or unexpected:
        raise UserError(f"backbone weights file {file} does not match the model {type(model).__name__}: "
                        f"{_keys(missing, 'missing')}{'; ' if missing and unexpected else ''}"
                        f"{_keys(unexpected, 'unexpected')}; is it a checkpoint of backbone.name?")


def _keys(keys: list[str], what: str, shown: int = 3) -> str:
    if not keys:
        return ""
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{len(keys)} {what} keys {', '.join(keys[:shown])}{more}"


def _summary(err: BaseException, limit: int = 240) -> str:
    """One line of an exception: its type and the most telling line of its message (for torch.load's refusal, the
    line naming what ``weights_only=True`` refused; for load_state_dict, the first size mismatch)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        details = [line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the docum"))]
        lines = [f"refused by torch.load(weights_only=True): {details[0] if details else lines[0]}"]
    telling = [line for line in lines if "size mismatch" in line]
    text = (telling or lines or [""])[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _open_clip_from_tag(name: str, tag: str) -> nn.Module:
    """The open_clip model ``name`` with the weights of ``tag``: from the local cache when they are there (no network
    access at all), else downloaded when the download host is reachable, else a UserError at once."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    cached = cached_pretrained_file(cfg)
    advice = (f"on an offline machine, get the weights elsewhere (open_clip.create_model('{name}', "
              f"pretrained='{tag}') downloads them) and set backbone.pretrained=/path/to/weights file")
    if cached is not None:
        try:  # the file, with the tag's preprocessing (what create_model does for the tag after its download)
            return open_clip.create_model(name, pretrained=str(cached), force_preprocess_cfg=cfg)
        except Exception as err:  # noqa: BLE001 - as in load_weights_file
            raise UserError(f"cannot load the cached weights {cached} of {name}/{tag} ({_summary(err)}); delete the "
                            f"file to download it again, or {advice}") from None
    url = download_url(cfg)
    if not network_reachable(url):
        raise UserError(f"pretrained weights {name}/{tag} are not in the local cache ({_cache_location(cfg)}) and "
                        f"{urlparse(url).hostname} cannot be reached; {advice}")
    try:
        return open_clip.create_model(name, pretrained=tag)
    except Exception as err:  # noqa: BLE001 - download and hub errors come in many types
        raise UserError(f"could not fetch pretrained weights {name}/{tag} ({_summary(err)}); {advice}") from None


def _hf_hub_source(cfg: dict) -> tuple[str, list[str]] | None:
    """(repo id, candidate file names) open_clip downloads ``cfg``'s weights from on the Hugging Face hub, or None
    when it downloads them from a plain URL instead."""
    hub = cfg.get("hf_hub", "")
    if not hub or not open_clip.pretrained.has_hf_hub():
        return None
    repo, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    safer = []  # open_clip tries a safetensors twin first when safetensors is installed
    if importlib.util.find_spec("safetensors") is not None:
        if filename == HF_WEIGHTS_NAME:
            safer.append(HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            safer.append(filename[:-4] + ".safetensors")
    return repo, safer + [filename]


def cached_pretrained_file(cfg: dict) -> Path | None:
    """The local copy of the weights of an open_clip pretrained config (``open_clip.get_pretrained_cfg``) that
    ``open_clip.create_model`` would download, if the Hugging Face cache (or open_clip's ``~/.cache/clip`` for
    URL downloads) holds it; else None. Looks at files only, never at the network."""
    hub = _hf_hub_source(cfg)
    if hub is not None:
        from huggingface_hub import try_to_load_from_cache

        repo, candidates = hub
        for filename in candidates:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
        return None
    url = cfg.get("url", "")
    file = Path("~/.cache/clip").expanduser() / os.path.basename(url) if url else None
    return file if file is not None and file.is_file() else None


def _cache_location(cfg: dict) -> str:
    if _hf_hub_source(cfg) is not None:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    return str(Path("~/.cache/clip").expanduser())


def download_url(cfg: dict) -> str:
    """The URL (or hub endpoint) open_clip downloads the weights of pretrained config ``cfg`` from."""
    if _hf_hub_source(cfg) is not None:
        from huggingface_hub import constants

        return constants.ENDPOINT
    return cfg.get("url", "")


def network_reachable(url: str, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the host of ``url`` (or to the HTTPS proxy, when one is configured) opens within
    ``timeout`` seconds: a quick probe before a download that would otherwise retry for a minute offline."""
    host = urlparse(url).hostname
    if not host:
        return False
    proxy = None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get("https")
    target = urlparse(proxy) if proxy else urlparse(url)
    if not target.hostname:
        return False
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
