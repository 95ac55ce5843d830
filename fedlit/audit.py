"""``fedlit audit RUN_DIR``: a membership-inference audit of a trained run, next to the accountant's epsilon.

The run is rebuilt as ``fedlit export`` rebuilds it (:func:`fedlit.export.load_run`). Three membership games:

- **samples, personalised model**: each honest client that trained, its model as the run's last evaluation built
  it (:func:`~fedlit.federation.evaluation.client_plans`); members are its train samples, non-members samples of
  the same classes that no client trained on (:func:`balanced`: a class's train images that no client holds when
  there are enough, else its test images), as many as members per class (seeded);
- **samples, global model**: members are the train samples of every honest client that trained, non-members drawn
  the same way;
- **clients, global model**: members are the honest clients that trained, non-members those that never did
  (``eval.protocol=heldout``, or never sampled); a client's score is how much lower the global model's mean loss on
  its train samples is than the initial model's.

Each sample game is scored by the loss-threshold attack (score ``-loss``) and a shadow-free likelihood-ratio test
on the logit-scaled confidence (:func:`fedlit.membership.cross_fitted_lrt`); each attack gets its AUC and an
empirical epsilon lower bound (:func:`fedlit.membership.empirical_epsilon`). The sample games compare to the
epsilon of neighbouring federations that differ in one client's data (:func:`fedlit.privacy.replace_one_epsilon`),
the client game to the accountant's epsilon the run recorded. ``audit.json`` in the method's folder holds it all.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedlit import privacy
from fedlit.errors import UserError
from fedlit.federation.checkpoint import CHECKPOINT_NAME, RunState
from fedlit.federation.client_data import ClientData
from fedlit.federation.evaluation import EVAL_CHUNK, EvalModel, client_plans, same_model
from fedlit.federation.orchestrator import Orchestrator
from fedlit.io import atomic_write
from fedlit.membership import auc, cross_fitted_lrt, empirical_epsilon
from fedlit.progress import echo
from fedlit.state import ClientPlan

AUDIT_NAME = "audit.json"
BALANCE_STREAM = 31_337_041  # which members / non-members a class keeps when its two sides are balanced


@torch.no_grad()
def sample_scores(model: EvalModel, inputs: Tensor, labels: Tensor,
                  classes: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(loss (n,), phi (n,))`` float64 of the held plan on ``inputs`` (features or images) and ``labels (n,)``:
    the cross-entropy ``logsumexp(z) - z_y`` and the logit-scaled confidence ``phi = log(p_y / (1 - p_y)) = z_y -
    logsumexp_{j != y} z_j`` of the logits ``z`` (over ``classes`` only when given, as training saw them), in
    chunks of :data:`EVAL_CHUNK`."""
    trainer, module = model.trainer, model.trainer.module
    text = model.text(classes)
    losses, phis = [], []
    with trainer.autocast():
        for start in range(0, len(inputs), EVAL_CHUNK):
            x = module.image_features(inputs[start : start + EVAL_CHUNK].to(trainer.device))
            y = labels[start : start + EVAL_CHUNK].to(trainer.device)
            z = module.logits_from(x, text).double()
            if classes is not None:
                allowed = torch.zeros(z.shape[-1], dtype=torch.bool, device=z.device)
                allowed[classes] = True
                z = z.masked_fill(~allowed, -math.inf)
            true = z.gather(1, y[:, None])[:, 0]
            losses.append(torch.logsumexp(z, -1) - true)
            phis.append(true - torch.logsumexp(z.scatter(1, y[:, None], -math.inf), -1))
    return torch.cat(losses).cpu().numpy(), torch.cat(phis).cpu().numpy()


def train_inputs(data: ClientData, index: Tensor) -> Tensor:
    """The train samples ``index`` as a query to the model would present them: the cached train features when the
    train transform is deterministic, else the images through the deterministic test transform."""
    features = data.train_patches if data.feature_kind == "patches" else data.train_features
    if features is not None and not data.bundle.augmented:
        return features[index]
    plain = copy.copy(data.bundle.train)
    plain.transform = data.bundle.test.transform
    return torch.stack([plain[i][0] for i in index.tolist()])


