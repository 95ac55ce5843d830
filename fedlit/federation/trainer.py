"""The one local trainer: every method's clients train here, in groups (the sequential path is a group of one).

Each client keeps the semantics of SPEC §3: its own data order (its own generator, epochs consumed in order), its
own number of steps, and SGD with momentum and weight decay at its own per-epoch learning rates, read from the
module's ``configure_optimizers`` (the same optimiser a Lightning ``Trainer`` would use). Optimiser state starts
at zero every round unless ``optim.persistent_state`` carries it in the client state.

A group of one client trains the module itself (``module(x)``, ``module.loss``: bitwise the Lightning path, so 1
and N processes give identical numbers). A larger group stacks the clients' parameters into leaves
``(G, *shape)``, pads their batches to the longest one and asks the module for the group's logits (one text-tower
pass over ``G x C`` prompts, one gate call) and per-client losses; the group's loss is the sum of the clients'
losses, so each client's gradient is its own. A client that has finished its steps leaves the forward, and its
parameters and momentum stay untouched. Groups agree with single clients up to fp32 rounding (padded and batched
matmuls sum in another order). The trainer never asks which method runs.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from fedlit.federation.client_data import ClientData
from fedlit.federation.sampling import CLIENT_STREAM, client_generator
from fedlit.modules import ClientModule
from fedlit.state import ClientPlan, ClientState, Upload

# Floats one text-transformer layer keeps for backward per token, in units of the width (layer-norm inputs and
# outputs, q/k/v, attention output, out-projection, two MLP tensors of 4x width, residuals): about 18.
ACTIVATIONS_PER_TOKEN = 18
MEMORY_FRACTION = 0.5  # share of the free memory a group may fill with its activations
MOMENTUM = "momentum_buffer"  # torch.optim.SGD's per-parameter state key


@dataclass
class Schedule:
    """The SGD a module configures, per parameter name: hyper-parameters and each epoch's learning rate."""

    hyper: dict[str, dict]  # name -> {"momentum", "weight_decay", "nesterov"}
    lrs: dict[str, list[float]]  # name -> lr of epoch 0, 1, ...


@dataclass
class _Client:
    """One client's prepared round: its plan, start values, stacked-able extras and every step's batch."""

    cid: int
    plan: ClientPlan
    params: dict[str, Tensor]
    momentum: dict[str, Tensor]
    extras: dict[str, Tensor]
    schedule: Schedule
    classes: list[int]  # the labels it trains on (ClientModule.set_client_classes)
    batches: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (image features (B, D), labels (B,))
    epochs: list[int] = field(default_factory=list)  # epoch of each step


class MaskedSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` over stacked leaves ``(G, *shape)`` (or one client's parameters), stepping only the
    clients in :attr:`active`, each at its own learning rate (:attr:`lrs`: parameter index -> one lr per client).
    Momentum buffers are the ``(G, *shape)`` tensors given in ``buffers``. A real optimiser, so that Fabric's
    precision plugins (loss scaling, inf checks) drive it like any other."""

    def __init__(self, params: list[Tensor], hyper: list[dict], buffers: list[Tensor]):
        super().__init__([{"params": [p], **h} for p, h in zip(params, hyper)], defaults={})
        for p, buf in zip(params, buffers):
            self.state[p][MOMENTUM] = buf
        self.active: list[int] = []
        self.lrs: list[list[float]] = []

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's signature
        for index, group in enumerate(self.param_groups):
            p = group["params"][0]
            if p.grad is None:  # unused this step (e.g. a gate without experts): untouched, as in torch
                continue
            buf = self.state[p][MOMENTUM]
            stacked, grad = (p, p.grad) if p.dim() == buf.dim() else (p.unsqueeze(0), p.grad.unsqueeze(0))
            masked_sgd_step(stacked, grad, buf, self.active, self.lrs[index], group["momentum"],
                            group["weight_decay"], group["nesterov"])


def masked_sgd_step(param: Tensor, grad: Tensor, buf: Tensor, on: list[int], lr: list[float], momentum: float,
                    weight_decay: float = 0.0, nesterov: bool = False) -> None:
    """``torch.optim.SGD``'s update of G stacked clients, in place, for the clients ``on`` only, op for op as torch
    computes it: ``d = grad + wd p``; ``buf = m buf + d`` (``buf`` starts at zero, so the first step gives
    ``buf = d``); ``p -= lr_g (d + m buf if nesterov else buf)``. With ``m = 0`` the buffer is left as it is."""
    d = grad.add(param, alpha=weight_decay) if weight_decay != 0 else grad
    if momentum != 0:
        new_buf = buf.mul(momentum).add_(d)
        buf[on] = new_buf[on]
        d = d.add(new_buf, alpha=momentum) if nesterov else new_buf
    for i in on:  # each client's own lr, with the same fused op as torch (p + alpha d)
        param[i].add_(d[i], alpha=-lr[i])


def read_schedule(module: ClientModule, epochs: int) -> Schedule:
    """The module's own optimiser and epoch scheduler, stepped through ``epochs`` epochs to read every lr (the
    cosine spans those ``epochs``)."""
    saved, module.epochs = module.epochs, epochs
    try:
        conf = module.configure_optimizers()
    finally:
        module.epochs = saved
    if conf is None:
        raise ValueError(f"{type(module).__name__} has nothing to train")
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    if type(optimizer) is not torch.optim.SGD:
        raise ValueError(f"the local trainer mirrors torch.optim.SGD, got {type(optimizer).__name__}")
    names = {id(p): n for n, p in module.trainable_parameters().items()}
    hyper, lrs = {}, {}
    for group in optimizer.param_groups:
        if group["dampening"] != 0 or group["maximize"]:
            raise ValueError("the local trainer supports SGD without dampening or maximize")
        for p in group["params"]:
            hyper[names[id(p)]] = {k: group[k] for k in ("momentum", "weight_decay", "nesterov")}
            lrs[names[id(p)]] = []
    with warnings.catch_warnings():  # stepping the scheduler without optimiser steps is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epochs):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    lrs[names[id(p)]].append(float(group["lr"]))
            scheduler.step()
    return Schedule(hyper=hyper, lrs=lrs)


class LocalTrainer:
    """Trains the clients of one rank for ``local_epochs`` from their plans; ``fabric`` (optional) supplies
    autocast, backward and the optimiser wrapper of the run's precision."""

    def __init__(self, module: ClientModule, data: ClientData, *, seed: int, local_epochs: int,
                 persistent_state: bool = False, client_batch: int = 1, device: torch.device | str = "cpu",
                 fabric=None):
        if client_batch < 0:
            raise ValueError(f"client_batch must be >= 0 (got {client_batch}); 0 chooses it from free memory")
        self.module = module
        self.data = data
        self.seed = seed
        self.local_epochs = local_epochs
        self.persistent_state = persistent_state
        self.client_batch = client_batch
        self.device = torch.device(device)
        self.fabric = fabric
        self.trained_classes: list[int] | None = None  # None: all; else the softmax of training covers these only
        self.flipped_clients: frozenset[int] = frozenset()  # label-flipping attackers: train on flipped labels
        self.eval_holder: object | None = None  # the EvalModel whose plan the module holds (None: any other load)

    def autocast(self):
        """The run's autocast context (none without Fabric)."""
        return self.fabric.autocast() if self.fabric is not None else contextlib.nullcontext()

    def load(self, plan: ClientPlan, classes: list[int] | None = None) -> None:
        """Put a plan's parameters and extras into the module (for training or evaluation), and the classes the
        client trains on (None: not training)."""
        self.eval_holder = None
        self.module.load_client_state(plan.start.params)
        self.module.set_extras(plan.extras)
        self.module.set_client_classes(classes)

    def empty_upload(self, initial: ClientState) -> Upload:
        """The upload of a client that trained no step: the layout every rank knows, even one without clients."""
        optim = {n: {MOMENTUM: torch.zeros_like(v)} for n, v in initial.params.items()} if self.persistent_state else {}
        return Upload(ClientState(dict(initial.params), optim), loss=0.0, steps=0)

    def train(self, plans: dict[int, ClientPlan], round_index: int, epochs: int | None = None,
              stream: int = CLIENT_STREAM) -> dict[int, Upload]:
        """Train every client of ``plans`` (in groups of ``client_batch``; 0: :func:`auto_group_size`) for ``epochs``
        (default ``local_epochs``) with data drawn from each client's ``stream`` of the round; returns ``{cid:
        upload}`` on the CPU in the order of ``plans``."""
        if not plans:
            return {}
        module = self.module
        module.train()
        size = self.client_batch if module.supports_groups else 1
        uploads: dict[int, Upload] = {}
        if size == 1:  # prepare and train one client at a time: nothing is held for the others
            for cid, plan in plans.items():
                uploads.update(self._train_group([self._prepare(cid, plan, round_index, epochs, stream)]))
            return uploads
        clients = [self._prepare(cid, plan, round_index, epochs, stream) for cid, plan in plans.items()]
        if size == 0:
            extras = max(sum(t.numel() * t.element_size() for t in c.extras.values()) for c in clients)
            size = auto_group_size(module, len(clients), self.data.batch_size, self.device, extras_bytes=extras)
        for group in _groups(clients, size):
            uploads.update(self._train_group(group))
        return {cid: uploads[cid] for cid in plans}

    def _prepare(self, cid: int, plan: ClientPlan, round_index: int, epochs: int | None = None,
                 stream: int = CLIENT_STREAM) -> _Client:
        """Load ``plan``, read back the client's start values, extras and optimiser schedule, and draw all its
        batches. Images (when features are not cached) are encoded here: the frozen image tower does not depend
        on the client's state, and only the small features are kept (for an image-side module: the frozen tokens
        below its first prompted block, :meth:`~fedlit.modules.base.ClientModule.frozen_image_inputs`)."""
        module = self.module
        flip = self._label_flip(module.num_classes) if cid in self.flipped_clients else None
        classes = self.data.train_classes(cid, flip)
        self.load(plan, classes)
        params = {n: p.detach().clone() for n, p in module.trainable_parameters().items()}
        momentum = {n: torch.zeros_like(p) for n, p in params.items()}
        if self.persistent_state:
            for name, state in plan.start.optim.items():
                if MOMENTUM in state:
                    momentum[name] = state[MOMENTUM].clone().to(params[name])
        extras = {n: t.detach() for n, t in module.client_extras().items()}
        epochs = self.local_epochs if epochs is None else epochs
        client = _Client(cid, plan, params, momentum, extras, read_schedule(module, epochs), classes)
        generator = client_generator(self.seed, round_index, cid, stream)
        for epoch in range(epochs):
            for x, y in self.data.train_batches(cid, generator, self.device):
                if flip is not None:
                    y = flip.to(y.device)[y]
                with torch.no_grad(), self.autocast():
                    x = module.frozen_image_inputs(x)  # pooled features, or an image-side module's frozen tokens
                client.batches.append((x, y))
                client.epochs.append(epoch)
        return client

    def _label_flip(self, num_classes: int) -> Tensor:
        """The label map ``(C,)`` of a label-flipping client: ``y -> C - 1 - y``, within the trained classes
        (base-to-novel: the i-th base class becomes the i-th from the end of the base classes)."""
        classes = torch.as_tensor(self.trained_classes if self.trained_classes is not None else range(num_classes))
        table = torch.arange(num_classes)
        table[classes] = classes.flip(0)
        return table

    def _train_group(self, group: list[_Client]) -> dict[int, Upload]:
        """Train one group of clients sharing their extras' shapes, step by step, until the longest has finished."""
        module, fabric = self.module, self.fabric
        names = list(group[0].params)
        single = len(group) == 1
        if single:  # the module itself is the client: its own forward and loss
            self.load(group[0].plan, group[0].classes)
            leaves = module.trainable_parameters()
        else:
            leaves = {n: torch.stack([c.params[n] for c in group]).requires_grad_(True) for n in names}
        buffers = [torch.stack([c.momentum[n] for c in group]) for n in names]
        hyper = [group[0].schedule.hyper[n] for n in names]
        optimizer = MaskedSGD([leaves[n] for n in names], hyper, buffers)
        stepper = fabric.setup_optimizers(optimizer) if fabric is not None else optimizer
        extras = {n: torch.stack([c.extras[n] for c in group]) for n in group[0].extras}
        steps = [len(c.batches) for c in group]
        losses: list[list[Tensor]] = [[] for _ in group]
        for t in range(max(steps)):
            active = [i for i, s in enumerate(steps) if t < s]
            with self.autocast():
                loss = self._forward(group, leaves, extras, active, t, single)
            stepper.zero_grad(set_to_none=True)
            if fabric is not None:
                fabric.backward(loss.sum())
            else:
                loss.sum().backward()
            for j, i in enumerate(active):
                losses[i].append(loss[j].detach().float())
            optimizer.active = active
            optimizer.lrs = [[c.schedule.lrs[n][c.epochs[t]] if t < steps[i] else 0.0 for i, c in enumerate(group)]
                             for n in names]
            stepper.step()
        out = {}
        for i, c in enumerate(group):
            params = {n: (leaves[n] if single else leaves[n][i]).detach().cpu().clone() for n in names}
            optim = {n: {MOMENTUM: buffers[k][i].cpu().clone()} for k, n in enumerate(names)} \
                if self.persistent_state else {}
            loss = float(torch.stack(losses[i]).mean()) if losses[i] else 0.0
            out[c.cid] = Upload(ClientState(params, optim), loss=loss, steps=steps[i])
        return out

    def _forward(self, group: list[_Client], leaves: dict[str, Tensor], extras: dict[str, Tensor],
                 active: list[int], t: int, single: bool) -> Tensor:
        """The active clients' losses ``(A,)`` at step ``t``."""
        module = self.module
        if single:
            x, y = group[0].batches[t]
            return module.loss(self._restrict(module(x)), y).reshape(1)
        index = torch.tensor(active, device=self.device)
        everyone = len(active) == len(group)
        sub = {n: p if everyone else p.index_select(0, index) for n, p in leaves.items()}
        sub_extras = {n: e if everyone else e.index_select(0, index) for n, e in extras.items()}
        x = pad_sequence([group[i].batches[t][0] for i in active], batch_first=True)  # (A, B, D), zero padded
        y = pad_sequence([group[i].batches[t][1] for i in active], batch_first=True)
        sizes = [len(group[i].batches[t][1]) for i in active]
        return module.group_loss(self._restrict(module.group_logits(sub, x, sub_extras)), y, sizes, sub, sub_extras)

    def _restrict(self, logits: Tensor) -> Tensor:
        """Logits ``(..., C)`` with the classes outside :attr:`trained_classes` at -inf (their softmax share is
        zero: training sees the base classes' names only, as CoOp's base-to-novel protocol trains)."""
        if self.trained_classes is None:
            return logits
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        allowed[self.trained_classes] = True
        return logits.masked_fill(~allowed, float("-inf"))


def _groups(clients: list[_Client], size: int) -> list[list[_Client]]:
    """Groups of at most ``size`` clients whose extras have equal shapes (e.g. the same number of experts K);
    within such a set, clients with similar step counts share a group so that little work is masked."""
    by_shape: dict[tuple, list[_Client]] = {}
    for c in clients:
        by_shape.setdefault(tuple((n, tuple(t.shape)) for n, t in c.extras.items()), []).append(c)
    groups = []
    for members in by_shape.values():
        members = sorted(members, key=lambda c: -len(c.batches))
        groups += [members[i : i + size] for i in range(0, len(members), size)]
    return groups


def auto_group_size(module: ClientModule, num_clients: int, batch_size: int, device: torch.device | str,
                    extras_bytes: int = 0, fraction: float = MEMORY_FRACTION) -> int:
    """The largest group whose estimated activations fit in ``fraction`` of the free memory, in ``[1, num_clients]``.

    Per client, one text-tower forward + backward keeps about ``C x layers x L x (18 W + 2 heads L)`` floats
    (C class prompts of L tokens, width W; the second term is the attention probabilities; less with a shared
    prefix, see :func:`client_activation_bytes`), and the gate mixes the client's extras (expert features
    ``K x C x D``) once per image, about ``batch_size x extras_bytes``. Free memory is ``torch.cuda.mem_get_info``
    on a GPU and ``MemAvailable`` of ``/proc/meminfo`` on a CPU.
    """
    per_client = client_activation_bytes(module) + batch_size * (extras_bytes + image_activation_bytes(module))
    free = available_memory(torch.device(device))
    return max(1, min(num_clients, int(fraction * free) // max(per_client, 1)))


def client_activation_bytes(module: ClientModule) -> int:
    """Estimated bytes one client's text-tower forward + backward keeps alive (see :func:`auto_group_size`)."""
    model = module.backbone.model
    tower = model.transformer
    width = int(getattr(tower, "width", module.backbone.text_width))
    layers = int(getattr(tower, "layers", 12))
    blocks = getattr(tower, "resblocks", None)
    heads = int(getattr(blocks[0].attn, "num_heads", 8)) if blocks is not None else 8
    learner = getattr(module, "prompt_learner", None)
    classes = module.num_classes
    tokens = (1 + learner.n_ctx + int(learner.token_suffix.shape[1]) if learner is not None
              else module.backbone.context_length)
    shared = learner.shared_length if learner is not None else 0
    if shared:  # the shared prefix runs once: P + C*S token rows; each suffix keeps its copy of the prefix keys/values
        suffix = tokens - shared
        rows = shared + classes * suffix
        per_layer = (ACTIVATIONS_PER_TOKEN * width * rows + 2 * heads * (shared**2 + classes * suffix * tokens)
                     + 2 * classes * tokens * width)
    else:
        per_layer = classes * tokens * (ACTIVATIONS_PER_TOKEN * width + 2 * heads * tokens)
    return 4 * layers * per_layer


def image_activation_bytes(module: ClientModule) -> int:
    """Estimated bytes one image's pass through an image-side module's prompted blocks keeps alive for the backward
    pass (0 for other modules): ``passes x blocks x T x (18 W + 2 heads T)`` floats for T tokens of width W and
    :attr:`~fedlit.modules.base.ClientModule.image_passes` passes per image (FedMGP: one per prompt group); with
    :attr:`~fedlit.modules.base.ClientModule.checkpoint_activations` only each block's input ``T x W`` is kept."""
    if not module.image_side:
        return 0
    visual = module.backbone.model.visual
    blocks = len(visual.transformer.resblocks) - module.vision_start_layer
    width = int(visual.class_embedding.shape[-1])
    heads = int(getattr(visual.transformer.resblocks[0].attn, "num_heads", 8))
    tokens = int(visual.positional_embedding.shape[0]) + int(getattr(module, "vision_n_ctx", 0))
    per_block = tokens * width if module.checkpoint_activations else \
        tokens * (ACTIVATIONS_PER_TOKEN * width + 2 * heads * tokens)
    return 4 * blocks * per_block * module.image_passes


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: free GPU memory, or ``MemAvailable`` of the machine for a CPU (4 GiB if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def default_client_batch(requested: int, device: torch.device, fabric: Any = None) -> int:
    """G for a run: ``perf.client_batch`` as given, where 0 (auto) means one client at a time on a CPU (which keeps
    results bitwise independent of the process layout; groups gain 1.2-1.6x there, within 1e-6 of it) and as many
    as fit in memory on a GPU."""
    if requested == 0 and device.type == "cpu":
        return 1
    return requested
