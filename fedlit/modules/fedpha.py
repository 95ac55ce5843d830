"""FedPHA client: a global prompt (averaged by the server) and a private local prompt of the client's own length.

Training pulls the local prompt's text features towards those of its projection onto the trailing right singular
directions of the global prompt (MSE) and pushes them at least ``alpha`` away from the global prompt's (hinge),
beside one cross-entropy on each prompt's logits. Test logits are the local prompt's alone.

Every prompt is ``[start, ctx[:L], class tokens, '.', end]`` read at its own end token; the prompts of a step (a
client's or a group's) go through the text tower in one pass per distinct length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlit.backbone import Backbone
from fedlit.config import FEDPHA_PROMPT_RULE, PromptConfig, fedpha_prompt_fits
from fedlit.errors import UserError
from fedlit.modules.base import as_config
from fedlit.modules.coop import CTX, CoOpClient
from fedlit.prompts import check_context_fits

LOCAL = "local_ctx"  # the private local prompt (parameter name), ``(max length, W)``: rows past the client's length 0
LENGTH = "pha_length"  # plan extra: the client's local prompt length; 0 evaluates the global prompt alone
LOCAL_SEED_OFFSET = 104_729  # the module's own local-prompt draw, a stream apart from the global prompt's (seed)


def kept_directions(global_ctx: Tensor, ratio: float) -> Tensor:
    """The right singular vectors ``V2 (..., W, k - cutoff)`` of the global prompt ``(..., n, W)`` (``k = min(n, W)``)
    without its ``cutoff = int(k (1 - ratio))`` leading ones, as the public ``compute_null_space`` keeps them. The
    SVD runs in float32 outside autocast, with gradient (the public code does not detach it)."""
    k = min(global_ctx.shape[-2:])
    cutoff = int(k * (1 - ratio))
    with torch.autocast(device_type=global_ctx.device.type, enabled=False):
        _, _, vh = torch.linalg.svd(global_ctx.float(), full_matrices=False)
    return vh[..., cutoff:, :].mT.to(global_ctx.dtype)


def project_local(local_ctx: Tensor, global_ctx: Tensor, ratio: float) -> Tensor:
    """The local prompt ``(..., L, W)`` projected onto the span of :func:`kept_directions` of ``global_ctx``:
    ``ctx_l (V2 V2^T)``, in the public code's order of products."""
    v2 = kept_directions(global_ctx, ratio)
    return local_ctx @ (v2 @ v2.mT)


def pull_push_loss(local_features: Tensor, global_features: Tensor, projected_features: Tensor,
                   alpha: float) -> Tensor:
    """FedPHA's feature terms of normalised class text features ``(..., C, D)``: the pull ``mean((T_l - T_p)^2)``
    over classes and dimensions plus the push ``mean_c relu(alpha - ||T_l[c] - T_g[c]||)``. ``(C, D)`` gives a
    scalar, ``(G, C, D)`` one value per client ``(G,)``; computed in float32."""
    t_l, t_g, t_p = local_features.float(), global_features.float(), projected_features.float()
    pull = (t_l - t_p).pow(2).mean(dim=(-2, -1))
    push = F.relu(alpha - (t_l - t_g).norm(dim=-1)).mean(dim=-1)
    return pull + push


def local_prompt_init(length: int, rows: int, width: int, std: float,
                      generator: torch.Generator | None = None) -> Tensor:
    """A local prompt ``(rows, W)``: its first ``length`` rows ``N(0, std^2)`` from ``generator``, the rest zero (they
    are never read, receive no gradient and so stay zero under weight decay)."""
    out = torch.zeros(rows, width)
    out[:length] = torch.randn((length, width), generator=generator) * std
    return out


