"""Zero-shot CLIP client: a hand-written template per class, nothing trained."""

from __future__ import annotations

from torch import Tensor

from fedlit.backbone import Backbone
from fedlit.modules.base import ClientModule
from fedlit.prompts import clean_classname


class ZeroShotClient(ClientModule):
    """Classifies with the frozen text features of ``template.format(classname)`` (e.g. "a photo of a {}.")."""

    def __init__(self, backbone: Backbone | str, classnames: list[str], template: str = "a photo of a {}.",
                 **kwargs):
        super().__init__(backbone, classnames, **kwargs)
        self.template = template
        texts = [template.format(clean_classname(n)) for n in classnames]
        self.register_buffer("text_features", self.backbone.encode_text(texts), persistent=False)

    def class_text_features(self) -> Tensor:
        """The fixed hand-prompt features ``(C, D)``."""
        return self.text_features
