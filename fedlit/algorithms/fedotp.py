"""FedOTP (Li et al., CVPR 2024): a global prompt (FedAvg) and a private local prompt per client, combined per image
by unbalanced optimal transport over its patch features (:mod:`fedlit.modules.fedotp`).

A sampled client starts from the latest global prompt and its own local prompt, trains both, and uploads both; the
server averages the global prompts only. Every client is evaluated with the latest global prompt and its own local
prompt (its initial local prompt before its first round), as FedOTP's code evaluates after each round. There is no
global model: the transport needs the client's local prompt.
"""

from __future__ import annotations

from fedlit.algorithms.promptfl import PromptFL
from fedlit.backbone import Backbone
from fedlit.modules.fedotp import FedOTPClient
from fedlit.state import ClientPlan, ClientState, ServerState, StoreEntry


class FedOTP(PromptFL):
    """PromptFL's FedAvg of the global prompt; a private local prompt per client; no global model."""

    name = "fedotp"
    image_feature_kind = FedOTPClient.image_feature_kind  # read by build_client_data: cache patch features

    def build_module(self, backbone: Backbone, classnames: list[str]) -> FedOTPClient:
        method = self.cfg.method
        return FedOTPClient(backbone, classnames, eps=method.ot_eps, top_percent=method.ot_top_percent,
                            max_iter=method.ot_max_iter, thresh=method.ot_thresh, **self.module_kwargs())

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        """The latest global prompt with the client's own local prompt (the initial one if it never trained)."""
        return self.plan(server, client_id, entry, initial)

    def global_plan(self, server: ServerState, initial: ClientState) -> ClientPlan | None:
        """None: every FedOTP model includes a client's local prompt."""
        return None
