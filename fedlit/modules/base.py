"""Shared pieces of the client LightningModules: the frozen backbone, metrics, steps and optimisers.

A client module owns only a few small tensors (prompt, gate); the frozen backbone is one object shared by every
module of a process. ``client_state`` / ``load_client_state`` move those tensors in and out as plain tensors, so
that a federated simulator can keep many clients' state in a store and swap it into one module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from fedlit.backbone import Backbone, load_backbone
from fedlit.config import OptimConfig
from fedlit.data.features import POOLED, token_start_layer


def cosine_factor(epoch: int, epochs: int) -> float:
    """CoOp's per-epoch cosine decay ``0.5 (1 + cos(pi * epoch / epochs))`` (1 at epoch 0)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / max(epochs, 1)))


def as_config(cls: type, value: Any) -> Any:
    """``value`` as the dataclass ``cls``: None gives the defaults, a dict (e.g. from a checkpoint's
    hyper-parameters) its fields."""
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value


PLAN_EXTRAS_KEY = "fedlit_plan_extras"  # a checkpoint's per-method inputs (set_extras), written by fedlit export


def _drop_backbone_entries(module: L.LightningModule, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: the frozen backbone is shared and loaded on its own, never saved with a client."""
    for key in [k for k in state_dict if k.startswith(prefix + "backbone.")]:
        del state_dict[key]


def _ignore_missing_backbone_entries(module: L.LightningModule, incompatible_keys) -> None:
    """Load post-hook: a client's state dict has no backbone entries; strict loading must not ask for them."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith("backbone.") and ".backbone." not in k]


class ClientModule(L.LightningModule):
    """Base class: ``forward(x) -> logits (B, C)`` where ``x`` is images ``(B, 3, H, W)`` or cached image
    features ``(B, D)``; one cross-entropy in ``training_step``; accuracy in validation/test steps.

    ``backbone``: the frozen :class:`~fedlit.backbone.Backbone`, or its name for :func:`~fedlit.backbone.load_backbone`
    with ``backbone_pretrained`` (an open_clip tag or weights file), e.g. from ``LightningCLI``
    (``--model.backbone=RN50-quickgelu --model.backbone_pretrained=openai``). The hyper-parameters record the
    backbone's name and weights tag either way, and the learning rates in ``optim``."""

    # Whether a class's text features depend on which classes are the candidates (:meth:`candidate_text_features`)
    text_depends_on_candidates = False
    # The cached image features this module reads (fedlit.data.features): "pooled" ``(D,)`` per image by default;
    # an image-side module (prompts inside the image tower) sets ``token_kind(vision_start_layer)`` per instance
    image_feature_kind = POOLED
    vision_start_layer = 0  # image-side: the first image-tower block with prompts (below it: frozen, cacheable)
    checkpoint_activations = False  # image-side: recompute the prompted blocks' activations in the backward pass

    def __init__(self, backbone: Backbone | str, classnames: list[str], optim: OptimConfig | None = None,
                 epochs: int | None = None, backbone_pretrained: str | None = None):
        super().__init__()
        # Every subclass's constructor arguments; the shared frozen backbone by name and weights only, never its
        # tensors (load_from_checkpoint loads it by name, or takes the one passed as backbone=...).
        self.save_hyperparameters(ignore=["backbone"])
        if isinstance(backbone, str):
            backbone = load_backbone(backbone, backbone_pretrained, progress=False)
        self.hparams["backbone"] = backbone.name
        self.hparams["backbone_pretrained"] = backbone.pretrained
        self.backbone = backbone
        self.register_state_dict_post_hook(_drop_backbone_entries)
        self.register_load_state_dict_post_hook(_ignore_missing_backbone_entries)
        self.classnames = list(classnames)
        self.num_classes = len(classnames)
        self.optim = as_config(OptimConfig, optim)
        self.epochs = epochs
        self.train_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(self.num_classes, average="micro")

    # -- features and logits -------------------------------------------------------------------------------
    def image_features(self, x: Tensor) -> Tensor:
        """Normalised image features ``(B, D)``: ``x`` itself when it already holds cached features."""
        return x if x.dim() == 2 else self.backbone.encode_image(x)

    @property
    def image_side(self) -> bool:
        """Whether this module's prompts sit inside the image tower (its inputs are frozen image-tower tokens)."""
        return token_start_layer(self.image_feature_kind) is not None

    @torch.no_grad()
    def frozen_image_inputs(self, x: Tensor) -> Tensor:
        """What the local trainer keeps of a batch ``x`` (images ``(B, 3, H, W)`` or cached inputs), computed once
        without grad: the normalised pooled features ``(B, D)`` (:meth:`image_features`, ``x`` itself when it holds
        them), or for an image-side module the frozen tokens ``(B, 1+P, W)`` entering block
        :attr:`vision_start_layer` (``x`` itself when it holds them)."""
        if self.image_side:
            return x if x.dim() == 3 else self.backbone.image_tokens(x, self.vision_start_layer)
        return x if x.dim() == 2 else self.image_features(x)

    def prompted_image_features(self, tokens: Tensor, shallow: Tensor, deep: Sequence[Tensor] = ()) -> Tensor:
        """Normalised image features ``(..., D)`` of frozen tokens ``(..., T, W)`` (:meth:`frozen_image_inputs`;
        ``(G, B, T, W)`` for a group of G clients) through the prompted blocks from :attr:`vision_start_layer`:
        ``shallow (n, W)`` appended there, ``deep[j] (n, W)`` replacing it before the following blocks; prompts
        may carry leading dimensions such as ``(G, 1, n, W)`` (:meth:`Backbone.encode_image_prompted`)."""
        return self.backbone.encode_image_prompted(tokens, self.vision_start_layer, shallow, deep,
                                                   use_checkpoint=self.checkpoint_activations)

    def class_text_features(self) -> Tensor:
        """Normalised class text features ``(C, D)`` of this client's current prompt."""
        raise TypeError(f"{type(self).__name__} must define class_text_features")

    def candidate_text_features(self, classes: list[int] | None = None) -> Tensor:
        """Class text features ``(C, D)`` for a prediction among ``classes`` only (None: all); rows outside
        ``classes`` are never read. :meth:`class_text_features` by default, since one class's features do not
        depend on the others; a module whose features are conditioned on the candidate names (FedTPG) overrides
        it and sets :attr:`text_depends_on_candidates`."""
        return self.class_text_features()

    def logits_from(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Logits ``(B, C)`` from normalised image features ``(B, D)`` and class text features ``(C, D)`` (or
        ``(G, B, C)`` from ``(G, B, D)`` and ``(G, C, D)``: G clients at once)."""
        return self.backbone.logit_scale * image_features @ text_features.transpose(-1, -2).to(image_features.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_from(self.image_features(x), self.class_text_features())

    # -- steps -----------------------------------------------------------------------------------------------
    def regularizer(self) -> Tensor | None:
        """An extra loss term added to the cross-entropy (FedProx); None by default."""
        return None

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The training loss: one cross-entropy on the final logits (+ the regularizer, if any)."""
        loss = F.cross_entropy(logits.float(), labels)
        extra = self.regularizer()
        return loss if extra is None else loss + extra

    def diagnostics(self, image_features: Tensor) -> dict[str, Tensor]:
        """Per-image quantities ``{name: (B, ...)}`` a run may record (averaged per client and evaluated round,
        ``eval.diagnostics=true``), for normalised image features ``(B, D)``; none by default."""
        return {}

    # -- per-round inputs and groups of clients ---------------------------------------------------------------
    def set_extras(self, extras: dict[str, Any]) -> None:
        """Take a plan's per-method inputs (``ClientPlan.extras``, e.g. expert prompts or a FedProx centre); each
        subclass consumes its own keys and passes the rest on. An empty dict resets them all."""
        if extras:
            raise KeyError(f"{type(self).__name__} does not take the plan extras {sorted(extras)}")

    def set_client_classes(self, classes: list[int] | None) -> None:
        """The sorted classes of the labels the client about to train holds (set by the local trainer after each
        plan is loaded; None outside training). Ignored by default (FedTPG conditions on them)."""

    def client_extras(self) -> dict[str, Tensor]:
        """The client's tensors besides its parameters that its loss depends on (derived from :meth:`set_extras`,
        e.g. expert text features or a FedProx centre); the local trainer stacks them over a group. Empty by
        default."""
        return {}

    @property
    def supports_groups(self) -> bool:
        """Whether this module trains several clients at once (it defines :meth:`group_logits`); the local trainer
        trains the clients of a module without it one at a time."""
        return type(self).group_logits is not ClientModule.group_logits

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Logits ``(G, B, C)`` of G clients at once: ``params`` maps each name of :meth:`trainable_parameters` to
        the G clients' stacked values ``(G, *shape)``, ``image_features`` is ``(G, B, D)`` (padded), ``extras``
        maps each name of :meth:`client_extras` to stacked values ``(G, ...)``."""
        raise TypeError(f"{type(self).__name__} cannot train clients in groups; set perf.client_batch=1")

    def group_regularizer(self, params: dict[str, Tensor], extras: dict[str, Tensor]) -> Tensor | None:
        """Each client's extra loss term ``(G,)`` (the group version of :meth:`regularizer`); None by default."""
        return None

    def group_loss(self, logits: Tensor, labels: Tensor, sizes: list[int], params: dict[str, Tensor],
                   extras: dict[str, Tensor]) -> Tensor:
        """Each client's training loss ``(G,)`` as :meth:`loss` computes it: the cross-entropy over its own rows of
        ``logits (G, B, C)`` (client g's first ``sizes[g]`` rows; the rest is padding) plus its regularizer."""
        ce = torch.stack([F.cross_entropy(logits[g, :n].float(), labels[g, :n]) for g, n in enumerate(sizes)])
        extra = self.group_regularizer(params, extras)
        return ce if extra is None else ce + extra

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int = 0) -> Tensor:
        """Logits ``(B, C)`` of a batch of images or cached features (a ``(x, y)`` pair's labels are ignored)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Config dataclasses in the hyper-parameters are stored as plain dicts, so that the checkpoint loads
        with ``weights_only=True`` (constructors take either form)."""
        hparams = checkpoint.get("hyper_parameters")
        if hparams:
            checkpoint["hyper_parameters"] = {k: asdict(v) if is_dataclass(v) else v for k, v in hparams.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint written by ``fedlit export`` carries the plan's extras (e.g. pFedMoAP's expert prompts,
        PromptFolio's ``theta``): they are set before the state dict loads, as the simulator loads a plan."""
        if checkpoint.get(PLAN_EXTRAS_KEY):
            self.set_extras(checkpoint[PLAN_EXTRAS_KEY])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        self.train_acc(logits.argmax(dim=-1), y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x).argmax(dim=-1), y)
        self.log("val_acc", self.val_acc, prog_bar=True, on_step=False, on_epoch=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x).argmax(dim=-1), y)
        self.log("test_acc", self.test_acc, on_step=False, on_epoch=True)

    # -- optimisation ------------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups, each ``{"params": [...], "lr": float, "schedule": "cosine"|"constant"}``."""
        return []

    def configure_optimizers(self):
        """SGD (momentum, weight decay) over prompt (cosine over the epochs) and gate (constant) parameters."""
        groups = self.param_groups()
        if not groups:
            return None
        epochs = self.epochs or (self.trainer.max_epochs if self._trainer is not None else None) or 1
        optimizer = torch.optim.SGD(
            [{"params": g["params"], "lr": g["lr"]} for g in groups],
            momentum=self.optim.momentum,
            weight_decay=self.optim.weight_decay,
        )
        lambdas = [
            (lambda e, n=epochs: cosine_factor(e, n)) if g["schedule"] == "cosine" else (lambda e: 1.0)
            for g in groups
        ]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # -- client state ------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The client's own parameters by name (never the backbone's)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad}

    def client_state(self) -> dict[str, Tensor]:
        """A detached copy of the client's own tensors (prompt, gate, ...)."""
        return {n: p.detach().clone() for n, p in self.trainable_parameters().items()}

    def load_client_state(self, state: dict[str, Tensor]) -> None:
        """Copy ``state`` (as returned by ``client_state``) into the module's parameters."""
        params = self.trainable_parameters()
        unknown = set(state) - set(params)
        if unknown:
            raise KeyError(f"unknown client state entries: {sorted(unknown)}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
