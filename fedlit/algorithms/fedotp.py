"""FedOTP (Li et al., CVPR 2024): a global prompt (FedAvg) and a private local prompt per client, combined per image
by unbalanced optimal transport over its patch features (:mod:`fedlit.modules.fedotp`).

A sampled client starts from the latest global prompt and its own local prompt, trains both, and uploads both; the
server averages the global prompts only. Every client is evaluated with the latest global prompt and its own local
prompt (its initial local prompt before its first round), as FedOTP's code evaluates after each round. There is no
global model: the transport needs the client's local prompt.
"""

from __future__ import annotations

from fedlit.algorithms.base import GLOBAL_PROMPT, Algorithm, averaged_global, with_params
from fedlit.backbone import Backbone
from fedlit.config import Config
from fedlit.errors import UserError
from fedlit.modules.fedotp import FedOTPClient
from fedlit.state import PROMPT, ClientPlan, ClientState, ServerState, StoreEntry, Upload


class FedOTP(Algorithm):
    name = "fedotp"
    image_feature_kind = FedOTPClient.image_feature_kind  # read by build_client_data: cache patch features

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        method = cfg.method
        if not method.ot_eps > 0:
            raise UserError(f"method.ot_eps must be > 0 (got {method.ot_eps})")
        if not 0 < method.ot_top_percent <= 1:
            raise UserError(f"method.ot_top_percent must be in (0, 1] (got {method.ot_top_percent})")
        if method.ot_max_iter < 1:
            raise UserError(f"method.ot_max_iter must be >= 1 (got {method.ot_max_iter})")
        if not method.ot_thresh >= 0:
            raise UserError(f"method.ot_thresh must be >= 0 (got {method.ot_thresh})")

    def build_module(self, backbone: Backbone, classnames: list[str]) -> FedOTPClient:
        method = self.cfg.method
        return FedOTPClient(backbone, classnames, eps=method.ot_eps, top_percent=method.ot_top_percent,
                            max_iter=method.ot_max_iter, thresh=method.ot_thresh, **self.module_kwargs())

    def aggregate(self, server: ServerState, uploads: dict[int, Upload], sizes: dict[int, int]) -> ServerState:
        """FedAvg of the global prompts; the local prompts stay with their clients."""
        new = super().aggregate(server, uploads, sizes)
        new.global_state = averaged_global(server, uploads, sizes, {PROMPT: GLOBAL_PROMPT})
        return new

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        """The latest global prompt with the client's own local prompt (the initial one if it never trained)."""
        own = entry.state if entry is not None else initial
        return ClientPlan(start=with_params(own, {PROMPT: server.global_state[GLOBAL_PROMPT]}))

    def global_plan(self, server: ServerState, initial: ClientState) -> ClientPlan | None:
        """None: every FedOTP model includes a client's local prompt."""
        return None
