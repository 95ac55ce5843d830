"""Tiny CLIPs contrastively pretrained offline: ``shapes-clip`` (generated shapes, the offline default backbone) and
``fashion-clip`` (real Fashion-MNIST photos of a subset of its classes).

A randomly initialised CLIP does not behave like CLIP (zero-shot at chance, prompts barely learn), and
no weights can be downloaded offline, so fedlit ships *recipes* and builds the weights on first use. A recipe
(:class:`ClipRecipe`) fixes the model size, the optimisation and the image-caption stream: its dataset, classes and
caption templates. One implementation trains every recipe. The result is cached as ``<cache_dir>/<name>-<hash>.pt``,
keyed by a hash of the recipe, and is the same for the same recipe (seeded model init and a seeded data stream).
While it trains, the loop's whole state (weights, optimiser, data stream) is saved every :data:`CHECKPOINT_EVERY`
steps to ``<name>-<hash>.partial.pt`` (atomically), so an interrupted build (Ctrl-C, a killed job) continues from
there on the next use and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from fedlit.clip_text import encode_text_cut
from fedlit.data.base import Preprocess
from fedlit.data.fashion_mnist import FASHION_CLASSNAMES, MissingDataset, find_fashion_mnist, load_split
from fedlit.data.shapes import (
    GENERATOR_VERSION,
    SHAPES_CLASSNAMES,
    SHAPES_NATIVE_SIZE,
    SHAPES_TEMPLATES,
    render_shapes,
)
from fedlit.errors import UserError
from fedlit.io import FileLock, atomic_write
from fedlit.io import default_cache_dir as default_cache_dir  # re-exported: pretrain.default_cache_dir() still works
from fedlit.progress import progress_bar

# Bump when the training procedure changes in a way the recipe fields do not capture.
FORMAT_VERSION = 1
CHECKPOINT_EVERY = 25  # pretraining steps between two saves of the loop's state (a few seconds on 2 CPU cores)

@dataclass(frozen=True)
class ClipRecipe(abc.ABC):
    """Everything that determines a built-in CLIP's weights (the cache key hashes these fields and
    :meth:`hash_payload`). Subclasses name the backbone (``name``), its image size and its image-caption stream."""

    embed_dim: int = 128
    patch_size: int = 4
    vision_width: int = 128
    vision_layers: int = 3
    vision_head_width: int = 32
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 3
    steps: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 40
    seed: int = 0  # model init
    data_seed: int = 12_345  # stream of images and captions (shapes: disjoint from the dataset's seeds)

    name: ClassVar[str] = ""  # the backbone name and the cached file's prefix
    image_size: ClassVar[int] = 0

    @abc.abstractmethod
    def classnames(self) -> list[str]:
        """The class names the captions use, indexed by the stream's labels."""

    @abc.abstractmethod
    def templates(self) -> tuple[str, ...]:
        """Caption templates, each with one ``{}`` for the class name."""

    @abc.abstractmethod
    def hash_payload(self) -> dict:
        """What :func:`recipe_hash` hashes: the recipe's fields and what the code fixes (classes, templates)."""

    @abc.abstractmethod
    def stream(self, data_root: str | Path | None) -> ImageStream:
        """The stream of labelled training images (``data_root``: where a real dataset is looked for)."""

    def preprocess(self) -> Preprocess:
        """The images the pretrained model expects: ``image_size`` px, the OpenAI CLIP statistics."""
        return Preprocess(image_size=self.image_size, mean=tuple(open_clip.OPENAI_DATASET_MEAN),  # type: ignore[arg-type]
                          std=tuple(open_clip.OPENAI_DATASET_STD))  # type: ignore[arg-type]

    def model_cfg(self) -> dict:
        """Keyword arguments of ``open_clip.CLIP`` for this recipe (a ViT image tower; standard vocab and context
        length, so ``open_clip.tokenize`` works)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch_size,
                           "width": self.vision_width, "layers": self.vision_layers,
                           "head_width": self.vision_head_width},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": self.text_width,
                         "heads": self.text_heads, "layers": self.text_layers},
        }


class ImageStream(Protocol):
    """A recipe's source of training pairs, drawn from one ``torch.Generator`` in a fixed order."""

    def labels(self, generator: torch.Generator, n: int) -> Tensor:
        """``n`` labels ``(n,)`` int64, indices into the recipe's :meth:`ClipRecipe.classnames`."""

    def images(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Raw images ``(n, 3, S, S)`` float32 in [0, 1] of ``labels`` ``(n,)``, ``S`` the recipe's image size."""


class _ShapesStream:
    """Freshly rendered shapes at every step (``render_shapes``, looked up at call time)."""

    def labels(self, generator: torch.Generator, n: int) -> Tensor:
        return torch.randint(len(SHAPES_CLASSNAMES), (n,), generator=generator)

    def images(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        return render_shapes(labels, generator)


@dataclass(frozen=True)
class ShapesClipRecipe(ClipRecipe):
    """``shapes-clip``: 32 px generated shapes of all 32 classes, a fresh batch at every step."""

    name: ClassVar[str] = "shapes-clip"
    image_size: ClassVar[int] = SHAPES_NATIVE_SIZE

    def classnames(self) -> list[str]:
        return list(SHAPES_CLASSNAMES)

    def templates(self) -> tuple[str, ...]:
        return SHAPES_TEMPLATES

    def hash_payload(self) -> dict:
        return {"recipe": asdict(self), "format": FORMAT_VERSION, "generator": GENERATOR_VERSION,
                "classnames": SHAPES_CLASSNAMES, "templates": list(SHAPES_TEMPLATES)}

    def stream(self, data_root: str | Path | None) -> ImageStream:
        return _ShapesStream()


FASHION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a grayscale photo of a {}.",
    "a product photo of a {}.",
    "a low resolution photo of a {}.",
    "a {}, an item of clothing or an accessory.",
    "a centred picture of a {} on a black background.",
)


class _ArrayStream:
    """Real images of a few classes: a uniformly drawn class, then a uniformly drawn image of it, flipped left-right
    with probability 1/2. ``images`` uint8 ``(N, S, S)`` sorted by ``labels`` ``(N,)`` (0..C-1, every class present)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.pool = images
        self.counts = torch.bincount(labels)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts

    def labels(self, generator: torch.Generator, n: int) -> Tensor:
        return torch.randint(len(self.counts), (n,), generator=generator)

    def images(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        position = (torch.rand(len(labels), generator=generator) * self.counts[labels]).long()
        picked = self.pool[self.offsets[labels] + position].float().div_(255.0)  # (n, S, S)
        flip = torch.rand(len(labels), generator=generator) < 0.5
        picked[flip] = picked[flip].flip(-1)
        return picked[:, None].expand(-1, 3, -1, -1).contiguous()


@dataclass(frozen=True)
class FashionClipRecipe(ClipRecipe):
    """``fashion-clip``: Fashion-MNIST's real 28 px train photos of ``classes`` only (default the first five, the base
    half of ``eval.protocol=base2novel``: its novel classes are unseen by both towers), leaving out the first
    ``skip_per_class`` train images of each class (what ``data.max_train_per_class <= skip_per_class`` gives the
    clients: images the backbone never saw). The test split is never used."""

    patch_size: int = 7  # a 4 x 4 grid of 7 px patches (+ the class token): cheap on a CPU
    steps: int = 300
    warmup_steps: int = 30
    classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    skip_per_class: int = 1000

    name: ClassVar[str] = "fashion-clip"
    image_size: ClassVar[int] = 28

    def classnames(self) -> list[str]:
        return [FASHION_CLASSNAMES[c] for c in self.classes]

    def templates(self) -> tuple[str, ...]:
        return FASHION_TEMPLATES

    def hash_payload(self) -> dict:
        return {"recipe": asdict(self), "format": FORMAT_VERSION, "dataset": "fashion_mnist", "split": "train",
                "classnames": self.classnames(), "templates": list(FASHION_TEMPLATES)}

    def stream(self, data_root: str | Path | None) -> ImageStream:
        try:
            images, labels = load_split(find_fashion_mnist(data_root or "data"), "train")
        except (MissingDataset, ValueError) as err:
            raise UserError(f"backbone {self.name} is pretrained on Fashion-MNIST: {err}") from None
        chosen_images, chosen_labels = [], []
        for new_label, label in enumerate(self.classes):
            members = torch.from_numpy(labels == label).nonzero().flatten()[self.skip_per_class:]
            if len(members) == 0:
                raise UserError(f"backbone {self.name}: no Fashion-MNIST train image of class {label} "
                                f"({FASHION_CLASSNAMES[label]}) after the first {self.skip_per_class}")
            chosen_images.append(torch.from_numpy(images)[members])
            chosen_labels.append(torch.full((len(members),), new_label))
        return _ArrayStream(torch.cat(chosen_images), torch.cat(chosen_labels))


DEFAULT_RECIPE = ShapesClipRecipe()
SHAPES_CLIP_PREPROCESS = DEFAULT_RECIPE.preprocess()  # 32 px, the OpenAI CLIP statistics
FASHION_RECIPE = FashionClipRecipe()
RECIPES: dict[str, ClipRecipe] = {DEFAULT_RECIPE.name: DEFAULT_RECIPE, FASHION_RECIPE.name: FASHION_RECIPE}


def recipe_hash(recipe: ClipRecipe) -> str:
    """sha256 hex digest (first 16 characters) of ``recipe.hash_payload()``: the recipe's fields, the format
    version and what the stream fixes (shapes: the generator version, class names and caption templates)."""
    return hashlib.sha256(json.dumps(recipe.hash_payload(), sort_keys=True).encode()).hexdigest()[:16]


def clip_path(cache_dir: str | Path, recipe: ClipRecipe = DEFAULT_RECIPE) -> Path:
    """Where the weights of ``recipe`` are cached: ``<cache_dir>/<recipe.name>-<hash>.pt``."""
    return Path(cache_dir).expanduser() / f"{recipe.name}-{recipe_hash(recipe)}.pt"


shapes_clip_path = clip_path


def normalize_images(images: Tensor, preprocess: Preprocess = SHAPES_CLIP_PREPROCESS) -> Tensor:
    """Raw images ``(N, 3, H, W)`` in [0, 1] -> normalised with ``preprocess.mean/std``."""
    mean = torch.tensor(preprocess.mean, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def _caption_tokens(recipe: ClipRecipe) -> Tensor:
    """Tokens of every (template, class) caption of ``recipe``, ``(T, C, 77)``."""
    templates, names = recipe.templates(), recipe.classnames()
    tokens = open_clip.tokenize([t.format(name) for t in templates for name in names])
    return tokens.view(len(templates), len(names), -1)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in open_clip training: no decay on gains, biases, embeddings of positions, scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exclude = p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name or "positional" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, labels: Tensor) -> Tensor:
    """Symmetric cross-entropy on ``logit_scale * cos`` ``(B, B)`` (CLIP's loss), where every pair of the
    same class counts as a positive (targets spread evenly over them): with 32 classes a batch of 128
    repeats classes, and treating those repeats as negatives would fight the class structure."""
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def _lr_at(step: int, recipe: ClipRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.5 * recipe.lr * (1 + math.cos(math.pi * progress))


def partial_path(cache_dir: str | Path, recipe: ClipRecipe = DEFAULT_RECIPE) -> Path:
    """Where an unfinished pretraining of ``recipe`` keeps its loop state (removed once the weights are cached)."""
    return clip_path(cache_dir, recipe).with_suffix(".partial.pt")


def _resume_state(path: Path | None, recipe: ClipRecipe) -> dict | None:
    """The loop state saved at ``path`` for ``recipe``, or None (no file, or one that cannot be read or belongs to
    another recipe: the pretraining then starts over)."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a truncated or foreign file: start over
        return None
    if not isinstance(state, dict) or state.get("recipe_hash") != recipe_hash(recipe):
        return None
    return state


def train_clip(recipe: ClipRecipe = DEFAULT_RECIPE, progress: bool = True, checkpoint: Path | None = None,
               every: int | None = None, data_root: str | Path | None = None,
               stream: ImageStream | None = None) -> open_clip.CLIP:
    """Pretrain a CLIP of ``recipe.model_cfg()`` contrastively on a fresh batch of images and captions of the
    recipe's stream at every step (``recipe.steps * recipe.batch_size`` pairs in all); returns it in eval mode.
    ``stream``: the recipe's :meth:`ClipRecipe.stream` (built from ``data_root`` when None).
    ``progress``: a bar over the steps with the loss (on a terminal, see :func:`fedlit.progress.progress_bar`).
    ``checkpoint``: a file for the loop state (weights, optimiser, data stream and torch's RNG), written atomically
    every ``every`` steps (default :data:`CHECKPOINT_EVERY`) and resumed from when it holds this recipe's state: the
    weights are bitwise those of an uninterrupted pretraining."""
    every = every or CHECKPOINT_EVERY
    stream = stream if stream is not None else recipe.stream(data_root)
    preprocess = recipe.preprocess()
    torch.manual_seed(recipe.seed)
    model = open_clip.CLIP(**recipe.model_cfg())
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr,
                                  betas=(0.9, 0.98), eps=1e-6)
    all_tokens = _caption_tokens(recipe)
    generator = torch.Generator().manual_seed(recipe.data_seed)
    start = 0
    saved = _resume_state(checkpoint, recipe)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["rng"])
        start = int(saved["step"])
        if progress:
            print(f"[{recipe.name}] resuming the pretraining at step {start} of {recipe.steps}", flush=True)
    bar = progress_bar(recipe.steps, f"{recipe.name} pretraining", enabled=progress, initial=start, unit="step")
    for step in range(start, recipe.steps):
        labels = stream.labels(generator, recipe.batch_size)
        template = torch.randint(len(all_tokens), (recipe.batch_size,), generator=generator)
        images = normalize_images(stream.images(labels, generator), preprocess)
        tokens = all_tokens[template, labels]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, recipe)
        loss = contrastive_loss(model.encode_image(images), encode_text_cut(model, tokens),
                                model.logit_scale.exp(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.update(1)
        if checkpoint is not None and (step + 1) % every == 0 and step + 1 < recipe.steps:
            state = {"recipe_hash": recipe_hash(recipe), "step": step + 1, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                     "rng": torch.get_rng_state()}
            atomic_write(checkpoint, lambda f, state=state: torch.save(state, f))
    bar.close()
    return model.eval()


def build_clip(cache_dir: str | Path, recipe: ClipRecipe = DEFAULT_RECIPE, progress: bool = True,
               data_root: str | Path | None = None) -> Path:
    """Path of the cached weights of ``recipe`` under ``cache_dir``, training them first if missing (a real
    dataset's stream is read from ``data_root`` first, so a missing dataset is a UserError before anything is
    written).

    The file is a dict ``{"recipe", "recipe_hash", "model_cfg", "preprocess", "state_dict"}``, written to a
    temporary file and renamed into place under an exclusive lock (``<name>-<hash>.lock``, removed afterwards),
    so concurrent builders train once and readers never see a partial file. An interrupted build resumes from
    :func:`partial_path`, removed once the weights are in place.
    """
    path = clip_path(cache_dir, recipe)
    if path.is_file():
        return path
    stream = recipe.stream(data_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_suffix(".lock")):
        if path.is_file():  # another process built it while we waited
            return path
        if progress:
            print(f"[{recipe.name}] building {path.name} (one-time, cached in {path.parent})", flush=True)
        start = time.perf_counter()
        model = train_clip(recipe, progress, checkpoint=partial_path(cache_dir, recipe), stream=stream)
        payload = {
            "recipe": asdict(recipe),
            "recipe_hash": recipe_hash(recipe),
            "model_cfg": recipe.model_cfg(),
            "preprocess": asdict(recipe.preprocess()),
            "state_dict": model.state_dict(),
        }
        atomic_write(path, lambda f: torch.save(payload, f))
        partial_path(cache_dir, recipe).unlink(missing_ok=True)
        if progress:
            print(f"[{recipe.name}] built in {time.perf_counter() - start:.1f}s -> {path}", flush=True)
    return path


def load_clip(cache_dir: str | Path, recipe: ClipRecipe = DEFAULT_RECIPE, progress: bool = True,
              data_root: str | Path | None = None) -> open_clip.CLIP:
    """The pretrained CLIP of ``recipe`` in eval mode (built and cached on first use, see :func:`build_clip`)."""
    path = build_clip(cache_dir, recipe, progress, data_root)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("recipe_hash") != recipe_hash(recipe):
            raise UserError(f"{path} does not hold the weights of this recipe; delete it to rebuild")
        model = open_clip.CLIP(**payload["model_cfg"])
        model.load_state_dict(payload["state_dict"])
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file fails in torch.load or load_state_dict
        raise UserError(f"cannot load the cached {recipe.name} weights {path} ({type(err).__name__}); "
                        "delete it to rebuild") from None
    return model.eval()


# The shapes-clip names of the functions above (the recipe argument defaults to shapes-clip's everywhere).
train_shapes_clip = train_clip
build_shapes_clip = build_clip
load_shapes_clip = load_clip
