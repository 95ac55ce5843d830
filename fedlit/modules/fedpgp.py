"""FedPGP client: a global prompt ``sigma`` personalised by a private low-rank term, ``sigma + U V``, trained with a
prompt-wise contrastive loss that pulls the global prompt's text features towards frozen CLIP features and pushes
them away from the personalised prompt's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlit.backbone import Backbone
from fedlit.config import PromptConfig
from fedlit.modules.base import as_config
from fedlit.modules.coop import CTX, CoOpClient
from fedlit.prompts import PLACEHOLDER

LOW_U, LOW_V = "U", "V"  # the private low-rank factors (parameter names)


def personal_context(sigma: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """The personalised context ``sigma + U V``: ``sigma (..., n_ctx, W)``, ``U (..., n_ctx, r)``, ``V (..., r, W)``
    (leading dimensions batch, e.g. G clients or C class-specific contexts)."""
    return sigma + u @ v


def prompt_contrastive_loss(anchor: Tensor, global_features: Tensor, personal_features: Tensor,
                            temperature: float) -> Tensor:
    """FedPGP's prompt-wise contrastive loss, per class ``c`` a two-way cross-entropy with the positive first:
    ``-log(exp(p_c / tau) / (exp(p_c / tau) + exp(n_c / tau)))`` with ``p_c = cos(anchor_c, global_c)`` and
    ``n_c = cos(global_c, personal_c)``, averaged over the classes. Features ``(C, D)`` give a scalar; ``(G, C, D)``
    (anchor ``(C, D)`` shared) give one loss per client ``(G,)``."""
    positive = F.cosine_similarity(anchor.to(global_features), global_features, dim=-1) / temperature
    negative = F.cosine_similarity(global_features, personal_features, dim=-1) / temperature
    logits = torch.stack([positive, negative], dim=-1)
    return (torch.logsumexp(logits, dim=-1) - positive).mean(dim=-1)


def lowrank_init(ctx_shape: tuple[int, ...], rank: int, std: float, seed: int | None) -> tuple[Tensor, Tensor]:
    """Initial ``U (..., n_ctx, r)`` and ``V (..., r, W)`` for a context of shape ``(..., n_ctx, W)``, both
    ``N(0, std^2)`` (the public code's init), drawn from a generator seeded by ``seed`` (fresh draws without one)."""
    *lead, n_ctx, width = ctx_shape
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    u = torch.randn((*lead, n_ctx, rank), generator=generator) * std
    v = torch.randn((*lead, rank, width), generator=generator) * std
    return u, v


class FedPGPClient(CoOpClient):
    """Logits ``s * I T_p^T`` with ``T_p`` the normalised text features of ``sigma + U V`` (``sigma`` is
    ``prompt_learner.ctx``). The loss adds ``weight * prompt_contrastive_loss(T_0, T_sigma, T_p)`` where ``T_0`` are
    the frozen text features of the prompt's own words ("X X ... X <class>." or the ``ctx_init`` words), computed
    once. ``sigma``, ``U`` and ``V`` are trained with the prompt learning rate."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], rank: int = 8, weight: float = 0.5,
                 temperature: float = 0.5, prompt: PromptConfig | None = None, seed: int | None = None, **kwargs):
        super().__init__(backbone, classnames, prompt=prompt, seed=seed, **kwargs)
        prompt = as_config(PromptConfig, prompt)
        self.weight = float(weight)
        self.temperature = float(temperature)
        ctx = self.prompt_learner.ctx.detach()
        # A stream apart from the prompt's own draw (seed), so that U V does not repeat sigma's first values.
        u, v = lowrank_init(tuple(ctx.shape), rank, prompt.init_std, None if seed is None else seed + 1)
        self.U = nn.Parameter(u.to(ctx))
        self.V = nn.Parameter(v.to(ctx))
        self.register_buffer("anchor_ctx", self.word_context(self.backbone, prompt.ctx_init).to(ctx), persistent=False)
        self._anchor: Tensor | None = None  # features of anchor_ctx, encoded on first use where the module lives

    def word_context(self, backbone: Backbone, ctx_init: str | None) -> Tensor:
        """Token embeddings ``(*ctx_shape)`` of the prompt's words: the ``ctx_init`` words, or ``n_ctx``
        placeholders "X" (the frozen prompt the public code encodes as its positive anchor)."""
        learner = self.prompt_learner
        words = ctx_init.replace("_", " ").strip() if ctx_init is not None else " ".join([PLACEHOLDER] * learner.n_ctx)
        embedding = backbone.token_embeddings(backbone.tokenize([words]))[0, 1 : 1 + learner.n_ctx].float().cpu()
        return embedding.expand(learner.ctx_shape).clone() if learner.class_specific else embedding

    def anchor_features(self) -> Tensor:
        """The frozen anchor ``T_0``: normalised text features ``(C, D)`` of the prompt's words (no grad), encoded
        once per device (the backbone may sit on an accelerator before the module is moved there)."""
        if self._anchor is None or self._anchor.device != self.anchor_ctx.device:
            with torch.no_grad():
                self._anchor = self.prompt_learner.text_features(self.backbone, self.anchor_ctx).float()
        return self._anchor

    def personal_context(self) -> Tensor:
        """This client's personalised context ``sigma + U V`` ``(*ctx_shape)``."""
        return personal_context(self.prompt_learner.ctx, self.U, self.V)

    def class_text_features(self) -> Tensor:
        """Normalised class text features ``(C, D)`` of ``sigma + U V``."""
        return self.prompt_learner.text_features(self.backbone, self.personal_context())

    def regularizer(self) -> Tensor | None:
        """``weight *`` the prompt-wise contrastive loss of this client (a scalar; None at weight 0)."""
        params = {CTX: self.prompt_learner.ctx, LOW_U: self.U, LOW_V: self.V}
        loss = self.group_regularizer({k: p.unsqueeze(0) for k, p in params.items()}, {})
        return None if loss is None else loss[0]

    def group_regularizer(self, params: dict[str, Tensor], extras: dict[str, Tensor]) -> Tensor | None:
        """``weight *`` the contrastive loss of each of G clients ``(G,)`` (None at weight 0): ``sigma`` and
        ``sigma + U V`` of all G clients through one text-tower pass (the personalised features are encoded again
        here, apart from the logits)."""
        if self.weight == 0:
            return None
        sigma = params[CTX]
        stacked = torch.cat([sigma, personal_context(sigma, params[LOW_U], params[LOW_V])])
        features = self.prompt_learner.text_features(self.backbone, stacked)
        groups = sigma.shape[0]
        loss = prompt_contrastive_loss(self.anchor_features(), features[:groups], features[groups:], self.temperature)
        return self.weight * loss

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Logits ``(G, B, C)`` of G clients' personalised contexts, one text-tower pass."""
        ctx = personal_context(params[CTX], params[LOW_U], params[LOW_V])
        return self.logits_from(image_features, self.prompt_learner.text_features(self.backbone, ctx))

    def param_groups(self) -> list[dict]:
        return [{"params": [self.prompt_learner.ctx, self.U, self.V], "lr": self.optim.prompt_lr,
                 "schedule": "cosine"}]
