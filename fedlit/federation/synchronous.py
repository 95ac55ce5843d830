"""The synchronous mode (FedSGD-style): a round as lock-step local steps, one gradient collective per step.

An algorithm with ``synchronous = True`` names its shared parameters (:meth:`Algorithm.shared_parameters`, the
global prompt by default). At step ``t`` of round ``r`` every client with a batch left computes its gradient on
its ``t``-th batch (its own data order, as in the round mode); each rank packs its clients' gradients of the
shared parameters into one flat buffer and all ranks gather them (one ``all_gather`` per step); every rank then
combines them identically (:meth:`Algorithm.combine_gradients`, client-id order) and steps the shared parameters
with the result, while each client steps its own parameters with its own gradient
(:meth:`Algorithm.private_gradients`). A round has ``S = max_c steps_c`` steps (``steps_c`` = local epochs x the
client's batches per epoch); a client whose batches are used up leaves the remaining steps (it contributes no
gradient and its own parameters stay). The shared parameters are one replicated copy per rank stepped by SGD with
the module's hyper-parameters, at the learning rate of the epoch the round's longest client is in, and a momentum
buffer that starts at zero every round; each client's own parameters keep the round mode's per-client SGD
(momentum from its state with ``optim.persistent_state``). After the last step the round's uploads travel in the
round mode's one gather, so a round costs ``S + 1`` collectives. The method never sees ranks: its functions get
client ids, tensors and the :class:`~fedlit.state.SyncStep`, and every random draw is seeded by (seed, round,
step[, client]), so 1 and N processes give bitwise the same numbers.

Backward runs without loss scaling (``16-mixed`` precision gets no GradScaler here; use ``32-true`` or
``bf16-mixed``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlit.algorithms import Algorithm
from fedlit.federation.client_data import ClientData
from fedlit.federation.collectives import flatten_state, gather_rows, layout_size, state_layout, unflatten_state
from fedlit.federation.trainer import MOMENTUM, LocalTrainer, masked_sgd_step, read_schedule
from fedlit.state import ClientPlan, ClientState, Params, SyncStep, Upload


def client_steps(data: ClientData, clients: list[int], epochs: int) -> dict[int, int]:
    """Steps each client takes in a round of ``epochs`` local epochs (every rank computes it from the partition)."""
    return {c: epochs * data.batches_per_epoch(c) for c in clients}


def steps_bound(data: ClientData, epochs: int) -> int:
    """The most steps any client of the partition takes in a round: the bound per-step noise is accounted for."""
    return max(client_steps(data, list(range(data.partition.num_clients)), epochs).values())


def shared_start(plans: dict[int, ClientPlan], names: tuple[str, ...]) -> Params:
    """The shared parameters' start values, equal in every plan of the round (ValueError otherwise: a method bug)."""
    first = plans[min(plans)].start.params
    for cid, plan in plans.items():
        for name in names:
            if not torch.equal(plan.start.params[name], first[name]):
                raise ValueError(f"synchronous mode: client {cid}'s plan starts shared parameter {name} elsewhere")
    return {name: first[name].detach().clone() for name in names}


def _sgd(param: Tensor, grad: Tensor, buf: Tensor, hyper: dict, lr: float) -> None:
    """One ``torch.optim.SGD`` step of one tensor in place (the local trainer's op order, a group of one)."""
    masked_sgd_step(param.unsqueeze(0), grad.unsqueeze(0), buf.unsqueeze(0), [0], [lr], hyper["momentum"],
                    hyper["weight_decay"], hyper["nesterov"])


def train_synchronous(trainer: LocalTrainer, algorithm: Algorithm, plans: dict[int, ClientPlan], mine: list[int],
                      round_index: int, fabric=None, slots: int = 1) -> dict[int, Upload]:
    """Round ``round_index`` of the synchronous mode (see the module docstring) for the round's ``plans`` (every
    sampled client's, on every rank); this rank trains ``mine``. ``slots``: the most clients a rank trains this
    round. Returns the uploads of ``mine`` (CPU), each with the round's final shared values."""
    module, device = trainer.module, trainer.device
    names = tuple(algorithm.shared_parameters())
    epochs = trainer.local_epochs
    steps = client_steps(trainer.data, sorted(plans), epochs)
    total = max(steps.values())
    longest = min(c for c in plans if steps[c] == total)  # its epoch sets the shared learning rate of each step
    per_epoch = max(1, trainer.data.batches_per_epoch(longest))
    module.train()
    clients = {c: trainer._prepare(c, plans[c], round_index) for c in sorted(mine)}
    for cid, client in clients.items():
        assert len(client.batches) == steps[cid], (cid, len(client.batches), steps[cid])
    schedule = read_schedule(module, epochs)
    shared = {n: v.to(device) for n, v in shared_start(plans, names).items()}
    shared_buf = {n: torch.zeros_like(v) for n, v in shared.items()}
    layout = state_layout(shared)
    width = layout_size(layout)
    losses: dict[int, list[Tensor]] = {c: [] for c in clients}
    for t in range(total):
        step = SyncStep(round_index, t, tuple(c for c in sorted(plans) if t < steps[c]))
        rows, own = {}, {}
        for cid, client in clients.items():
            if t >= steps[cid]:
                continue
            private = {n: v for n, v in client.params.items() if n not in shared}
            module.load_client_state({**private, **shared})
            module.set_extras(client.plan.extras)
            x, y = client.batches[t]
            with trainer.autocast():
                loss = module.loss(trainer._restrict(module(x)), y)
            module.zero_grad(set_to_none=True)
            loss.backward()
            grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                     for n, p in module.trainable_parameters().items()}
            losses[cid].append(loss.detach().float())
            rows[cid] = flatten_state({n: grads[n] for n in names}, layout)
            own[cid] = algorithm.private_gradients(cid, private, {n: grads[n] for n in private}, step)
        gathered = gather_rows(fabric, rows, width, slots)
        combined = algorithm.combine_gradients({c: unflatten_state(gathered[c], layout) for c in step.clients}, step)
        lr_epoch = min(t // per_epoch, epochs - 1)
        for name in names:
            _sgd(shared[name], combined[name].to(device), shared_buf[name], schedule.hyper[name],
                 schedule.lrs[name][lr_epoch])
        for cid, grads in own.items():
            client = clients[cid]
            epoch = client.epochs[t]
            for name, grad in grads.items():
                _sgd(client.params[name], grad.to(device), client.momentum[name], schedule.hyper[name],
                     schedule.lrs[name][epoch])
    uploads = {}
    for cid, client in clients.items():
        final = {**client.params, **shared}
        params = {n: final[n].detach().cpu().clone() for n in client.params}
        buffers = {**client.momentum, **shared_buf}
        optim = {n: {MOMENTUM: buffers[n].cpu().clone()} for n in client.params} if trainer.persistent_state else {}
        loss = float(torch.stack(losses[cid]).mean()) if losses[cid] else 0.0
        uploads[cid] = Upload(ClientState(params, optim), loss=loss, steps=steps[cid])
    return uploads
