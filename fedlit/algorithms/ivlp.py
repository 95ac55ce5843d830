"""Federated IVLP: the clients' independent text and vision prompts are one global model, FedAvg'd every round
(as the FedMGP repository's IVLP with ``AGGREGATE: all``); every client is evaluated with it."""

from __future__ import annotations

from fedlit.algorithms.base import GlobalModelAlgorithm
from fedlit.backbone import Backbone
from fedlit.data.features import TOKENS
from fedlit.modules import ClientModule
from fedlit.modules.ivlp import IVLPClient


class IVLP(GlobalModelAlgorithm):
    name = "ivlp"
    image_feature_kind = TOKENS  # read by build_client_data: cache the frozen image-tower tokens

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        return IVLPClient(backbone, classnames, checkpoint_activations=self.cfg.perf.checkpoint_activations,
                          **self.module_kwargs())