def balanced(members: np.ndarray, unused: np.ndarray, train_labels: np.ndarray, test_labels: np.ndarray,
             seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(members, train non-members, test non-members)`` index arrays (sorted) with as many of each side per class:
    for each class of the train indices ``members``, its non-members are its train samples in ``unused`` (held by
    no client that trained) when there are at least as many as its members, else its test samples; ``min`` of the
    two counts is drawn from each side (a generator seeded by ``seed``). ``train_labels`` / ``test_labels``: the
    labels of the whole splits."""
    rng = np.random.default_rng([seed, BALANCE_STREAM])
    keep: list[list[np.ndarray]] = [[], [], []]
    test = np.arange(len(test_labels))
    for c in np.unique(train_labels[members]):
        inside = members[train_labels[members] == c]
        outside = unused[train_labels[unused] == c]
        side = 1 if len(outside) >= len(inside) else 2
        if side == 2:
            outside = test[test_labels == c]
        n = min(len(inside), len(outside))
        keep[0].append(np.sort(rng.permutation(inside)[:n]))
        keep[side].append(np.sort(rng.permutation(outside)[:n]))
    return tuple(np.concatenate(k) if k else np.zeros(0, dtype=np.int64) for k in keep)  # type: ignore[return-value]


@dataclass
class Game:
    """One membership game's per-item attack inputs: ``loss`` and ``phi`` ``(n,)``, ``classes (n,)`` (what the
    likelihood-ratio test calibrates per class) and ``members (n,)`` bool."""

    loss: np.ndarray
    phi: np.ndarray
    classes: np.ndarray
    members: np.ndarray
    test_nonmembers: int = 0  # how many non-members come from the test split (the others: unused train samples)

    @classmethod
    def empty(cls) -> Game:
        return cls(*(np.zeros(0) for _ in range(3)), np.zeros(0, dtype=bool))

    def extend(self, loss: np.ndarray, phi: np.ndarray, classes: np.ndarray, members: np.ndarray) -> None:
        """Append items."""
        self.loss, self.phi = np.r_[self.loss, loss], np.r_[self.phi, phi]
        self.classes, self.members = np.r_[self.classes, classes], np.r_[self.members, members]


def _score_split(model: EvalModel, data: ClientData, members: np.ndarray, train_nonmembers: np.ndarray,
                 test_nonmembers: np.ndarray, classes: list[int] | None, game: Game) -> None:
    """Score ``members`` and ``train_nonmembers`` (train indices) and ``test_nonmembers`` (test indices) with the
    held plan into ``game``."""
    for index, is_member, split in ((members, True, "train"), (train_nonmembers, False, "train"),
                                    (test_nonmembers, False, "test")):
        if len(index) == 0:
            continue
        index_t = torch.as_tensor(index, dtype=torch.long)
        if split == "train":
            labels, inputs = data.train_labels[index_t], train_inputs(data, index_t)
        else:
            labels, inputs = data.test_labels[index_t], data.test_inputs(index_t)
        loss, phi = sample_scores(model, inputs, labels, classes)
        game.extend(loss, phi, labels.numpy(), np.full(len(index), is_member))
    game.test_nonmembers += len(test_nonmembers)


def honest_trained(orchestrator: Orchestrator, state: RunState) -> tuple[list[int], list[int]]:
    """(honest clients that trained, honest clients that never trained), ascending: a client trained when the
    store holds its entry; Byzantine clients are in neither."""
    attacked = set(orchestrator.attacked)
    trained = set(state.store.ids())
    honest = [c for c in range(orchestrator.num_clients) if c not in attacked]
    return [c for c in honest if c in trained], [c for c in honest if c not in trained]


def unused_train(orchestrator: Orchestrator, state: RunState) -> np.ndarray:
    """The train indices that no client that trained holds (Byzantine clients included), ascending: the partition
    chose at random which of a class's train images the clients hold, so these are exchangeable with the members
    and are the sample games' first choice of non-members."""
    part = orchestrator.data.partition
    held = [part.train_indices[c] for c in state.store.ids()]
    taken = np.unique(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(orchestrator.data.train_labels)), taken)


