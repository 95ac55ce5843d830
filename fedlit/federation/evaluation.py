"""Evaluation: each client's personalised model on its own test split (sharded over ranks) and the global model on
the whole test set. Test inputs are cached image features (or images), so evaluating a client is one text-tower
pass and a matrix product."""

from __future__ import annotations

import torch
from torch import Tensor

from fedlit.algorithms import Algorithm
from fedlit.federation.sampling import assign_to_ranks
from fedlit.federation.trainer import LocalTrainer
from fedlit.state import ClientPlan, ClientState, ServerState, StoreEntry

EVAL_CHUNK = 1024


@torch.no_grad()
def accuracy_counts(trainer: LocalTrainer, plan: ClientPlan, inputs: Tensor, labels: Tensor) -> tuple[int, int]:
    """(correct, total) of the model ``plan`` describes on ``inputs`` (features ``(N, D)`` or images) and
    ``labels (N,)``, in chunks of :data:`EVAL_CHUNK`."""
    module = trainer.module
    trainer.load(plan)
    module.eval()
    correct = 0
    with trainer.autocast():
        text = module.class_text_features()
        for start in range(0, len(inputs), EVAL_CHUNK):
            x = module.image_features(inputs[start : start + EVAL_CHUNK].to(trainer.device))
            y = labels[start : start + EVAL_CHUNK].to(trainer.device)
            correct += int((module.logits_from(x, text).argmax(dim=-1) == y).sum())
    return correct, len(inputs)


def evaluate(trainer: LocalTrainer, algorithm: Algorithm, server: ServerState, store: dict[int, StoreEntry],
             initial: ClientState, fabric=None) -> tuple[list[float | None], float | None]:
    """Per-client personalised accuracy on their test splits (None for a client without test samples) and the
    global model's accuracy on the whole test set (None when the method has no global model). Clients are
    sharded over ranks and the counts summed with one all-reduce."""
    data = trainer.data
    part = data.partition
    num_clients = part.num_clients
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    sizes = {c: len(part.test_indices[c]) for c in range(num_clients)}
    mine = assign_to_ranks(list(range(num_clients)), sizes, world)[rank]
    counts = torch.zeros(num_clients, 2, dtype=torch.float64)
    for cid in mine:
        if sizes[cid] == 0:
            continue
        index = torch.as_tensor(part.test_indices[cid], dtype=torch.long)
        plan = algorithm.eval_plan(server, cid, store.get(cid), initial)
        counts[cid] = torch.tensor(accuracy_counts(trainer, plan, data.test_inputs(index), data.test_labels[index]),
                                   dtype=torch.float64)
    if world > 1:
        counts = fabric.all_reduce(counts.to(fabric.device), reduce_op="sum").cpu()
    accuracies = [float(c / n) if n > 0 else None for c, n in counts.tolist()]
    plan = algorithm.global_plan(server, initial)
    global_acc = None
    if plan is not None:
        correct, total = accuracy_counts(trainer, plan, data.test_inputs(), data.test_labels)
        global_acc = correct / max(total, 1)
    return accuracies, global_acc
