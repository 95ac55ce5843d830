"""CoOp / PromptFL client: a learnable context over the frozen CLIP; optional FedProx proximal term."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fedlit.backbone import Backbone
from fedlit.config import PromptConfig
from fedlit.modules.base import ClientModule, as_config
from fedlit.prompts import PromptLearner
from fedlit.state import PROMPT as CTX


class CoOpClient(ClientModule):
    """Logits ``s * I T_L^T`` with ``T_L`` the text features of the learnable prompt.

    ``prox_mu > 0`` adds FedProx's ``mu/2 * ||ctx - ctx_global||^2`` (a real gradient) once a centre is set with
    :meth:`set_prox_center`.
    """

    def __init__(self, backbone: Backbone | str, classnames: list[str], prompt: PromptConfig | None = None,
                 prox_mu: float = 0.0, seed: int | None = None, cut: bool = True, share_prefix: bool = True,
                 **kwargs):
        super().__init__(backbone, classnames, **kwargs)
        prompt = as_config(PromptConfig, prompt)
        self.prompt_learner = PromptLearner(
            self.backbone, classnames, n_ctx=prompt.n_ctx, ctx_init=prompt.ctx_init,
            class_specific=prompt.class_specific, class_position=prompt.class_position, init_std=prompt.init_std,
            seed=seed, cut=cut, share_prefix=share_prefix,
        )
        self.prox_mu = prox_mu
        self.register_buffer("prox_center", torch.empty(0), persistent=False)

    def class_text_features(self) -> Tensor:
        return self.prompt_learner.text_features(self.backbone)

    def set_prox_center(self, ctx: Tensor | None) -> None:
        """Anchor of the FedProx term (the round's global prompt); None removes the term."""
        self.prox_center = torch.empty(0) if ctx is None else ctx.detach().clone().to(self.prompt_learner.ctx)

    def set_extras(self, extras: dict[str, Any]) -> None:
        """``prox_center`` (the round's global prompt) sets FedProx's centre; without it there is none."""
        rest = dict(extras)
        self.set_prox_center(rest.pop("prox_center", None))
        super().set_extras(rest)

    def regularizer(self) -> Tensor | None:
        extra = self.group_regularizer({CTX: self.prompt_learner.ctx.unsqueeze(0)},
                                       {"prox_center": self.prox_center.unsqueeze(0)})
        return None if extra is None else extra[0]

    def client_extras(self) -> dict[str, Tensor]:
        """The FedProx centre (empty when none is set)."""
        return {"prox_center": self.prox_center}

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Local logits ``(G, B, C)`` of G stacked contexts: one text-tower pass over all ``G x C`` prompts."""
        return self.logits_from(image_features, self.prompt_learner.text_features(self.backbone, params[CTX]))

    def group_regularizer(self, params: dict[str, Tensor], extras: dict[str, Tensor]) -> Tensor | None:
        """FedProx's ``mu/2 ||ctx_g - centre_g||^2`` per client ``(G,)``; None without a centre or with mu = 0."""
        centre = extras["prox_center"]
        if self.prox_mu <= 0 or centre.numel() == 0:
            return None
        return 0.5 * self.prox_mu * (params[CTX] - centre).pow(2).flatten(1).sum(-1)

    def param_groups(self) -> list[dict]:
        return [{"params": [self.prompt_learner.ctx], "lr": self.optim.prompt_lr, "schedule": "cosine"}]
