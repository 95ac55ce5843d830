"""A tiny CLIP contrastively pretrained on generated shapes: the offline default backbone.

A randomly initialised CLIP does not behave like CLIP (zero-shot at chance, prompts barely learn), and
no weights can be downloaded offline, so fedlit ships a *recipe* and builds the weights on first use.
The result is cached as ``<cache_dir>/shapes-clip-<hash>.pt``, keyed by a hash of the recipe, and is
the same for the same recipe (seeded model init and a seeded data stream). While it trains, the loop's whole state
(weights, optimiser, data stream) is saved every :data:`CHECKPOINT_EVERY` steps to
``shapes-clip-<hash>.partial.pt`` (atomically), so an interrupted build (Ctrl-C, a killed job) continues from there
on the next use and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from fedlit.clip_text import encode_text_cut
from fedlit.data.base import Preprocess
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

# The images the pretrained model expects: 32 px, normalised with the OpenAI CLIP statistics.
SHAPES_CLIP_PREPROCESS = Preprocess(
    image_size=SHAPES_NATIVE_SIZE,
    mean=tuple(open_clip.OPENAI_DATASET_MEAN),  # type: ignore[arg-type]
    std=tuple(open_clip.OPENAI_DATASET_STD),  # type: ignore[arg-type]
)


@dataclass(frozen=True)
class ShapesClipRecipe:
    """Everything that determines the pretrained weights (the cache key hashes these fields)."""

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
    data_seed: int = 12_345  # stream of generated images and captions (disjoint from the dataset's seeds)

    def model_cfg(self) -> dict:
        """Keyword arguments of ``open_clip.CLIP`` for this recipe (standard vocab and context length, so
        ``open_clip.tokenize`` works)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": SHAPES_NATIVE_SIZE, "patch_size": self.patch_size,
                           "width": self.vision_width, "layers": self.vision_layers,
                           "head_width": self.vision_head_width},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": self.text_width,
                         "heads": self.text_heads, "layers": self.text_layers},
        }


DEFAULT_RECIPE = ShapesClipRecipe()


