"""Federated MaPLe: the clients' text prompts and coupling functions are one global model, FedAvg'd every round
(as the FedMGP repository's federated MaPLe averages every trainable tensor); every client is evaluated with it."""

from __future__ import annotations

from fedlit.algorithms.base import GlobalModelAlgorithm
from fedlit.backbone import Backbone
from fedlit.data.features import TOKENS
from fedlit.modules import ClientModule
from fedlit.modules.maple import MaPLeClient


class MaPLe(GlobalModelAlgorithm):
    name = "maple"
    image_feature_kind = TOKENS  # read by build_client_data: cache the frozen image-tower tokens

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return MaPLeClient(backbone, classnames, checkpoint_activations=self.cfg.perf.checkpoint_activations,
                           **self.module_kwargs())
