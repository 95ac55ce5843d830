"""FedCLIP (Lu et al., 2023): each client trains an attention adapter on the frozen image features against frozen
hand-prompt text features; the server averages the adapters (FedAvg) and every client is evaluated with the
averaged adapter, the global model.

The adapter's parameters (``adapter.fc1.weight`` ...) are the client's whole learnable state and, under the same
names, the server's global state; no prompt is learned (:class:`GlobalModelAlgorithm`).
"""

from __future__ import annotations

from fedlit.algorithms.base import GlobalModelAlgorithm
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule
from fedlit.modules.fedclip import FedCLIPClient


class FedCLIP(GlobalModelAlgorithm):
    name = "fedclip"

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        m, cfg = self.cfg.method, self.cfg
        return FedCLIPClient(backbone, classnames, template=m.clip_adapter_template, lr=m.clip_adapter_lr,
                             optim=cfg.optim, epochs=cfg.fed.local_epochs)
