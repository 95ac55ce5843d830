"""Procedurally generated *shapes*: the offline default dataset.

Each class is a colour and a shape ("red circle", ...). An image is one anti-aliased shape at a random
position, size and rotation, with slight colour jitter, on a grey tinted background with a brightness
gradient and pixel noise. Generation is vectorised over a coordinate grid (no per-image Python loop) and
is a pure function of ``(labels, seed, image_size)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchvision import transforms

from fedlit.config import DataConfig
from fedlit.data.base import DatasetBundle, LabeledImages, Preprocess
from fedlit.data.transforms import train_transform
from fedlit.errors import UserError

# Bump when the rendering changes: it is part of the pretrained backbone's recipe hash.
GENERATOR_VERSION = 1

SHAPES_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "orange": (0.98, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.15),
    "green": (0.15, 0.72, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.25, 0.95),
    "purple": (0.55, 0.15, 0.80),
    "pink": (0.98, 0.50, 0.75),
}
SHAPES_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Label ``c * len(SHAPES_SHAPES) + s`` is colour ``c`` with shape ``s``.
SHAPES_CLASSNAMES: list[str] = [f"{color} {shape}" for color in SHAPES_COLORS for shape in SHAPES_SHAPES]

SHAPES_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} shape.",
    "a drawing of a {}.",
    "an image of a {}.",
    "a small {} on a noisy background.",
    "there is a {} somewhere in this picture, drawn on a grey textured background.",
)

# Fixed data seeds: the dataset never changes with the run seed (partitions use the run seed).
SHAPES_TRAIN_SEED = 1_000
SHAPES_TEST_SEED = 2_000
SHAPES_NATIVE_SIZE = 32


def _check_labels(labels: Tensor) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be a 1-D integer tensor (got shape {tuple(labels.shape)}, {labels.dtype})")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(SHAPES_CLASSNAMES)):
        raise ValueError(f"labels must lie in [0, {len(SHAPES_CLASSNAMES)}); got {labels.min()}..{labels.max()}")
    return labels.long()


RENDER_CHUNK = 2048  # images whose (H, W) geometry temporaries exist at once (about 60 KiB each at 32 px)


def render_shapes(labels: Tensor, generator: torch.Generator, image_size: int = SHAPES_NATIVE_SIZE,
                  chunk: int = RENDER_CHUNK) -> Tensor:
    """Images ``(N, 3, image_size, image_size)`` float32 in [0, 1] for ``labels`` ``(N,)``, drawing every
    random parameter from ``generator`` (advanced in a fixed order, so the output is reproducible). The random
    draws are made for all images first; the per-pixel geometry then runs ``chunk`` images at a time (every
    operation is per image, so the chunk size never changes a pixel)."""
    labels = _check_labels(labels)
    n, size = labels.numel(), image_size
    u = torch.rand(n, 12, generator=generator)
    fg_jitter = 0.16 * (torch.rand(n, 3, generator=generator) - 0.5)
    out = 0.05 * torch.randn(n, 3, size, size, generator=generator)  # the pixel noise; the image is added to it
    for start in range(0, n, max(chunk, 1)):
        part = slice(start, start + chunk)
        out[part] = (_render(labels[part], u[part], fg_jitter[part], size) + out[part]).clamp(0.0, 1.0)
    return out


def _render(labels: Tensor, u: Tensor, fg_jitter: Tensor, size: int) -> Tensor:
    """The noiseless images ``(n, 3, size, size)`` of ``labels`` ``(n,)`` from their random parameters ``u``
    ``(n, 12)`` and colour jitter ``(n, 3)`` (see :func:`render_shapes`)."""
    n = labels.numel()
    color_id = labels // len(SHAPES_SHAPES)
    shape_id = labels % len(SHAPES_SHAPES)
    radius = 0.35 + 0.35 * u[:, 0]  # in grid units: the image spans [-1, 1]
    cx = (2 * u[:, 1] - 1) * (1 - radius)
    cy = (2 * u[:, 2] - 1) * (1 - radius)
    theta = 2 * math.pi * u[:, 3]
    bg_level = 0.2 + 0.5 * u[:, 4]
    grad_angle = 2 * math.pi * u[:, 5]
    grad_amp = 0.15 * u[:, 6]
    bg_tint = 0.1 * (u[:, 7:10] - 0.5)  # (n, 3), low saturation so the background has no class colour

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # (H, W)
    dx = gx - cx[:, None, None]  # (n, H, W)
    dy = gy - cy[:, None, None]
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    pu, pv = cos * dx + sin * dy, -sin * dx + cos * dy  # shape-aligned coordinates
    r = radius[:, None, None]

    # Signed distances (negative inside), one per shape kind, then pick each image's own.
    circle = torch.sqrt(dx**2 + dy**2) - r
    square = torch.maximum(pu.abs(), pv.abs()) - 0.8 * r
    edges = [pu * math.cos(a) + pv * math.sin(a) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    triangle = torch.stack(edges).amax(0) - 0.575 * r  # equilateral, circumradius ~1.15 r
    w = 0.32 * r
    cross = torch.minimum(torch.maximum(pu.abs() - r, pv.abs() - w), torch.maximum(pv.abs() - r, pu.abs() - w))
    sdf = torch.stack([circle, square, triangle, cross], 1)  # (n, 4, H, W)
    sdf = sdf.gather(1, shape_id[:, None, None, None].expand(n, 1, size, size))  # (n, 1, H, W)
    alpha = (0.5 - sdf * (size / 2.0)).clamp(0.0, 1.0)  # one-pixel anti-aliased edge

    palette = torch.tensor(list(SHAPES_COLORS.values()))
    fg = (palette[color_id] + fg_jitter)[:, :, None, None]  # (n, 3, 1, 1)
    ramp = torch.cos(grad_angle)[:, None, None] * gx + torch.sin(grad_angle)[:, None, None] * gy
    bg = (bg_level[:, None, None, None] + bg_tint[:, :, None, None]
          + grad_amp[:, None, None, None] * ramp[:, None])  # (n, 3, H, W)
    return alpha * fg + (1 - alpha) * bg


def generate_shapes(labels: Tensor, seed: int, image_size: int = SHAPES_NATIVE_SIZE) -> Tensor:
    """Images ``(N, 3, image_size, image_size)`` float32 in [0, 1], one per label ``(N,)`` (ids into
    :data:`SHAPES_CLASSNAMES`); identical for identical ``(labels, seed, image_size)``."""
    return render_shapes(labels, torch.Generator().manual_seed(seed), image_size)


def shapes_captions(labels: Tensor, seed: int) -> list[str]:
    """One caption per label ``(N,)``: a template from :data:`SHAPES_TEMPLATES` chosen by ``seed``."""
    labels = _check_labels(labels)
    which = torch.randint(len(SHAPES_TEMPLATES), (labels.numel(),), generator=torch.Generator().manual_seed(seed))
    return [SHAPES_TEMPLATES[t].format(SHAPES_CLASSNAMES[c]) for t, c in zip(which.tolist(), labels.tolist())]


class ShapesImages(LabeledImages):
    """A split of generated images held in memory; ``load_image(i)`` is the raw ``(3, H, W)`` tensor."""

    def __init__(self, images: Tensor, labels: Tensor, transform=None) -> None:
        if images.ndim != 4 or images.shape[0] != len(labels):
            raise ValueError(f"images must be (N, 3, H, W) with N = len(labels); got {tuple(images.shape)}")
        self.images = images
        self.targets = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def load_image(self, index: int) -> Tensor:
        """The raw image ``(3, H, W)`` in [0, 1]."""
        return self.images[index]


def _split(per_class: int, seed: int, transform, brightness: float = 1.0) -> ShapesImages:
    labels = torch.arange(len(SHAPES_CLASSNAMES)).repeat_interleave(per_class)
    return ShapesImages((generate_shapes(labels, seed) * brightness).clamp(0, 1), labels, transform)


def build_shapes(cfg: DataConfig, preprocess: Preprocess) -> DatasetBundle:
    """The shapes dataset: ``cfg.train_per_class`` train and ``cfg.test_per_class`` test images per class,
    from fixed seeds (independent of the run seed), normalised (and resized) as ``preprocess`` asks. With
    ``data.augment=true`` (default off) the train split gets the random train transform of the CLIP datasets
    (random-resized-crop + horizontal flip + normalise)."""
    if not 0.0 < cfg.shapes_brightness <= 1.0:
        raise UserError(f"data.shapes_brightness must be in (0, 1] (got {cfg.shapes_brightness})")
    if cfg.train_per_class < 1 or cfg.test_per_class < 1:
        raise UserError(f"data.train_per_class and data.test_per_class must be >= 1 "
                        f"(got {cfg.train_per_class}, {cfg.test_per_class})")
    steps: list = []
    if preprocess.image_size != SHAPES_NATIVE_SIZE:
        mode = transforms.InterpolationMode(preprocess.interpolation)
        steps.append(transforms.Resize(preprocess.image_size, interpolation=mode, antialias=True))
    steps.append(transforms.Normalize(preprocess.mean, preprocess.std))
    transform = transforms.Compose(steps)
    augment = bool(cfg.augment)
    transform_id = (f"shapes-v{GENERATOR_VERSION}-{SHAPES_NATIVE_SIZE}px-resize{preprocess.image_size}"
                    f"-{preprocess.interpolation}-mean{list(preprocess.mean)}-std{list(preprocess.std)}"
                    f"-brightness{cfg.shapes_brightness}")
    return DatasetBundle(
        name="shapes",
        classnames=list(SHAPES_CLASSNAMES),
        train=_split(cfg.train_per_class, SHAPES_TRAIN_SEED,
                     train_transform(preprocess, True) if augment else transform, cfg.shapes_brightness),
        test=_split(cfg.test_per_class, SHAPES_TEST_SEED, transform, cfg.shapes_brightness),
        transform_id=transform_id,
        augmented=augment,
    )
