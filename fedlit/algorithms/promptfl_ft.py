"""PromptFL+FT: PromptFL's training (FedAvg of the prompt); for the personalised evaluation each client first
fine-tunes the evaluation-time global prompt ``P_g`` on its own train split for ``method.ft_epochs`` epochs.

The fine-tuning runs in the seam's evaluation (``Algorithm.finetune_epochs``): the local trainer trains every
evaluated client from :meth:`eval_plan` (the global prompt, fresh optimiser state, SPEC §3's SGD and cosine lr over
the fine-tuning epochs, data order from the client's own (seed, round, client) stream), and the tuned prompt is
evaluated and then dropped: it never reaches the store, the server state or the next round.
"""

from __future__ import annotations

from fedlit.algorithms.promptfl import PromptFL
from fedlit.state import ClientPlan, ClientState, ServerState, StoreEntry


class PromptFLFT(PromptFL):
    name = "promptfl_ft"

    def finetune_epochs(self) -> int:
        """Epochs of local fine-tuning before each client's personalised evaluation: ``method.ft_epochs``, or
        ``fed.local_epochs`` when it is null (0: none, i.e. PromptFL's evaluation of the global prompt)."""
        epochs = self.cfg.method.ft_epochs
        return self.cfg.fed.local_epochs if epochs is None else epochs

    def eval_plan(self, server: ServerState, client_id: int, entry: StoreEntry | None,
                  initial: ClientState) -> ClientPlan:
        """The fine-tuning start of every client: the evaluation-time global prompt ``P_g`` (cloned, with the
        initial state's other tensors), whatever the client's own history."""
        return self.global_plan(server, initial)