def recipe_hash(recipe: ShapesClipRecipe) -> str:
    """sha256 hex digest (first 16 characters) of the recipe's fields, the format and generator versions,
    the class names and the caption templates."""
    payload = {"recipe": asdict(recipe), "format": FORMAT_VERSION, "generator": GENERATOR_VERSION,
               "classnames": SHAPES_CLASSNAMES, "templates": list(SHAPES_TEMPLATES)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def shapes_clip_path(cache_dir: str | Path, recipe: ShapesClipRecipe = DEFAULT_RECIPE) -> Path:
    """Where the weights of ``recipe`` are cached."""
    return Path(cache_dir).expanduser() / f"shapes-clip-{recipe_hash(recipe)}.pt"


def normalize_images(images: Tensor, preprocess: Preprocess = SHAPES_CLIP_PREPROCESS) -> Tensor:
    """Raw images ``(N, 3, H, W)`` in [0, 1] -> normalised with ``preprocess.mean/std``."""
    mean = torch.tensor(preprocess.mean, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def _caption_tokens() -> Tensor:
    """Tokens of every (template, class) caption, ``(len(SHAPES_TEMPLATES), C, 77)``."""
    texts = [t.format(name) for t in SHAPES_TEMPLATES for name in SHAPES_CLASSNAMES]
    return open_clip.tokenize(texts).view(len(SHAPES_TEMPLATES), len(SHAPES_CLASSNAMES), -1)


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


def _lr_at(step: int, recipe: ShapesClipRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.5 * recipe.lr * (1 + math.cos(math.pi * progress))


def partial_path(cache_dir: str | Path, recipe: ShapesClipRecipe = DEFAULT_RECIPE) -> Path:
    """Where an unfinished pretraining of ``recipe`` keeps its loop state (removed once the weights are cached)."""
    return shapes_clip_path(cache_dir, recipe).with_suffix(".partial.pt")


def _resume_state(path: Path | None, recipe: ShapesClipRecipe) -> dict | None:
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


def train_shapes_clip(recipe: ShapesClipRecipe = DEFAULT_RECIPE, progress: bool = True,
                      checkpoint: Path | None = None, every: int | None = None) -> open_clip.CLIP:
    """Pretrain a CLIP of ``recipe.model_cfg()`` contrastively on a fresh batch of generated images and
    captions at every step (``recipe.steps * recipe.batch_size`` images in all); returns it in eval mode.
    ``progress``: a bar over the steps with the loss (on a terminal, see :func:`fedlit.progress.progress_bar`).
    ``checkpoint``: a file for the loop state (weights, optimiser, data stream and torch's RNG), written atomically
    every ``every`` steps (default :data:`CHECKPOINT_EVERY`) and resumed from when it holds this recipe's state: the
    weights are bitwise those of an uninterrupted pretraining."""
    every = every or CHECKPOINT_EVERY
    torch.manual_seed(recipe.seed)
    model = open_clip.CLIP(**recipe.model_cfg())
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr,
                                  betas=(0.9, 0.98), eps=1e-6)
    all_tokens = _caption_tokens()
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
            print(f"[shapes-clip] resuming the pretraining at step {start} of {recipe.steps}", flush=True)
    bar = progress_bar(recipe.steps, "shapes-clip pretraining", enabled=progress, initial=start, unit="step")
    for step in range(start, recipe.steps):
        labels = torch.randint(len(SHAPES_CLASSNAMES), (recipe.batch_size,), generator=generator)
        template = torch.randint(len(SHAPES_TEMPLATES), (recipe.batch_size,), generator=generator)
        images = normalize_images(render_shapes(labels, generator))
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


def build_shapes_clip(cache_dir: str | Path, recipe: ShapesClipRecipe = DEFAULT_RECIPE,
                      progress: bool = True) -> Path:
    """Path of the cached weights of ``recipe`` under ``cache_dir``, training them first if missing.

    The file is a dict ``{"recipe", "recipe_hash", "model_cfg", "preprocess", "state_dict"}``, written to a
    temporary file and renamed into place under an exclusive lock (``shapes-clip-<hash>.lock``, removed afterwards),
    so concurrent builders train once and readers never see a partial file. An interrupted build resumes from
    :func:`partial_path`, removed once the weights are in place.
    """
    path = shapes_clip_path(cache_dir, recipe)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_suffix(".lock")):
        if path.is_file():  # another process built it while we waited
            return path
        if progress:
            print(f"[shapes-clip] building {path.name} (one-time, cached in {path.parent})", flush=True)
        start = time.perf_counter()
        model = train_shapes_clip(recipe, progress, checkpoint=partial_path(cache_dir, recipe))
        payload = {
            "recipe": asdict(recipe),
            "recipe_hash": recipe_hash(recipe),
            "model_cfg": recipe.model_cfg(),
            "preprocess": asdict(SHAPES_CLIP_PREPROCESS),
            "state_dict": model.state_dict(),
        }
        atomic_write(path, lambda f: torch.save(payload, f))
        partial_path(cache_dir, recipe).unlink(missing_ok=True)
        if progress:
            print(f"[shapes-clip] built in {time.perf_counter() - start:.1f}s -> {path}", flush=True)
    return path


def load_shapes_clip(cache_dir: str | Path, recipe: ShapesClipRecipe = DEFAULT_RECIPE,
                     progress: bool = True) -> open_clip.CLIP:
    """The pretrained shapes CLIP of ``recipe`` in eval mode (built and cached on first use)."""
    path = build_shapes_clip(cache_dir, recipe, progress)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("recipe_hash") != recipe_hash(recipe):
            raise UserError(f"{path} does not hold the weights of this recipe; delete it to rebuild")
        model = open_clip.CLIP(**payload["model_cfg"])
        model.load_state_dict(payload["state_dict"])
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file fails in torch.load or load_state_dict
        raise UserError(f"cannot load the cached shapes-clip weights {path} ({type(err).__name__}); "
                        "delete it to rebuild") from None
    return model.eval()