class FedPHAClient(CoOpClient):
    """A global prompt ``prompt_learner.ctx (n_ctx, W)`` and a local prompt ``local_ctx (max_local_length, W)`` of
    which the first ``L`` rows are used (``L``: the plan extra ``pha_length``, default ``local_length``).

    In eval mode the logits are ``s I T_l^T`` (``L = 0``: the global prompt's ``s I T_g^T``). In training mode the
    forward returns the stacked local and global logits ``(2, B, C)`` and :meth:`loss` is
    ``CE(local) + CE(global) + pull + push`` (:func:`pull_push_loss`; the terms come from the same text-tower passes
    as the logits). Both prompts train with the prompt lr."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], local_length: int = 16,
                 max_local_length: int | None = None, ratio: float = 0.8, alpha: float = 1.0,
                 prompt: PromptConfig | None = None, seed: int | None = None, cut: bool = True, **kwargs):
        prompt = as_config(PromptConfig, prompt)
        if not fedpha_prompt_fits(prompt):
            raise UserError(f"fedpha {FEDPHA_PROMPT_RULE}")
        super().__init__(backbone, classnames, prompt=prompt, seed=seed, cut=cut, **kwargs)
        backbone = self.backbone  # the loaded one when given by name
        rows = local_length if max_local_length is None else max_local_length
        if not 1 <= local_length <= rows:
            raise ValueError(f"local_length must be in [1, max_local_length={rows}] (got {local_length})")
        check_context_fits(backbone, self.prompt_learner.classnames, rows)
        generator = torch.Generator().manual_seed(seed + LOCAL_SEED_OFFSET) if seed is not None else None
        ctx = self.prompt_learner.ctx.detach()
        init = local_prompt_init(local_length, rows, backbone.text_width, prompt.init_std, generator)
        self.local_ctx = nn.Parameter(init.to(ctx))
        self.default_length = self.local_length = local_length
        self.ratio, self.alpha = float(ratio), float(alpha)
        # Full-context sequences (no cut, or a tower that sees every position): pad every prompt to the context.
        self.full_length = not cut or not backbone.causal
        self._terms: Tensor | None = None  # pull + push of the last training forward, (G,), taken by the loss

    # -- prompts of any length -------------------------------------------------------------------------------------
    def encode_contexts(self, contexts: list[Tensor]) -> Tensor:
        """Normalised class text features ``(N, C, D)`` of N contexts of their own lengths (each ``(L_n, W)``): one
        text-tower pass per distinct length, over every context of that length."""
        lengths = [int(c.shape[0]) for c in contexts]
        features: list[Tensor | None] = [None] * len(contexts)
        for length in sorted(set(lengths)):
            members = [i for i, n in enumerate(lengths) if n == length]
            encoded = self.encode_length(torch.stack([contexts[i] for i in members]))
            for j, i in enumerate(members):
                features[i] = encoded[j]
        return torch.stack(features)

    def encode_length(self, ctx: Tensor) -> Tensor:
        """Normalised class text features ``(N, C, D)`` of N contexts of one length ``ctx (N, L, W)``: the sequences
        ``[start, ctx, class tokens, '.', end]`` read at their end token ``eot(n_ctx) - n_ctx + L``. Full-context
        sequences (no cut, or a tower that sees every position) are cut or zero-padded to the context, as the public
        code's ``pad_to_77``."""
        learner, backbone = self.prompt_learner, self.backbone
        groups, length, width = ctx.shape
        prefix, suffix = learner.token_prefix.to(ctx.dtype), learner.token_suffix.to(ctx.dtype)
        classes = suffix.shape[0]
        embeddings = torch.cat([prefix.expand(groups, -1, -1, -1), ctx.unsqueeze(1).expand(-1, classes, -1, -1),
                                suffix.expand(groups, -1, -1, -1)], dim=2)  # (N, C, 1 + L + S, W)
        if self.full_length:
            total = backbone.context_length
            embeddings = embeddings[:, :, :total]
            if embeddings.shape[2] < total:
                pad = embeddings.new_zeros(groups, classes, total - embeddings.shape[2], width)
                embeddings = torch.cat([embeddings, pad], dim=2)
        eot = learner.eot_index + (length - learner.n_ctx)  # (C,)
        if learner.shared_length:  # start token + context: the same for every class
            return backbone.encode_shared_prefix(embeddings[:, 0, : 1 + length], embeddings[:, :, 1 + length :], eot)
        return backbone.encode_prompts(embeddings, eot.expand(groups, -1))

    def prompt_features(self, global_ctx: Tensor, local_ctx: Tensor, lengths: list[int]) -> tuple[Tensor, ...]:
        """``(T_g, T_l, T_p)``, each ``(G, C, D)``, of G clients' global prompts ``(G, n_ctx, W)``, local prompts
        ``(G, R, W)`` cut to their ``lengths`` and the local prompts' projections (:func:`project_local`), in one
        text-tower pass per distinct length."""
        projected = project_local(local_ctx, global_ctx, self.ratio)
        groups = len(lengths)
        contexts = ([global_ctx[g] for g in range(groups)] + [local_ctx[g, :n] for g, n in enumerate(lengths)]
                    + [projected[g, :n] for g, n in enumerate(lengths)])
        features = self.encode_contexts(contexts)
        return features[:groups], features[groups : 2 * groups], features[2 * groups :]

    # -- logits and loss ---------------------------------------------------------------------------------------------
    def class_text_features(self) -> Tensor:
        """Normalised class text features ``(C, D)`` of the local prompt's first ``L`` rows (``L = 0``: the global
        prompt's)."""
        ctx = self.prompt_learner.ctx if self.local_length == 0 else self.local_ctx[: self.local_length]
        return self.encode_contexts([ctx])[0]

    def forward(self, x: Tensor) -> Tensor:
        """Eval mode: logits ``(B, C)``. Training mode: local and global logits ``(2, B, C)``."""
        if not self.training:
            return super().forward(x)
        params = {CTX: self.prompt_learner.ctx.unsqueeze(0), LOCAL: self.local_ctx.unsqueeze(0)}
        extras = {LENGTH: torch.tensor([self.local_length])}
        return self.group_logits(params, self.image_features(x).unsqueeze(0), extras)[0]

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Training: local and global logits ``(G, 2, B, C)`` of G clients (their pull + push kept for the loss).
        Eval: each client's local logits ``(G, B, C)``."""
        lengths = [int(n) for n in extras[LENGTH].tolist()]
        if not self.training:
            return torch.stack([self.logits_from(image_features[g], self.encode_contexts(
                [params[CTX][g] if n == 0 else params[LOCAL][g, :n]])[0]) for g, n in enumerate(lengths)])
        if min(lengths) < 1:
            raise ValueError("fedpha trains local prompts of length >= 1; length 0 (the global prompt) is for "
                             "evaluation only")
        t_g, t_l, t_p = self.prompt_features(params[CTX], params[LOCAL], lengths)
        self._terms = pull_push_loss(t_l, t_g, t_p, self.alpha)
        return torch.stack([self.logits_from(image_features, t_l), self.logits_from(image_features, t_g)], dim=1)

    def _take_terms(self) -> Tensor:
        terms, self._terms = self._terms, None
        if terms is None:
            raise RuntimeError("FedPHAClient's loss needs the training-mode forward of the same step first")
        return terms

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``CE(local) + CE(global) + (pull + push)`` from the training-mode logits ``(2, B, C)``."""
        return self.group_loss(logits.unsqueeze(0), labels.unsqueeze(0), [len(labels)], {}, {})[0]

    def group_loss(self, logits: Tensor, labels: Tensor, sizes: list[int], params: dict[str, Tensor],
                   extras: dict[str, Tensor]) -> Tensor:
        """Each client's loss ``(G,)`` from logits ``(G, 2, B, C)`` (client g's first ``sizes[g]`` rows)."""
        ce = torch.stack([F.cross_entropy(logits[g, 0, :n].float(), labels[g, :n])
                          + F.cross_entropy(logits[g, 1, :n].float(), labels[g, :n]) for g, n in enumerate(sizes)])
        return ce + self._take_terms()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Lightning's step: :meth:`loss` of the training-mode logits; accuracy of the local logits."""
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        self.train_acc(logits[0].argmax(dim=-1), y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    # -- per-client length -------------------------------------------------------------------------------------------
    def set_extras(self, extras: dict[str, Any]) -> None:
        """``pha_length`` sets the local prompt length (0: the global prompt alone; absent: the default)."""
        rest = dict(extras)
        length = rest.pop(LENGTH, None)
        length = self.default_length if length is None else int(length)
        if not 0 <= length <= self.local_ctx.shape[0]:
            raise ValueError(f"pha_length must be in [0, {self.local_ctx.shape[0]}] (got {length})")
        self.local_length = length
        super().set_extras(rest)

    def client_extras(self) -> dict[str, Tensor]:
        """The FedProx centre and this client's local length (a 0-dim tensor, stacked ``(G,)`` over a group)."""
        return {**super().client_extras(), LENGTH: torch.tensor(self.local_length, device=self.local_ctx.device)}

    def param_groups(self) -> list[dict]:
        return [{"params": [self.prompt_learner.ctx, self.local_ctx], "lr": self.optim.prompt_lr,
                 "schedule": "cosine"}]
