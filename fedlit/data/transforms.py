"""Image transforms of SPEC §4, built from a backbone's :class:`Preprocess` (size, mean/std, interpolation).

Test: resize the short side to ``image_size`` + centre crop + normalise (what open_clip's eval transform
does). Train with augmentation: random-resized-crop (scale 0.08–1) + horizontal flip + normalise (CoOp's
recipe for the CLIP datasets). Both accept PIL images and float tensors ``(3, H, W)`` in [0, 1] and return
a float32 tensor ``(3, image_size, image_size)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from fedlit.data.base import Preprocess
from fedlit.errors import UserError

_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                   "nearest": InterpolationMode.NEAREST}


def _interpolation(pre: Preprocess) -> InterpolationMode:
    if pre.interpolation not in _INTERPOLATIONS:
        raise UserError(f"unknown interpolation '{pre.interpolation}'; choose one of "
                        f"{', '.join(_INTERPOLATIONS)}")
    return _INTERPOLATIONS[pre.interpolation]


class ToFloatTensor:
    """PIL image (any mode) -> RGB float32 tensor ``(3, H, W)`` in [0, 1]; tensors pass through.

    uint8 tensors are scaled by 1/255; float tensors must already be ``(3, H, W)`` in [0, 1].
    """

    def __call__(self, image: Any) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return F.to_tensor(image.convert("RGB"))
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"expected an image tensor of shape (3, H, W), got {tuple(image.shape)}")
            if image.dtype == torch.uint8:
                return image.float().div_(255.0)
            return image.float()
        raise ValueError(f"expected a PIL image or a (3, H, W) tensor, got {type(image).__name__}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _normalize(pre: Preprocess) -> list[Callable]:
    return [ToFloatTensor(), T.Normalize(mean=list(pre.mean), std=list(pre.std))]


def test_transform(pre: Preprocess) -> Callable[[Any], torch.Tensor]:
    """Deterministic eval transform: image -> normalised float tensor ``(3, S, S)``, ``S = pre.image_size``.

    Resize of the short side to S (``pre.interpolation``, antialiased), centre crop S×S, scale to [0, 1],
    normalise with ``pre.mean``/``pre.std``. PIL inputs are resized by PIL, exactly as open_clip does.
    """
    size = pre.image_size
    return T.Compose([T.Resize(size, interpolation=_interpolation(pre), antialias=True),
                      T.CenterCrop(size), *_normalize(pre)])


def train_transform(pre: Preprocess, augment: bool) -> Callable[[Any], torch.Tensor]:
    """Train transform: with ``augment``, random-resized-crop to ``(3, S, S)`` (scale 0.08–1, default aspect
    ratios) + horizontal flip (p = 0.5) + normalise; without, the deterministic :func:`test_transform`.

    Randomness draws from torch's global generator (seed it per client for reproducible augmentation).
    """
    if not augment:
        return test_transform(pre)
    crop = T.RandomResizedCrop(pre.image_size, scale=(0.08, 1.0), interpolation=_interpolation(pre),
                               antialias=True)
    return T.Compose([crop, T.RandomHorizontalFlip(p=0.5), *_normalize(pre)])


def transform_id(pre: Preprocess) -> str:
    """A stable string naming :func:`test_transform` for ``pre`` (keys the feature cache)."""

    def fmt(values: tuple[float, ...]) -> str:
        return ",".join(format(float(v), ".8g") for v in values)

    return (f"resize{pre.image_size}-{pre.interpolation}-centercrop{pre.image_size}"
            f"-mean{fmt(pre.mean)}-std{fmt(pre.std)}")


test_transform.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name
