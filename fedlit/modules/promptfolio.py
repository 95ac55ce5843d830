"""PromptFolio client: a global prompt (averaged by the server) and a private local prompt whose normalised text
features are mixed per class, ``(1 - theta) T_g + theta T_l``, as a portfolio of the two."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fedlit.backbone import Backbone
from fedlit.config import PromptConfig
from fedlit.modules.base import as_config
from fedlit.modules.coop import CTX, CoOpClient

LOCAL = "local_ctx"  # the private local prompt, a parameter of the same shape as the global prompt


def mix_features(global_features: Tensor, local_features: Tensor, theta: float | Tensor) -> Tensor:
    """PromptFolio's class text features ``(1 - theta) T_g + theta T_l`` from already normalised ``T_g`` and
    ``T_l`` (``(C, D)``, or ``(G, C, D)`` with ``theta`` a ``(G,)`` tensor); the mix is not re-normalised, as in the
    public code (each prompt's features are normalised, then mixed)."""
    if isinstance(theta, Tensor) and theta.dim() == 1:
        theta = theta.to(global_features.dtype).view(-1, 1, 1)
    return (1 - theta) * global_features + theta * local_features


def local_prompt_init(ctx_shape: tuple[int, ...], std: float, seed: int | None) -> Tensor:
    """Initial local prompt ``(*ctx_shape)``: the second half of one seeded ``N(0, std^2)`` draw of shape
    ``(2, *ctx_shape)``, as the public code draws both prompts in one call (the first half is the global prompt's
    own seeded draw). Without a seed, a fresh draw."""
    if seed is None:
        return torch.randn(ctx_shape) * std
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((2, *ctx_shape), generator=generator)[1] * std


class PromptFolioClient(CoOpClient):
    """Logits ``s * I ((1 - theta) T_g + theta T_l)^T``: ``T_g`` the normalised text features of the global prompt
    ``prompt_learner.ctx``, ``T_l`` those of the local prompt ``local_ctx`` (both trained with the prompt learning
    rate). A plan's extras may set ``theta`` (0 gives the global prompt alone); without it, the default ``theta``."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], theta: float = 0.4,
                 prompt: PromptConfig | None = None, seed: int | None = None, **kwargs):
        super().__init__(backbone, classnames, prompt=prompt, seed=seed, **kwargs)
        prompt = as_config(PromptConfig, prompt)
        self.default_theta = float(theta)
        self.theta = self.default_theta
        ctx = self.prompt_learner.ctx.detach()
        # With words as init both prompts start as those words (public code); otherwise an independent draw.
        local = ctx.clone() if prompt.ctx_init is not None else local_prompt_init(tuple(ctx.shape), prompt.init_std,
                                                                                   seed)
        self.local_ctx = nn.Parameter(local.to(ctx))

    def prompt_features(self, global_ctx: Tensor, local_ctx: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised text features ``(T_g, T_l)`` of one client's prompts (each ``(C, D)``) or of G clients'
        stacked prompts (each ``(G, C, D)``), in one text-tower pass."""
        batched = global_ctx.dim() == len(self.prompt_learner.ctx_shape) + 1
        stacked = torch.cat([global_ctx, local_ctx]) if batched else torch.stack([global_ctx, local_ctx])
        features = self.prompt_learner.text_features(self.backbone, stacked)
        half = features.shape[0] // 2
        return features[:half] if batched else features[0], features[half:] if batched else features[1]

    def class_text_features(self) -> Tensor:
        """The mixed class text features ``(C, D)`` at this client's ``theta``."""
        return mix_features(*self.prompt_features(self.prompt_learner.ctx, self.local_ctx), self.theta)

    def set_extras(self, extras: dict[str, Any]) -> None:
        """``theta`` overrides the mixing weight for this plan (the global model uses 0); the rest goes to CoOp."""
        rest = dict(extras)
        theta = rest.pop("theta", None)
        self.theta = self.default_theta if theta is None else float(theta)
        super().set_extras(rest)

    def client_extras(self) -> dict[str, Tensor]:
        """The FedProx centre and this client's ``theta`` (a 0-dim tensor, stacked ``(G,)`` over a group)."""
        ctx = self.prompt_learner.ctx
        return {**super().client_extras(), "theta": torch.tensor(self.theta, dtype=ctx.dtype, device=ctx.device)}

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Logits ``(G, B, C)`` of G clients: their ``2G`` prompts through one text-tower pass, mixed per client."""
        global_features, local_features = self.prompt_features(params[CTX], params[LOCAL])
        return self.logits_from(image_features, mix_features(global_features, local_features, extras["theta"]))

    def param_groups(self) -> list[dict]:
        return [{"params": [self.prompt_learner.ctx, self.local_ctx], "lr": self.optim.prompt_lr,
                 "schedule": "cosine"}]
