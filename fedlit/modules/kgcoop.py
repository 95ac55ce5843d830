"""KgCoOp client (Yao, Zhang, Xu, CVPR 2023): CoOp with a knowledge-guided regulariser that keeps the learned class
text features close to the frozen CLIP's features of a hand-crafted prompt ("a photo of a {}.")."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fedlit.backbone import Backbone
from fedlit.modules.coop import CTX, CoOpClient
from fedlit.prompts import clean_classname

COSINE_EPS = 1e-7  # the public code's torch.nn.CosineSimilarity(dim=1, eps=1e-07)


def knowledge_guidance(learned: Tensor, anchor: Tensor) -> Tensor:
    """KgCoOp's score ``1 - mean_c cos(t_c, t_c^clip)`` of learned class text features ``(C, D)`` (or ``(G, C, D)``:
    one score per client, ``(G,)``) against the hand-crafted prompt's ``(C, D)``. On normalised features it is half
    the mean squared distance, ``mean_c ||t_c - t_c^clip||^2 / 2``."""
    cos = F.cosine_similarity(learned, anchor.to(learned.dtype).expand_as(learned), dim=-1, eps=COSINE_EPS)
    return 1.0 - cos.mean(dim=-1)


class KgCoOpClient(CoOpClient):
    """Logits ``s * I T^T`` of the learnable prompt (CoOp); the loss adds ``weight * knowledge_guidance(T, T_clip)``
    with ``T_clip`` the frozen features of ``template.format(classname)``, encoded once. The prompt's features are
    encoded once per step: the forward keeps those it computed with gradients for the regulariser of that step."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], weight: float = 8.0,
                 template: str = "a photo of a {}.", **kwargs):
        super().__init__(backbone, classnames, **kwargs)
        backbone = self.backbone  # the loaded one when given by name
        self.weight = float(weight)
        self.template = template
        texts = [template.format(clean_classname(n)) for n in classnames]
        self.register_buffer("anchor_features", backbone.encode_text(texts).float(), persistent=False)
        self._step_text: Tensor | None = None  # (G, C, D) of the last forward with gradients, read once by the loss

    def _keep(self, text: Tensor) -> Tensor:
        """``text (G, C, D)`` as computed; kept for this step's regulariser when it carries gradients."""
        self._step_text = text if text.requires_grad else None
        return text

    def class_text_features(self) -> Tensor:
        text = self.prompt_learner.text_features(self.backbone)
        self._keep(text.unsqueeze(0))
        return text

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Local logits ``(G, B, C)`` of G stacked contexts: one text-tower pass over all ``G x C`` prompts."""
        text = self._keep(self.prompt_learner.text_features(self.backbone, params[CTX]))
        return self.logits_from(image_features, text)

    def regularizer(self) -> Tensor | None:
        """FedProx's term (if any) plus ``weight *`` the knowledge-guidance score of this client (a scalar)."""
        extra = self.group_regularizer({CTX: self.prompt_learner.ctx.unsqueeze(0)},
                                       {"prox_center": self.prox_center.unsqueeze(0)})
        return None if extra is None else extra[0]

    def group_regularizer(self, params: dict[str, Tensor], extras: dict[str, Tensor]) -> Tensor | None:
        """Each client's ``weight * (1 - mean_c cos(t_c, t_c^clip))`` ``(G,)`` (plus FedProx's term when set), on the
        features of this step's forward (encoded here when there was none)."""
        prox = super().group_regularizer(params, extras)
        if self.weight == 0:
            return prox
        text, self._step_text = self._step_text, None
        if text is None or text.shape[0] != params[CTX].shape[0]:
            text = self.prompt_learner.text_features(self.backbone, params[CTX])
        kg = self.weight * knowledge_guidance(text, self.anchor_features)
        return kg if prox is None else kg + prox
