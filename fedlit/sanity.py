"""Sanity gate: a pretrained CLIP must beat chance zero-shot, or the class names do not match the labels."""

from __future__ import annotations

import torch
from torch import Tensor

from fedlit.backbone import Backbone
from fedlit.errors import UserError
from fedlit.modules import ZeroShotClient


@torch.no_grad()
def zero_shot_accuracy(backbone: Backbone, classnames: list[str], image_features: Tensor, labels: Tensor,
                       template: str = "a photo of a {}.") -> float:
    """Top-1 accuracy of the hand prompt ``template.format(classname)`` (the zero-shot client's classifier) over
    normalised image features ``(N, D)`` (e.g. ``backbone.encode_image(images)``) with labels ``(N,)``: the one
    zero-shot accuracy of fedlit (the sanity gate, the pretrained shapes CLIP's check)."""
    client = ZeroShotClient(backbone, classnames, template=template)
    features = image_features.to(client.text_features.device)
    predictions = client.logits_from(features, client.text_features).argmax(dim=-1).cpu()
    return int((predictions == torch.as_tensor(labels).cpu()).sum()) / max(1, len(predictions))


def chance_threshold(num_classes: int) -> float:
    """Accuracy at or below which zero-shot counts as chance: ``max(1.5 / C, 1 / C + 0.02)``."""
    return max(1.5 / num_classes, 1.0 / num_classes + 0.02)


def check_zero_shot(accuracy: float, num_classes: int, dataset: str) -> None:
    """Raise a one-line UserError when ``accuracy`` is at chance level for ``num_classes`` classes."""
    if accuracy <= chance_threshold(num_classes):
        raise UserError(
            f"zero-shot accuracy of the pretrained backbone on {dataset} is {100 * accuracy:.1f}%, chance level for "
            f"{num_classes} classes: class names are probably misaligned with the label ids (or the weights are "
            "wrong); set backbone.sanity_check=false to run anyway"
        )
