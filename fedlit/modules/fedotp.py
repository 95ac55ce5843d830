"""FedOTP client (Li et al., CVPR 2024): a global and a local prompt matched to an image's patch features by
unbalanced optimal transport.

Per image, the ``M`` normalised patch features (the tokens after the vision transformer, or the attention-pooled
grid of a ModifiedResNet, projected to the joint space) are the source points, each of mass ``1/M``; the two
prompts' text features of a class are the targets, each receiving ``top_percent / 2``. The cost is ``1 - cos``;
the entropic plan ``T = diag(u) K diag(v)``, ``K = exp(-(1 - sim) / eps)``, comes from FedOTP's ``entropic_COT_fast``
(rows ``T 1 <= 1/M``, columns ``T^T 1 = top_percent/2``), computed without gradient; the logit of class ``c`` is
``s * sum_mn T_mn sim_mn``. The gradient reaches both prompts through ``sim``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedlit.backbone import Backbone
from fedlit.config import PromptConfig
from fedlit.data.features import PATCHES
from fedlit.modules.base import as_config
from fedlit.modules.coop import CoOpClient
from fedlit.prompts import init_context
from fedlit.state import PROMPT

LOCAL = "local_ctx"  # the private local prompt's parameter name (the client state key)
LOCAL_SEED_OFFSET = 7_919  # the local prompt's init stream, apart from the global prompt's


@torch.no_grad()
def unbalanced_plan(kernel: Tensor, a: Tensor, b: Tensor, max_iter: int = 100, thresh: float = 1e-3) -> Tensor:
    """FedOTP's ``entropic_COT_fast``: the plan ``T (..., M, N) = diag(u) K diag(v)`` with row sums ``<= a (..., M)``
    and column sums ``= b (..., N)`` (``sum b <= sum a``), from ``kernel = exp(-cost / eps) (..., M, N)``.

    Iterates ``u = min(a / (K v), 1)``, ``v = b / (K^T u)`` from ``u = v = 1``; each problem of the batch stops when
    the mean absolute change of its ``v`` falls below ``thresh`` (its values are frozen from then on) or after
    ``max_iter`` iterations. The column sums hold exactly after every iteration; the rows with ``u < 1`` carry
    their whole mass ``a`` at convergence, the others less.
    """
    u, v = torch.ones_like(a), torch.ones_like(b)
    done = torch.zeros(a.shape[:-1], dtype=torch.bool, device=a.device)
    for _ in range(max_iter):
        new_u = torch.minimum(a / (kernel @ v.unsqueeze(-1)).squeeze(-1), torch.ones_like(a))
        new_v = b / (kernel.transpose(-1, -2) @ new_u.unsqueeze(-1)).squeeze(-1)
        err = (new_v - v).abs().mean(-1)
        u = torch.where(done.unsqueeze(-1), u, new_u)
        v = torch.where(done.unsqueeze(-1), v, new_v)
        done = done | (err < thresh)
        if bool(done.all()):
            break
    return u.unsqueeze(-1) * kernel * v.unsqueeze(-2)


def ot_logits(patches: Tensor, text_features: Tensor, logit_scale: Tensor | float, eps: float = 0.01,
              top_percent: float = 0.8, max_iter: int = 100, thresh: float = 1e-3) -> Tensor:
    """FedOTP's logits ``(..., B, C)`` from normalised patch features ``(..., B, M, D)`` and the N prompts' normalised
    class text features ``(..., N, C, D)``: ``s * sum_mn T_mn sim_mn`` with ``sim = <patch_m, text_n[c]>`` and ``T``
    the unbalanced plan of cost ``1 - sim`` (:func:`unbalanced_plan`, masses ``1/M`` and ``top_percent/N``; no
    gradient through ``T``, computed in float64 so that ``exp(-(1 - sim)/eps)`` does not underflow)."""
    sim = torch.einsum("...bmd,...ncd->...bcmn", patches, text_features.to(patches.dtype))
    m, n = sim.shape[-2], sim.shape[-1]
    with torch.no_grad():
        kernel = torch.exp(-(1.0 - sim.detach().double()) / eps)
        a = torch.full(sim.shape[:-1], 1.0 / m, dtype=kernel.dtype, device=sim.device)
        b = torch.full((*sim.shape[:-2], n), top_percent / n, dtype=kernel.dtype, device=sim.device)
        plan = unbalanced_plan(kernel, a, b, max_iter, thresh).to(sim.dtype)
    return logit_scale * (plan * sim).sum(dim=(-1, -2))


class FedOTPClient(CoOpClient):
    """A global prompt (``prompt_learner.ctx``, aggregated) and a local prompt (``local_ctx``, private), both
    trained; logits by unbalanced OT between the image's patch features and the two prompts' class text features
    (:func:`ot_logits`). Takes per-token features ``(B, P+1, D)`` (row 0, the pooled token, is not transported)
    or images."""

    image_feature_kind = PATCHES

    def __init__(self, backbone: Backbone | str, classnames: list[str], prompt: PromptConfig | None = None,
                 eps: float = 0.01, top_percent: float = 0.8, max_iter: int = 100, thresh: float = 1e-3,
                 seed: int | None = None, **kwargs):
        prompt = as_config(PromptConfig, prompt)
        super().__init__(backbone, classnames, prompt=prompt, seed=seed, **kwargs)
        learner = self.prompt_learner
        if prompt.ctx_init is not None:  # initialised from words: both prompts start from them
            local = learner.ctx.detach().clone()
        else:  # FedOTP draws both prompts at random, independently
            local = init_context(learner.n_ctx, self.backbone.text_width,
                                 learner.num_classes if learner.class_specific else None, prompt.init_std,
                                 None if seed is None else seed + LOCAL_SEED_OFFSET)
        self.local_ctx = nn.Parameter(local)
        self.eps, self.top_percent, self.max_iter, self.thresh = eps, top_percent, max_iter, thresh

    def image_features(self, x: Tensor) -> Tensor:
        """Normalised per-token features ``(B, P+1, D)``: ``x`` itself when it holds them, else encoded images."""
        if x.dim() == 3:
            return x
        if x.dim() == 4:
            return self.backbone.encode_image_patches(x)
        raise ValueError(f"FedOTP needs per-token image features (B, P+1, D) or images, got {tuple(x.shape)}; build "
                         "the client data with ClientData.for_module(module)")

    def class_text_features(self) -> Tensor:
        """Normalised class text features ``(2, C, D)`` of the global and the local prompt."""
        return self.prompt_learner.text_features(self.backbone, torch.stack([self.prompt_learner.ctx, self.local_ctx]))

    def logits_from(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """OT logits ``(B, C)`` from per-token features ``(B, P+1, D)`` and prompt features ``(2, C, D)`` (or
        ``(G, B, C)`` from ``(G, B, P+1, D)`` and ``(G, 2, C, D)``)."""
        patches = image_features[..., 1:, :]
        return ot_logits(patches, text_features, self.backbone.logit_scale, self.eps, self.top_percent,
                         self.max_iter, self.thresh)

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Logits ``(G, B, C)`` of G clients: both prompts of every client through one text-tower pass."""
        contexts = torch.stack([params[PROMPT], params[LOCAL]], dim=1)  # (G, 2, *ctx_shape)
        groups = contexts.shape[0]
        text = self.prompt_learner.text_features(self.backbone, contexts.flatten(0, 1))
        return self.logits_from(image_features, text.unflatten(0, (groups, 2)))

    def param_groups(self) -> list[dict]:
        return [{"params": [self.prompt_learner.ctx, self.local_ctx], "lr": self.optim.prompt_lr,
                 "schedule": "cosine"}]

