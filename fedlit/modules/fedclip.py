"""FedCLIP client: an attention adapter on the frozen image features, classified against frozen text features of a
hand-written prompt and trained with CLIP's symmetric contrastive loss. No prompt is learned."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlit.backbone import Backbone
from fedlit.modules.base import ClientModule
from fedlit.prompts import clean_classname

ADAPTER = "adapter."  # prefix of the adapter's parameters (the client's whole learnable state)


def linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x W^T + b`` for one layer (``weight (out, in)``, ``x (..., in)``) or G stacked layers (``weight (G, out,
    in)``, ``bias (G, out)``, ``x (G, ..., in)`` with one middle dimension, or ``(N, in)`` shared by the G layers)."""
    return torch.matmul(x, weight.transpose(-1, -2)) + bias.unsqueeze(-2)


def adapter_attention(params: dict[str, Tensor], x: Tensor, prefix: str = ADAPTER) -> Tensor:
    """FedCLIP's attention ``softmax(W_2 tanh(W_1 x + b_1) + b_2)`` over the feature dimension ``(..., D)``, from
    the adapter parameters in ``params`` (``<prefix>fc1.weight`` ... ; stacked ``(G, ...)`` for G clients, then
    ``x`` is ``(G, B, D)``)."""
    hidden = torch.tanh(linear(x, params[prefix + "fc1.weight"], params[prefix + "fc1.bias"]))
    return torch.softmax(linear(hidden, params[prefix + "fc2.weight"], params[prefix + "fc2.bias"]), dim=-1)


def adapt(params: dict[str, Tensor], image_features: Tensor, prefix: str = ADAPTER) -> Tensor:
    """The adapted, re-normalised image features ``normalize(attention(x) * x)`` ``(..., D)``."""
    return F.normalize(adapter_attention(params, image_features, prefix) * image_features, dim=-1)


def clip_contrastive_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """CLIP's symmetric loss on a batch whose i-th text is its i-th image's class prompt: with ``L = logits[:,
    labels]`` ``(B, B)`` (image i against the prompt of image j's label), ``(CE(L, arange) + CE(L^T, arange)) / 2``.
    Images of one class are each other's negatives, as in the public code, which encodes one prompt per image."""
    pairs = logits.float()[:, labels]
    target = torch.arange(len(labels), device=labels.device)
    return 0.5 * (F.cross_entropy(pairs, target) + F.cross_entropy(pairs.t(), target))


class AttentionAdapter(nn.Module):
    """``Linear(D, D) - Tanh - Linear(D, D) - Softmax`` (PyTorch's default init), FedCLIP's ``img_adap``."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """The attention weights ``(B, D)`` of image features ``(B, D)``."""
        return adapter_attention(dict(self.named_parameters()), x, prefix="")


class FedCLIPClient(ClientModule):
    """Logits ``s * normalize(a(I) * I) T^T``: ``a`` the attention adapter on the normalised image features ``I``,
    ``T`` the frozen normalised text features of ``template.format(classname)``. The loss is
    :func:`clip_contrastive_loss`; only the adapter is trained (constant lr ``lr``)."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], template: str = "a picture of a {}",
                 lr: float = 1.0, **kwargs):
        super().__init__(backbone, classnames, **kwargs)
        backbone = self.backbone  # the loaded one when given by name
        self.template = template
        self.lr = float(lr)
        self.adapter = AttentionAdapter(backbone.feature_dim)
        texts = [template.format(clean_classname(n)) for n in classnames]
        self.register_buffer("text_features", backbone.encode_text(texts).float(), persistent=False)

    def class_text_features(self) -> Tensor:
        """The fixed hand-prompt features ``(C, D)``."""
        return self.text_features

    def logits_from(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Logits ``(B, C)`` of this client's adapter on normalised image features ``(B, D)`` against class text
        features ``(C, D)``; training and evaluation both come here."""
        adapted = adapt(self.trainable_parameters(), image_features.to(text_features.dtype))
        return super().logits_from(adapted, text_features)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """CLIP's symmetric contrastive loss over the batch (:func:`clip_contrastive_loss`)."""
        return clip_contrastive_loss(logits, labels)

    def group_logits(self, params: dict[str, Tensor], image_features: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """Logits ``(G, B, C)`` of G stacked adapters on their clients' features ``(G, B, D)``."""
        adapted = adapt(params, image_features.to(self.text_features.dtype))
        return super().logits_from(adapted, self.text_features)

    def group_loss(self, logits: Tensor, labels: Tensor, sizes: list[int], params: dict[str, Tensor],
                   extras: dict[str, Tensor]) -> Tensor:
        """Each client's contrastive loss ``(G,)`` over its own rows (the rest of ``logits (G, B, C)`` is padding)."""
        return torch.stack([clip_contrastive_loss(logits[g, :n], labels[g, :n]) for g, n in enumerate(sizes)])

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.adapter.parameters()), "lr": self.lr, "schedule": "constant"}]
