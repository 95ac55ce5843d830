"""Evaluation: each client's personalised model on its own test split (sharded over ranks) and the global model on
the whole test set. Test inputs are cached image features (or images), so evaluating a client is one text-tower
pass and a matrix product."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedlit.algorithms import Algorithm
from fedlit.federation.sampling import FINETUNE_STREAM, assign_to_ranks
from fedlit.federation.store import ClientStore
from fedlit.federation.trainer import LocalTrainer
from fedlit.state import ClientPlan, ClientState, ServerState

EVAL_CHUNK = 1024


@dataclass
class Evaluation:
    """One evaluated round: per-client accuracy on its own test split (None without test samples) and the global
    model's accuracy on the whole test set (None without a global model). Base-to-novel: ``accuracy`` is over
    the base classes, ``novel`` per client on every novel test sample (novel class names only)."""

    accuracy: list[float | None]
    global_accuracy: float | None
    novel: list[float | None] | None = None
    global_novel: float | None = None
    diagnostics: dict[str, list] | None = None  # name -> per client: the mean over its test images, or None


@torch.no_grad()
def client_diagnostics(trainer: LocalTrainer, plan: ClientPlan, inputs: Tensor) -> dict[str, list[float]]:
    """The module's :meth:`~fedlit.modules.base.ClientModule.diagnostics` of the model ``plan`` describes, averaged
    over ``inputs`` (features or images): ``{name: [floats]}``."""
    module = trainer.module
    trainer.load(plan)
    module.eval()
    sums: dict[str, Tensor] = {}
    with trainer.autocast():
        for start in range(0, len(inputs), EVAL_CHUNK):
            x = module.image_features(inputs[start : start + EVAL_CHUNK].to(trainer.device))
            for name, value in module.diagnostics(x).items():
                sums[name] = sums.get(name, 0) + value.float().sum(dim=0).cpu()
    return {name: (total / len(inputs)).reshape(-1).tolist() for name, total in sums.items()}


@torch.no_grad()
def accuracy_counts(trainer: LocalTrainer, plan: ClientPlan, inputs: Tensor, labels: Tensor,
                    classes: list[int] | None = None) -> tuple[int, int]:
    """(correct, total) of the model ``plan`` describes on ``inputs`` (features ``(N, D)`` or images) and
    ``labels (N,)``, in chunks of :data:`EVAL_CHUNK`; with ``classes`` the prediction is the best of those
    classes only (the other class names are not candidates)."""
    module = trainer.module
    trainer.load(plan)
    module.eval()
    correct = 0
    candidates = torch.as_tensor(classes, device=trainer.device) if classes is not None else None
    with trainer.autocast():
        text = module.class_text_features()
        for start in range(0, len(inputs), EVAL_CHUNK):
            x = module.image_features(inputs[start : start + EVAL_CHUNK].to(trainer.device))
            y = labels[start : start + EVAL_CHUNK].to(trainer.device)
            logits = module.logits_from(x, text)
            predicted = logits.argmax(dim=-1) if candidates is None else candidates[logits[:, candidates].argmax(-1)]
            correct += int((predicted == y).sum())
    return correct, len(inputs)


def evaluate(trainer: LocalTrainer, algorithm: Algorithm, server: ServerState, store: ClientStore,
             initial: ClientState, fabric=None, split: tuple[list[int], list[int]] | None = None,
             round_index: int = 0, diagnostics: bool = False, excluded: frozenset[int] = frozenset(),
             clients: list[int] | None = None) -> Evaluation:
    """Every client's personalised model on its own test split and the global model on the whole test set;
    clients are sharded over ranks and the counts summed with one all-reduce. ``split`` = (base, novel) classes
    for the base-to-novel protocol: own split over the base classes, plus every novel test sample over the
    novel classes. Clients in ``excluded`` (Byzantine ones), and those outside ``clients`` when it is given, are
    not evaluated: their accuracy is None (only their store entries are read)."""
    data = trainer.data
    part = data.partition
    num_clients = part.num_clients
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    base, novel = split if split is not None else (None, None)
    novel_index = (torch.nonzero(torch.isin(data.test_labels, torch.as_tensor(novel)), as_tuple=True)[0]
                   if novel is not None else None)
    sizes = {c: len(part.test_indices[c]) for c in range(num_clients)}
    candidates = range(num_clients) if clients is None else sorted(set(clients))
    mine = assign_to_ranks([c for c in candidates if c not in excluded], sizes, world)[rank]
    counts = torch.zeros(num_clients, 4, dtype=torch.float64)  # own correct, own total, novel correct, total
    entries = store.get_many(mine)  # a disk store reads each shard once
    plans = {cid: algorithm.eval_plan(server, cid, entries[cid], initial) for cid in mine}
    epochs = algorithm.finetune_epochs()
    if epochs > 0:  # seeded by (seed, round, client): the same tuned model on any rank, in any order
        tuned = trainer.train(plans, round_index, epochs=epochs, stream=FINETUNE_STREAM)
        plans = {cid: ClientPlan(start=tuned[cid].state, extras=plans[cid].extras) for cid in plans}
    recorded: dict[int, dict[str, list[float]]] = {}
    for cid in mine:
        plan = plans[cid]
        if diagnostics and sizes[cid]:
            index = torch.as_tensor(part.test_indices[cid], dtype=torch.long)
            recorded[cid] = client_diagnostics(trainer, plan, data.test_inputs(index))
        if sizes[cid]:
            index = torch.as_tensor(part.test_indices[cid], dtype=torch.long)
            counts[cid, :2] = torch.tensor(accuracy_counts(trainer, plan, data.test_inputs(index),
                                                           data.test_labels[index], base), dtype=torch.float64)
        if novel_index is not None:
            counts[cid, 2:] = torch.tensor(accuracy_counts(trainer, plan, data.test_inputs(novel_index),
                                                           data.test_labels[novel_index], novel), dtype=torch.float64)
    if world > 1:
        counts = fabric.all_reduce(counts.to(fabric.device), reduce_op="sum").cpu()
    result = Evaluation(accuracy=_ratios(counts[:, :2]), global_accuracy=None,
                        novel=_ratios(counts[:, 2:]) if novel_index is not None else None)
    if diagnostics:
        result.diagnostics = _per_client(_gather_objects(recorded, world), num_clients)
    plan = algorithm.global_plan(server, initial)
    if plan is not None:
        if novel_index is None:
            result.global_accuracy = _ratio(accuracy_counts(trainer, plan, data.test_inputs(), data.test_labels))
        else:
            base_index = torch.nonzero(torch.isin(data.test_labels, torch.as_tensor(base)), as_tuple=True)[0]
            result.global_accuracy = _ratio(accuracy_counts(trainer, plan, data.test_inputs(base_index),
                                                            data.test_labels[base_index], base))
            result.global_novel = _ratio(accuracy_counts(trainer, plan, data.test_inputs(novel_index),
                                                         data.test_labels[novel_index], novel))
    return result


def _ratios(counts: Tensor) -> list[float | None]:
    """``correct / total`` per row of ``(N, 2)`` counts; None where the total is 0."""
    return [float(c / n) if n > 0 else None for c, n in counts.tolist()]


def _ratio(counts: tuple[int, int]) -> float:
    return counts[0] / max(counts[1], 1)


def _gather_objects(local: dict, world: int) -> dict:
    """The union of every rank's dict (one ``all_gather_object``; the dicts are small)."""
    if world == 1:
        return local
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, local)
    return {k: v for part in gathered for k, v in part.items()}


def _per_client(recorded: dict[int, dict[str, list[float]]], num_clients: int) -> dict[str, list]:
    """``{client: {name: values}}`` as ``{name: [values or None per client]}``."""
    names = sorted({name for entry in recorded.values() for name in entry})
    return {name: [recorded.get(c, {}).get(name) for c in range(num_clients)] for name in names}
