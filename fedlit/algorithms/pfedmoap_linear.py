"""pFedMoAP with a linear-projection gate (pFedMoAP's Table 7 ablation): the federated rules of pFedMoAP (FedAvg of
the prompts, K experts per client from the pool, private gates) with :class:`~fedlit.modules.pfedmoap_linear.
PFedMoAPLinearClient` as the client model."""

from __future__ import annotations

from fedlit.algorithms.pfedmoap import PFedMoAP
from fedlit.backbone import Backbone
from fedlit.modules import ClientModule
from fedlit.modules.pfedmoap_linear import PFedMoAPLinearClient


class PFedMoAPLinear(PFedMoAP):
    name = "pfedmoap_linear"

    def build_module(self, backbone: Backbone, classnames: list[str]) -> ClientModule:
        """pFedMoAP's client with a ``Linear(d_gate, method.num_experts)`` softmax gate over the K + 1 experts."""
        return PFedMoAPLinearClient(backbone, classnames, gate=self.cfg.gate, lam=self.cfg.method.lam,
                                    num_experts=self.cfg.method.num_experts, **self.module_kwargs())
