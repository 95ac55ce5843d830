"""Lightning loggers of a run (``run.loggers``): Fabric's CSV and TensorBoard loggers, written under
``<run_dir>/logs/<kind>/version_<n>/`` (a resumed run gets the next version), and Weights & Biases when it is
installed (project ``fedlit``, its files under ``<run_dir>/logs/wandb/``).

Each run carries its resolved configuration, so that runs can be filtered and grouped: TensorBoard's hyperparameters
(the HParams tab: every config key, dotted, e.g. ``fed.rounds``, with ``algorithm`` the method that ran) and W&B's
``config`` (nested), with the W&B run named ``<run.name>-<algorithm>-seed<seed>``, grouped by
``<dataset>-<algorithm>`` (the seeds of one method on one dataset) and tagged with the algorithm, the dataset and
``seed-<seed>`` (:func:`wandb_identity`).

Per round they receive every number of the round's metrics row (nested ones such as ``domains`` as
``domains/<name>/mean``), pFedMoAP's expert attention as one scalar per expert slot (``expert_attention/slot_<i>``,
local expert first: the mean over the clients that have that slot) when ``eval.diagnostics=true``, and on
TensorBoard a histogram of the per-client accuracies (``client_accuracy``). ``metrics.csv`` and ``results.json``
are written as before, independently of these loggers. Only the standard library is imported at the top: the
configuration checks ``run.loggers`` with :func:`logger_kinds_problem`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

from fedlit.errors import UserError

LOGGER_KINDS = ("csv", "tensorboard", "wandb")
PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
INSTALL = {"tensorboard": "pip install tensorboard (or 'fedlit[tensorboard]')", "wandb": "pip install wandb"}


def missing_package(kind: str) -> str | None:
    """How to install what logger ``kind`` needs when it is not installed, else None."""
    needed = PACKAGES.get(kind, ())
    if needed and not any(importlib.util.find_spec(name) is not None for name in needed):
        return INSTALL[kind]
    return None


def logger_kinds_problem(kinds: Sequence[str]) -> str | None:
    """One line on what is wrong with ``run.loggers`` (an unknown or repeated kind, or one whose package is not
    installed), or None."""
    for kind in kinds:
        if kind not in LOGGER_KINDS:
            return f"unknown run.loggers entry {kind!r}; choose among {', '.join(LOGGER_KINDS)}"
        install = missing_package(kind)
        if install is not None:
            return f"run.loggers={kind} needs a package that is not installed: {install}"
    repeated = sorted({k for k in kinds if list(kinds).count(k) > 1})
    return f"run.loggers lists {', '.join(repeated)} more than once" if repeated else None


HPARAM_METRICS = ("acc_mean", "acc_global", "acc_worst10", "loss")  # the HParams tab's metric columns
WANDB_PROJECT = "fedlit"


def run_config(config: dict, algorithm: str) -> dict:
    """The resolved configuration ``config`` (nested, as ``dataclasses.asdict``) with ``algorithm`` the method that
    runs (not ``all``)."""
    return {**config, "algorithm": algorithm}


def flat_hparams(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """``config`` as TensorBoard hyperparameters: dotted keys; numbers, booleans and strings as they are, None as
    ``"null"``, lists as text."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{prefix}{key}."))
        elif value is None:
            out[f"{prefix}{key}"] = "null"
        elif isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def wandb_identity(config: dict, algorithm: str) -> dict:
    """W&B's ``project``, ``name``, ``group`` and ``tags`` of a run of ``algorithm`` with the resolved ``config``."""
    dataset, seed = config["data"]["name"], config["seed"]
    return {"project": WANDB_PROJECT, "name": f"{config['run']['name']}-{algorithm}-seed{seed}",
            "group": f"{dataset}-{algorithm}", "tags": [algorithm, dataset, f"seed-{seed}"]}


def log_tensorboard_hparams(logger, hparams: dict) -> None:
    """Write ``hparams`` to a TensorBoard logger's event file for the HParams tab, with :data:`HPARAM_METRICS` as
    its metric columns (read from the scalars the run logs; nothing is logged for them here)."""
    try:
        from torch.utils.tensorboard.summary import hparams as summaries
    except ImportError:  # tensorboardX instead of tensorboard
        from tensorboardX.summary import hparams as summaries  # type: ignore[no-redef]

    writer = logger.experiment._get_file_writer()  # as Lightning's own log_hyperparams does
    for summary in summaries(hparams, dict.fromkeys(HPARAM_METRICS, 0.0)):
        writer.add_summary(summary)


def build_loggers(kinds: Sequence[str], root: Path, config: dict, algorithm: str) -> list:
    """One Lightning logger per kind, writing under ``root/<kind>/`` (call on rank 0 only), each carrying the
    resolved ``config`` of the run of ``algorithm`` (see the module docstring)."""
    problem = logger_kinds_problem(kinds)
    if problem is not None:
        raise UserError(problem)
    full = run_config(config, algorithm)
    loggers = []
    for kind in kinds:
        if kind == "csv":
            from lightning.fabric.loggers import CSVLogger

            loggers.append(CSVLogger(root_dir=str(root), name="csv"))
        elif kind == "tensorboard":
            from lightning.fabric.loggers import TensorBoardLogger

            logger = TensorBoardLogger(root_dir=str(root), name="tensorboard", default_hp_metric=False)
            log_tensorboard_hparams(logger, flat_hparams(full))
            loggers.append(logger)
        else:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(save_dir=str(root), config=full, **wandb_identity(config, algorithm)))
    return loggers


def _numbers(values: dict, prefix: str = "") -> dict[str, float]:
    """The finite-or-not numbers of ``values`` (bools and None left out), nested dicts as ``prefix/key``."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def expert_slot_means(weights: Sequence[Sequence[float] | None]) -> dict[str, float]:
    """``expert_attention/slot_<i>``: the mean weight of expert slot ``i`` over the clients that have it (clients
    without test data or without experts, None, are left out)."""
    slots = max((len(w) for w in weights if w is not None), default=0)
    out = {}
    for i in range(slots):
        values = [w[i] for w in weights if w is not None and len(w) > i]
        out[f"expert_attention/slot_{i}"] = math.fsum(values) / len(values)
    return out


def round_scalars(row: dict, diagnostics: dict | None = None) -> dict[str, float]:
    """The scalars logged for one round: every number of the metrics row except the round itself, and each expert
    slot's mean attention when the round recorded pFedMoAP's diagnostics."""
    scalars = _numbers({k: v for k, v in row.items() if k != "round"})
    attention = (diagnostics or {}).get("expert_attention")
    if attention:
        scalars.update(expert_slot_means(attention))
    return scalars


def log_round(loggers: Sequence, step: int, scalars: dict[str, float],
              accuracies: Sequence[float | None] | None = None) -> None:
    """Send one round's scalars (at ``step`` = the round) to every logger, and the per-client accuracies as a
    histogram to the TensorBoard ones; then flush them, so that the files are complete after every round."""
    import numpy as np
    from lightning.fabric.loggers import TensorBoardLogger

    scored = [a for a in accuracies or [] if a is not None and math.isfinite(a)]
    for logger in loggers:
        if scalars:
            logger.log_metrics(scalars, step=step)
        if scored and isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram("client_accuracy", np.asarray(scored, dtype=np.float64), step)
        logger.save()
