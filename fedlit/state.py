"""Typed client state that travels between the algorithms, the local trainer, the collectives and checkpoints.

A client's learnable tensors are named as the client module names its parameters (``prompt_learner.ctx``,
``gate.q_proj.weight``, ...). Optimiser state, when it persists across rounds, is kept beside them per parameter,
as ``torch.optim`` keeps it (``{"momentum_buffer": tensor}``). ``extras`` is opaque per-method data that the
algorithm owns (pFedMoAP's downloaded expert prompts): the backend stores and checkpoints it without reading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

PROMPT = "prompt_learner.ctx"  # the CoOp context of every prompt-learning client module
GATE = "gate."  # prefix of pFedMoAP's private gate parameters
OPTIM_SEPARATOR = "/"  # flat names of optimiser state: "optim/<parameter>/<key>"

Params = dict[str, Tensor]


@dataclass
class ClientState:
    """A client's own tensors: ``params`` (parameter name -> tensor) and ``optim`` (parameter name -> optimiser
    state such as ``{"momentum_buffer": tensor}``; empty unless optimiser state persists across rounds)."""

    params: Params
    optim: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def flat(self) -> dict[str, Tensor]:
        """All tensors under one flat namespace: parameter names, and ``optim/<parameter>/<key>``."""
        out = dict(self.params)
        for name, entries in self.optim.items():
            for key, value in entries.items():
                out[OPTIM_SEPARATOR.join(("optim", name, key))] = value
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, Tensor]) -> ClientState:
        """Inverse of :meth:`flat`."""
        params, optim = {}, {}
        for name, value in flat.items():
            if name.startswith("optim" + OPTIM_SEPARATOR):
                _, param, key = name.split(OPTIM_SEPARATOR, 2)
                optim.setdefault(param, {})[key] = value
            else:
                params[name] = value
        return cls(params=params, optim=optim)

    def detached(self) -> ClientState:
        """A deep copy on the CPU, detached from any graph."""
        return ClientState.from_flat({k: v.detach().cpu().clone() for k, v in self.flat().items()})


@dataclass
class Upload:
    """What a client sends back after local training: its state, the mean of its batch losses and its step count."""

    state: ClientState
    loss: float
    steps: int

    def flat(self) -> dict[str, Tensor]:
        """The state's flat tensors plus ``stat/loss`` and ``stat/steps`` as float32 ``(1,)`` tensors."""
        return {**self.state.flat(), "stat/loss": torch.tensor([self.loss], dtype=torch.float32),
                "stat/steps": torch.tensor([float(self.steps)])}

    @classmethod
    def from_flat(cls, flat: dict[str, Tensor]) -> Upload:
        """Inverse of :meth:`flat`."""
        rest = {k: v for k, v in flat.items() if not k.startswith("stat/")}
        return cls(ClientState.from_flat(rest), loss=float(flat["stat/loss"]), steps=int(flat["stat/steps"]))


@dataclass
class ClientPlan:
    """What a sampled client starts a round from: its state, and per-method ``extras`` handed to the client module
    (``module.set_extras``), e.g. pFedMoAP's expert prompts or FedProx's centre."""

    start: ClientState
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class StoreEntry:
    """A client's entry in the store after its last participation: its state, what its algorithm chose to keep
    (``extras``, opaque to the backend) and the round it last trained in."""

    state: ClientState
    extras: dict[str, Any] = field(default_factory=dict)
    last_round: int = 0

    def to_dict(self) -> dict:
        """A plain dict of tensors, numbers and lists (what checkpoints hold)."""
        return {"state": self.state.flat(), "extras": self.extras, "last_round": self.last_round}

    @classmethod
    def from_dict(cls, data: dict) -> StoreEntry:
        """Inverse of :meth:`to_dict`."""
        return cls(ClientState.from_flat(data["state"]), dict(data["extras"]), int(data["last_round"]))


@dataclass
class ServerState:
    """Replicated server state: the global tensors (``{"ctx": P_g}``, optionally more), algorithm-owned ``extras``,
    algorithm-owned ``client_records`` (client id -> a plain tree the server keeps about that client: pFedMoAP's
    pool of latest prompts) and the number of completed rounds.

    ``client_records`` grows with the clients that have ever participated, so on the disk store a round's
    checkpoint writes only the records that changed: a round replaces the records it changes with new objects and
    never modifies one in place (nor removes one), and the backend writes the records whose object changed."""

    global_state: Params
    extras: dict[str, Any] = field(default_factory=dict)
    round: int = 0
    client_records: dict[int, Any] = field(default_factory=dict)

    def to_dict(self, records: bool = True) -> dict:
        """A plain dict (what checkpoints hold); without ``client_records`` when not ``records`` (the disk store
        keeps them in their own files)."""
        out = {"global_state": self.global_state, "extras": self.extras, "round": self.round}
        return {**out, "client_records": self.client_records} if records else out

    @classmethod
    def from_dict(cls, data: dict) -> ServerState:
        """Inverse of :meth:`to_dict` (records absent: none)."""
        records = {int(c): r for c, r in data.get("client_records", {}).items()}
        return cls(dict(data["global_state"]), dict(data["extras"]), int(data["round"]), records)


@dataclass(frozen=True)
class SyncStep:
    """One lock-step of the synchronous mode: the round (from 1), the step within it (from 0) and the clients that
    take it (ascending ids: the round's clients with a batch left at this step)."""

    round: int
    step: int
    clients: tuple[int, ...]
