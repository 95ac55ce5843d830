"""Federated VPT: the clients' prompt tokens inside the image tower are one global model, FedAvg'd every round."""

from __future__ import annotations

from fedlit.algorithms.base import GlobalModelAlgorithm
from fedlit.backbone import Backbone
from fedlit.data.features import TOKENS
from fedlit.modules import ClientModule
from fedlit.modules.vpt import VPTClient


class VPT(GlobalModelAlgorithm):
    name = "vpt"
    image_feature_kind = TOKENS  # read by build_client_data: cache the frozen image-tower tokens

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        cfg = self.cfg
        return VPTClient(backbone, classnames, prompt=cfg.prompt, template=cfg.method.template, seed=cfg.seed,
                         checkpoint_activations=cfg.perf.checkpoint_activations, optim=cfg.optim,
                         epochs=cfg.fed.local_epochs)