def personalised_game(orchestrator: Orchestrator, state: RunState, seed: int,
                      global_plan: ClientPlan | None = None) -> tuple[Game, bool]:
    """Each honest trained client's own model on its train samples (members) and non-members of the same classes
    (:func:`balanced`), the clients' items pooled; and whether every one of those models is ``global_plan``
    (PromptFL evaluates every client with the global prompt)."""
    data, part, trainer = orchestrator.data, orchestrator.data.partition, orchestrator.trainer
    train_labels, test_labels = data.train_labels.numpy(), data.test_labels.numpy()
    unused = unused_train(orchestrator, state)
    clients, _ = honest_trained(orchestrator, state)
    model, game = EvalModel(trainer), Game.empty()
    everyone_global = global_plan is not None
    plans = client_plans(trainer, orchestrator.algorithm, state.server, state.store, orchestrator.initial, clients,
                         state.server.round)
    for cid, plan in plans:
        everyone_global = everyone_global and same_model(plan, global_plan)
        drawn = balanced(part.train_indices[cid], unused, train_labels, test_labels, seed + cid)
        model.use(plan)
        _score_split(model, data, *drawn, trainer.trained_classes, game)
    return game, everyone_global


def global_game(orchestrator: Orchestrator, state: RunState, plan: ClientPlan, seed: int) -> Game:
    """The global model on the train samples of every honest trained client (members) and non-members of their
    classes (:func:`balanced`)."""
    data, part = orchestrator.data, orchestrator.data.partition
    clients, _ = honest_trained(orchestrator, state)
    game = Game.empty()
    if not clients:
        return game
    own = np.unique(np.concatenate([part.train_indices[c] for c in clients]))
    drawn = balanced(own, unused_train(orchestrator, state), data.train_labels.numpy(), data.test_labels.numpy(),
                     seed)
    model = EvalModel(orchestrator.trainer)
    model.use(plan)
    _score_split(model, data, *drawn, orchestrator.trainer.trained_classes, game)
    return game


def client_game(orchestrator: Orchestrator, state: RunState, plan: ClientPlan) -> tuple[np.ndarray, np.ndarray]:
    """``(scores (n,), members (n,))`` over the honest clients: a client's score is the initial model's mean loss
    on its train samples minus the global model's; members are the clients that trained."""
    data, part = orchestrator.data, orchestrator.data.partition
    trained, never = honest_trained(orchestrator, state)
    classes = orchestrator.trainer.trained_classes
    queries = []
    for cid in trained + never:
        index = torch.as_tensor(part.train_indices[cid], dtype=torch.long)
        queries.append((train_inputs(data, index), data.train_labels[index]))
    model, mean_losses = EvalModel(orchestrator.trainer), []
    for held in (ClientPlan(start=orchestrator.initial), plan):  # the trainer holds one model: each in turn
        model.use(held)
        mean_losses.append(np.array([sample_scores(model, x, y, classes)[0].mean() for x, y in queries]))
    return mean_losses[0] - mean_losses[1], np.r_[np.ones(len(trained), bool), np.zeros(len(never), bool)]


def attack_row(attack: str, level: str, model: str, scores: np.ndarray, members: np.ndarray, delta: float,
               confidence: float, seed: int, compare_to: float | None) -> dict:
    """One attack's record: its AUC, the empirical epsilon lower bound (see
    :func:`fedlit.membership.empirical_epsilon`) and the accountant epsilon it is compared to."""
    row = {"attack": attack, "level": level, "model": model, "members": int(members.sum()),
           "nonmembers": int((~members).sum()), "accountant_epsilon": compare_to}
    if row["members"] == 0 or row["nonmembers"] == 0:
        return {**row, "auc": None, "epsilon_lower_bound": None}
    bound = empirical_epsilon(scores, members, delta, confidence, seed)
    return {**row, "auc": auc(scores, members), "epsilon_lower_bound": bound.to_dict()["epsilon"],
            "bound": bound.to_dict()}


