"""Evaluation: each client's personalised model on its own test split (sharded over ranks) and the global model on
the whole test set. Test inputs are cached image features (or images), so evaluating a client is one text-tower
pass and a matrix product."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedlit.algorithms import Algorithm
from fedlit.data.features import POOLED
from fedlit.federation.sampling import FINETUNE_STREAM, assign_to_ranks
from fedlit.federation.store import ClientStore
from fedlit.federation.trainer import LocalTrainer
from fedlit.federation.transfer import TransferModel
from fedlit.state import ClientPlan, ClientState, ServerState

EVAL_CHUNK = 1024  # test samples per forward
ENTRY_CHUNK = 256  # stored clients whose entries an evaluation holds at once


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
    transfer: dict[str, float | None] | None = None  # transfer target -> the global model's accuracy (or None)

    def record(self, round_index: int, clients: list[int] | None = None) -> dict:
        """The per-client record of the round that ``results.json`` and checkpoints keep: N-long lists (None where
        a client has no number) when every client was evaluated (``clients`` None); otherwise
        ``evaluated_clients`` (ascending) and the lists of those clients only, so a round that evaluates a subset
        of 100,000 clients costs its subset."""
        lists = {"accuracy": self.accuracy, "novel": self.novel}
        if clients is None:
            out = {key: values for key, values in lists.items() if values is not None}
            diagnostics = self.diagnostics
        else:
            clients = sorted(set(clients))
            out = {"evaluated_clients": clients,
                   **{key: [values[c] for c in clients] for key, values in lists.items() if values is not None}}
            diagnostics = ({name: [values[c] for c in clients] for name, values in self.diagnostics.items()}
                           if self.diagnostics is not None else None)
        return {"round": round_index, **out, **({"diagnostics": diagnostics} if diagnostics is not None else {})}


def same_value(a: Any, b: Any) -> bool:
    """Whether two plan values are equal, tensors bitwise (same dtype, shape, device and elements), nested dicts,
    lists and tuples item by item, anything else by type and ``repr`` (so ``0.0`` and ``-0.0`` differ)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b or (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype
                          and a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, dict) or isinstance(b, dict):
        return (type(a) is type(b) and a.keys() == b.keys()
                and all(same_value(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and repr(a) == repr(b)


def same_model(a: ClientPlan, b: ClientPlan) -> bool:
    """Whether two plans put the same model into the module (:meth:`LocalTrainer.load` reads only the start
    parameters and the extras; optimiser state plays no part in evaluation)."""
    return a is b or (same_value(a.start.params, b.start.params) and same_value(a.extras, b.extras))


class EvalModel:
    """The trainer's module in eval mode, holding one plan at a time. Loading a plan equal in value to the one it
    holds (:func:`same_model`) does nothing, and the class text features ``(C, D)`` are computed once per loaded
    plan: clients that never trained usually share one plan (the global model), so N of them cost one load and
    one text-tower pass instead of N. Every number is bitwise what loading each client's plan would give. Any
    other load into the trainer (training, another EvalModel) makes the next :meth:`use` load again, and scoring
    before that raises, so two EvalModels on one trainer never score with each other's plan."""

    def __init__(self, trainer: LocalTrainer):
        self.trainer = trainer
        self.plan: ClientPlan | None = None
        self._text: dict[tuple[int, ...] | None, Tensor] = {}
        self._novel: tuple[int, int] | None = None

    def use(self, plan: ClientPlan) -> None:
        """Hold ``plan`` (loaded and switched to eval mode unless it is the held model already)."""
        if self.trainer.eval_holder is self and same_model(self.plan, plan):
            return
        self.trainer.load(plan)
        self.trainer.module.eval()
        self.plan, self._text, self._novel = plan, {}, None
        self.trainer.eval_holder = self

    def _check_held(self) -> None:
        if self.trainer.eval_holder is not self:
            raise RuntimeError("the trainer's module no longer holds this EvalModel's plan; call use(plan) first")

    @torch.no_grad()
    def text(self, classes: list[int] | None = None) -> Tensor:
        """Class text features ``(C, D)`` of the held plan for a prediction among ``classes`` (None: all; computed
        on first use, see :meth:`~fedlit.modules.base.ClientModule.candidate_text_features`)."""
        self._check_held()
        module = self.trainer.module
        key = tuple(classes) if classes is not None and module.text_depends_on_candidates else None
        if key not in self._text:
            with self.trainer.autocast():
                self._text[key] = module.candidate_text_features(None if key is None else classes)
        return self._text[key]

    @torch.no_grad()
    def counts(self, inputs: Tensor, labels: Tensor, classes: list[int] | None = None) -> tuple[int, int]:
        """(correct, total) of the held plan on ``inputs`` (features ``(N, D)`` or images) and ``labels (N,)``, in
        chunks of :data:`EVAL_CHUNK`; with ``classes`` the prediction is the best of those classes only (the other
        class names are not candidates)."""
        trainer, module = self.trainer, self.trainer.module
        text = self.text(classes)
        correct = 0
        candidates = torch.as_tensor(classes, device=trainer.device) if classes is not None else None
        with trainer.autocast():
            for start in range(0, len(inputs), EVAL_CHUNK):
                x = module.image_features(inputs[start : start + EVAL_CHUNK].to(trainer.device))
                y = labels[start : start + EVAL_CHUNK].to(trainer.device)
                logits = module.logits_from(x, text)
                predicted = (logits.argmax(dim=-1) if candidates is None
                             else candidates[logits[:, candidates].argmax(-1)])
                correct += int((predicted == y).sum())
        return correct, len(inputs)

    def novel_counts(self, inputs: Tensor, labels: Tensor, classes: list[int]) -> tuple[int, int]:
        """:meth:`counts` on the novel test samples, which every client is evaluated on: once per held plan."""
        if self._novel is None:
            self._novel = self.counts(inputs, labels, classes)
        return self._novel

    @torch.no_grad()
    def diagnostics(self, inputs: Tensor) -> dict[str, list[float]]:
        """The module's :meth:`~fedlit.modules.base.ClientModule.diagnostics` of the held plan, averaged over
        ``inputs`` (features or images): ``{name: [floats]}``."""
        self._check_held()
        trainer, module = self.trainer, self.trainer.module
        sums: dict[str, Tensor] = {}
        with trainer.autocast():
            for start in range(0, len(inputs), EVAL_CHUNK):
                x = module.image_features(inputs[start : start + EVAL_CHUNK].to(trainer.device))
                for name, value in module.diagnostics(x).items():
                    sums[name] = sums.get(name, 0) + value.float().sum(dim=0).cpu()
        return {name: (total / len(inputs)).reshape(-1).tolist() for name, total in sums.items()}


def accuracy_counts(trainer: LocalTrainer, plan: ClientPlan, inputs: Tensor, labels: Tensor,
                    classes: list[int] | None = None) -> tuple[int, int]:
    """(correct, total) of the model ``plan`` describes on ``inputs`` (features ``(N, D)`` or images) and
    ``labels (N,)`` (see :meth:`EvalModel.counts`)."""
    model = EvalModel(trainer)
    model.use(plan)
    return model.counts(inputs, labels, classes)


def client_plans(trainer: LocalTrainer, algorithm: Algorithm, server: ServerState, store: ClientStore,
                 initial: ClientState, clients: list[int], round_index: int) -> Iterator[tuple[int, ClientPlan]]:
    """``(client, eval plan)`` of each of ``clients``: those without a store entry first (they usually share one
    plan, so :class:`EvalModel` loads it once), then those with one, whose entries are read :data:`ENTRY_CHUNK` at
    a time (a disk store reads each shard of a chunk once). Plans are made one at a time, none held for the
    others, unless the method fine-tunes before evaluation: then every plan is made and tuned first, in the order
    of ``clients`` (seeded by (seed, round, client): the same tuned model on any rank)."""
    stored = set(store.ids())
    fresh = [c for c in clients if c not in stored]
    kept = [c for c in clients if c in stored]
    if algorithm.finetune_epochs() > 0:
        entries = store.get_many(kept)
        plans = {cid: algorithm.eval_plan(server, cid, entries.get(cid), initial) for cid in clients}
        tuned = trainer.train(plans, round_index, epochs=algorithm.finetune_epochs(), stream=FINETUNE_STREAM)
        for cid in fresh + kept:
            yield cid, ClientPlan(start=tuned[cid].state, extras=plans[cid].extras)
        return
    for cid in fresh:
        yield cid, algorithm.eval_plan(server, cid, None, initial)
    for start in range(0, len(kept), ENTRY_CHUNK):
        chunk = kept[start : start + ENTRY_CHUNK]
        entries = store.get_many(chunk)
        for cid in chunk:
            yield cid, algorithm.eval_plan(server, cid, entries[cid], initial)


def evaluate(trainer: LocalTrainer, algorithm: Algorithm, server: ServerState, store: ClientStore,
             initial: ClientState, fabric=None, split: tuple[list[int], list[int]] | None = None,
             round_index: int = 0, diagnostics: bool = False, excluded: frozenset[int] = frozenset(),
             clients: list[int] | None = None, transfer: Sequence[TransferModel] = ()) -> Evaluation:
    """Every client's personalised model on its own test split and the global model on the whole test set;
    clients are sharded over ranks and the counts summed with one all-reduce. ``split`` = (base, novel) classes
    for the base-to-novel protocol: own split over the base classes, plus every novel test sample over the
    novel classes. Clients in ``excluded`` (Byzantine ones), and those outside ``clients`` when it is given, are
    not evaluated: their accuracy is None (only their store entries are read). ``transfer``: the global model on
    each transfer target's test set with the target's class names (every rank evaluates every target, as the
    global model on the whole test set)."""
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
    recorded: dict[int, dict[str, list[float]]] = {}
    model = EvalModel(trainer)
    for cid, plan in client_plans(trainer, algorithm, server, store, initial, mine, round_index):
        if sizes[cid] or novel_index is not None:
            model.use(plan)
        if sizes[cid]:
            index = torch.as_tensor(part.test_indices[cid], dtype=torch.long)
            inputs = data.test_inputs(index)
            if diagnostics:
                recorded[cid] = model.diagnostics(inputs)
            counts[cid, :2] = torch.tensor(model.counts(inputs, data.test_labels[index], base), dtype=torch.float64)
        if novel_index is not None:
            novel_counts = model.novel_counts(data.test_inputs(novel_index), data.test_labels[novel_index], novel)
            counts[cid, 2:] = torch.tensor(novel_counts, dtype=torch.float64)
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
    if transfer:
        result.transfer = {m.target.name: transfer_accuracy(m, plan) for m in transfer}
    return result


def transfer_accuracy(model: TransferModel, plan: ClientPlan | None) -> float | None:
    """Accuracy of the global model ``plan`` on ``model``'s target (its own class names and test set); None when
    the method has no global model."""
    if plan is None or model.trainer is None:
        return None
    kind = getattr(model.trainer.module, "image_feature_kind", POOLED)
    return _ratio(accuracy_counts(model.trainer, plan, model.target.inputs(kind), model.target.labels))


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
