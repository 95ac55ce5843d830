"""Cached image features of a frozen backbone.

The backbone never changes, so the features of every image under a deterministic transform are computed once per
(backbone, weights, dataset, split, transform) and reused for every round and client. The cache lives in memory and,
when given a directory, on disk (memory-mapped on load) so that a sweep computes them once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fedlit.backbone import Backbone
from fedlit.errors import UserError
from fedlit.io import atomic_write
from fedlit.progress import progress_bar

POOLED, PATCHES = "pooled", "patches"  # image feature kinds: one (D,) feature per image, or (P+1, D) tokens
FEATURE_KINDS = (POOLED, PATCHES)
# An image-side prompt module's kind (``image_feature_kind = TOKENS``): the frozen tokens ``(1+P, W)`` entering
# block L of the ViT image tower, kept per start layer as the kind ``token_kind(L)`` ("tokens@L").
TOKENS = "tokens"


def token_kind(start_layer: int) -> str:
    """The feature kind of the frozen image-tower tokens entering block ``start_layer`` (:func:`visual_tokens`)."""
    return f"{TOKENS}@{int(start_layer)}"


def token_start_layer(kind: str) -> int | None:
    """The start layer of a :func:`token_kind` (None for any other kind)."""
    head, _, layer = kind.partition("@")
    return int(layer) if head == TOKENS and layer.isdigit() else None


def check_kind(kind: str) -> None:
    """ValueError unless ``kind`` is pooled, patches or a :func:`token_kind`."""
    if kind not in FEATURE_KINDS and token_start_layer(kind) is None:
        raise ValueError(f"unknown image feature kind {kind!r}; choose one of {FEATURE_KINDS} or tokens@<layer>")


def sample_dims(kind: str) -> int:
    """Dimensions of one image's features of ``kind``: 1 pooled ``(D,)``, 2 patches ``(P+1, D)`` or tokens
    ``(1+P, W)``."""
    check_kind(kind)
    return 1 if kind == POOLED else 2


@torch.no_grad()
def encode_dataset(backbone: Backbone, dataset: Dataset, batch_size: int = 256, num_workers: int = 0,
                   device: str | torch.device = "cpu", kind: str = POOLED, progress: bool = False,
                   desc: str = "image features") -> Tensor:
    """Image features (float32, on CPU) of every item of ``dataset``, in order: ``(N, D)`` normalised pooled,
    ``(N, P+1, D)`` normalised per-token (``kind="patches"``, :meth:`Backbone.encode_image_patches`), or the frozen
    tokens ``(N, 1+P, W)`` entering block L of the image tower (``kind=token_kind(L)``,
    :meth:`Backbone.image_tokens`). ``progress``: a bar ``desc`` over the images (on a terminal, see
    :func:`fedlit.progress.progress_bar`)."""
    check_kind(kind)
    start = token_start_layer(kind)
    if start is not None:
        def encode(images: Tensor) -> Tensor:
            return backbone.image_tokens(images, start)
    else:
        encode = backbone.encode_image if kind == POOLED else backbone.encode_image_patches
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    chunks = []
    with progress_bar(len(dataset), desc, enabled=progress, unit="img") as bar:
        for images, _ in loader:
            chunks.append(encode(images.to(device)).float().cpu())
            bar.update(len(images))
    return torch.cat(chunks) if chunks else torch.empty(0, backbone.feature_dim)


def feature_key(backbone: Backbone, dataset_name: str, split: str, transform_id: str, size: int,
                views: int = 0, kind: str = POOLED) -> str:
    """Cache key: a hash of the backbone fingerprint, dataset, split, transform, length, augmented views and, for
    other kinds than pooled features, the kind (pooled keys are those of earlier versions)."""
    text = f"{backbone.fingerprint}|{dataset_name}|{split}|{transform_id}|{size}|{views}"
    text += f"|{kind}" if kind != POOLED else ""
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class FeatureCache:
    """Features by key: in memory, plus ``directory/<key>.pt`` when a directory is given."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory).expanduser() if directory else None
        self._memory: dict[str, Tensor] = {}

    def get_or_compute(self, key: str, compute) -> Tensor:
        """The cached tensor for ``key``, calling ``compute()`` (and storing its result) on a miss."""
        if key in self._memory:
            return self._memory[key]
        path = self.directory / f"{key}.pt" if self.directory else None
        if path is not None and path.is_file():
            features = _load_features(path)
        else:
            features = compute()
            if path is not None:
                atomic_write(path, lambda f: torch.save(features, f))
        self._memory[key] = features
        return features


def _load_features(path: Path) -> Tensor:
    """The tensor cached at ``path`` (memory-mapped); a corrupt or foreign file raises a UserError naming it."""
    try:
        features = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch.load fails in many ways on a damaged file
        raise UserError(f"cannot read the cached features {path} ({type(err).__name__}); delete it to "
                        "recompute them") from None
    if not isinstance(features, Tensor):
        raise UserError(f"the cached features {path} hold a {type(features).__name__}, not a tensor; delete it to "
                        "recompute them")
    return features