def audit(orchestrator: Orchestrator, state: RunState, confidence: float = 0.95, seed: int = 0) -> dict:
    """The audit of one restored run (see the module docstring): ``{"algorithm", "round", "delta", "confidence",
    "seed", "accountant": {...}, "attacks": [rows of attack_row]}``. The sample games of the personalised models are
    compared to an accountant epsilon only when those models are the global one (else DP does not cover them)."""
    cfg, algorithm = orchestrator.cfg, orchestrator.algorithm
    delta = float(cfg.privacy.delta)
    rounds = state.server.round
    recorded = state.history[-1] if state.history else {}
    epsilon = recorded.get("epsilon")
    replace = None if algorithm.synchronous else privacy.replace_one_epsilon(cfg, rounds)
    accountant = {"epsilon": epsilon, "noise_multiplier": recorded.get("noise_multiplier"),
                  "epsilon_replace_one": replace, "delta": delta}
    rows: list[dict] = []

    def sample_rows(model: str, game: Game, compare_to: float | None) -> None:
        lrt = cross_fitted_lrt(game.phi, game.classes, game.members, seed) if len(game.members) else np.zeros(0)
        for attack, scores in (("loss", -game.loss), ("lrt", lrt)):
            row = attack_row(attack, "sample", model, scores, game.members, delta, confidence, seed, compare_to)
            rows.append({**row, "nonmembers_from_test": game.test_nonmembers})

    plan = algorithm.global_plan(state.server, orchestrator.initial)
    game, covered = personalised_game(orchestrator, state, seed, plan)
    sample_rows("personalised", game, replace if covered else None)
    if plan is not None:
        sample_rows("global", global_game(orchestrator, state, plan, seed), replace)
        scores, members = client_game(orchestrator, state, plan)
        rows.append(attack_row("loss", "client", "global", scores, members, delta, confidence, seed, epsilon))
    return {"algorithm": algorithm.name, "round": rounds, "delta": delta, "confidence": confidence, "seed": seed,
            "accountant": accountant, "attacks": rows}


def method_folders(run_dir: str | Path) -> list[Path]:
    """The folders of the runs in ``run_dir``: itself when it holds a checkpoint, else each method's sub-folder of
    an ``algorithm=all`` run; a one-line UserError when it is neither."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; pass a fedlit run directory (the folder of checkpoint.pt)")
    if (run_dir / CHECKPOINT_NAME).is_file():
        return [run_dir]
    folders = sorted(p.parent for p in run_dir.glob(f"*/{CHECKPOINT_NAME}"))
    if not folders:
        raise UserError(f"{run_dir} is not a fedlit run directory (no {CHECKPOINT_NAME}); a run writes it after "
                        "its first round")
    return folders


def _number(value: float | str | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return value if isinstance(value, str) else f"{value:.{digits}f}"


NAMES = {("loss", "sample"): "loss threshold (samples)", ("lrt", "sample"): "likelihood ratio (samples)",
         ("loss", "client"): "loss improvement (clients)"}


def report_lines(result: dict) -> list[str]:
    """The console table of one audit: a header line, then one line per attack."""
    acc = result["accountant"]
    dp = (f"accountant ε {_number(acc['epsilon'], 2)} (client-level), {_number(acc['epsilon_replace_one'], 2)} for "
          f"one client's data replaced, δ = {result['delta']:g}" if acc["epsilon"] is not None
          else "no DP (privacy.* off)")
    lines = [f"fedlit audit | {result['algorithm']} after round {result['round']} | {dp} | "
             f"ε lower bounds at {100 * result['confidence']:g}% confidence",
             f"{'attack':<28} {'model':<13} {'members':>8} {'non-members':>12} {'AUC':>6} {'ε lower bound':>14} "
             f"{'accountant ε':>13}"]
    for row in result["attacks"]:
        lines.append(f"{NAMES[row['attack'], row['level']]:<28} {row['model']:<13} {row['members']:>8} "
                     f"{row['nonmembers']:>12} {_number(row['auc']):>6} {_number(row['epsilon_lower_bound'], 2):>14} "
                     f"{_number(row['accountant_epsilon'], 2):>13}")
    return lines


def audit_run(run_dir: str | Path, confidence: float = 0.95, seed: int = 0) -> dict:
    """Audit the run of one method's folder (see :func:`audit`) and write ``audit.json`` there (atomically)."""
    from fedlit.export import load_run

    orchestrator, state = load_run(run_dir)
    result = audit(orchestrator, state, confidence, seed)
    atomic_write(orchestrator.run_dir / AUDIT_NAME, json.dumps(result, indent=2) + "\n")
    return result


def run(args: argparse.Namespace) -> int:
    """``fedlit audit``: audit every method's run in ``args.run_dir``, print each table, write each audit.json."""
    if not 0.0 < args.confidence < 1.0:
        raise UserError(f"--confidence must be in (0, 1) (got {args.confidence})")
    for folder in method_folders(args.run_dir):
        result = audit_run(folder, args.confidence, args.seed)
        for line in report_lines(result):
            echo(line)
        echo(f"fedlit | wrote {folder / AUDIT_NAME}")
    return 0
