"""Back to Lightning: one client's personalised model of a fedlit run as a Lightning checkpoint of its client module
(``fedlit export RUN_DIR --client i [--out FILE]``, or :func:`export_client`).

The run's configuration and checkpoint rebuild the job (backbone, dataset, partition) and the client's model exactly
as the run's last evaluation built it: the method's ``eval_plan`` of the client's store entry (pFedMoAP: its prompt,
private gate and the expert prompts it downloaded; a client that never trained gets the global model; PromptFL+FT
fine-tunes as its evaluation does). That model goes into the method's client module, whose Lightning checkpoint
holds its tensors, its hyper-parameters (backbone name and weights tag, prompt, gate, learning rates) and the plan's
extras (re-applied by :meth:`~fedlit.modules.base.ClientModule.on_load_checkpoint`), never the frozen backbone::

    client = PFedMoAPClient.load_from_checkpoint("client-3.ckpt", weights_only=True)  # backbone loaded by name
    client = PFedMoAPClient.load_from_checkpoint("client-3.ckpt", backbone=backbone, weights_only=True)

Every method can be exported: each client module is a LightningModule. The export checks itself: the restored
module's accuracy on the client's test split is computed and compared with what the run recorded for that client.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import lightning
import torch

from fedlit.algorithms import Algorithm
from fedlit.config import load_config
from fedlit.errors import UserError
from fedlit.federation.checkpoint import CHECKPOINT_NAME, RunState, load_checkpoint, restore
from fedlit.federation.evaluation import EVAL_CHUNK, client_plans
from fedlit.federation.experiment import build_job
from fedlit.federation.orchestrator import Orchestrator
from fedlit.io import atomic_write
from fedlit.modules import ClientModule
from fedlit.modules.base import PLAN_EXTRAS_KEY
from fedlit.progress import echo


@dataclass
class Exported:
    """What :func:`export_client` wrote: the checkpoint ``path``, the module class, the client's accuracy on its own
    test split from the restored checkpoint and as the run recorded it (None: no test data, or not evaluated in the
    last evaluated round) and that round."""

    path: Path
    module_class: type[ClientModule]
    accuracy: float | None
    recorded: float | None
    round: int


def method_dir(run_dir: str | Path) -> tuple[Path, Path]:
    """(the folder of one method's run that holds ``checkpoint.pt``, its ``config.yaml``): ``run_dir`` itself, or for
    an ``algorithm=all`` run a method's sub-folder (then ``config.yaml`` is one level up). UserError otherwise."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT_NAME).is_file():
        names = sorted(p.parent.name for p in run_dir.glob(f"*/{CHECKPOINT_NAME}")) if run_dir.is_dir() else []
        if names:
            raise UserError(f"{run_dir} holds the runs of {len(names)} methods; export one of them: "
                            f"{run_dir / '<method>'} with <method> one of {', '.join(names)}")
        raise UserError(f"{run_dir} is not a fedlit run directory (no {CHECKPOINT_NAME})")
    for config in (run_dir / "config.yaml", run_dir.parent / "config.yaml"):
        if config.is_file():
            return run_dir, config
    raise UserError(f"no config.yaml in {run_dir} or {run_dir.parent}: the run's configuration is needed to export")


def load_run(run_dir: str | Path) -> tuple[Orchestrator, RunState]:
    """The orchestrator of the rebuilt job of one method's run in ``run_dir`` (backbone, data, partition and split
    as the run built them; see :func:`method_dir`) and the run state its checkpoint restores."""
    folder, config = method_dir(run_dir)
    cfg = load_config(config, ["run.quiet=true"])
    method = str(load_checkpoint(folder / CHECKPOINT_NAME)["algorithm"])
    orchestrator = build_job(cfg).orchestrator(folder, name=method)
    return orchestrator, restore(folder / CHECKPOINT_NAME, orchestrator.identity, orchestrator.store_directory)


def client_module(run_dir: str | Path, client: int) -> tuple[ClientModule, Orchestrator, dict, RunState]:
    """The method's client module holding ``client``'s model as the run's last evaluation built it, the orchestrator
    of the rebuilt job (its data and split), the plan's extras and the restored run state."""
    orchestrator, state = load_run(run_dir)
    folder = orchestrator.run_dir
    if not 0 <= client < orchestrator.num_clients:
        raise UserError(f"--client {client} is not a client of {folder}: its clients are 0-"
                        f"{orchestrator.num_clients - 1}")
    algorithm: Algorithm = orchestrator.algorithm
    r = state.server.round
    [(_, plan)] = list(client_plans(orchestrator.trainer, algorithm, state.server, state.store, orchestrator.initial,
                                    [client], r))
    orchestrator.trainer.load(plan)
    return orchestrator.module.eval(), orchestrator, dict(plan.extras), state


def recorded_accuracy(per_client: list[dict], client: int) -> float | None:
    """The accuracy the run recorded for ``client`` in its last evaluated round (None when that round did not
    evaluate it or it has no test data)."""
    if not per_client:
        return None
    last = per_client[-1]
    clients = last.get("evaluated_clients")
    if clients is None:
        return last["accuracy"][client]
    return last["accuracy"][clients.index(client)] if client in clients else None


def save_lightning_checkpoint(module: ClientModule, path: Path, extras: dict) -> None:
    """Write ``module`` as a checkpoint that ``type(module).load_from_checkpoint(path, weights_only=True)`` restores:
    its state dict (no backbone), hyper-parameters (dataclasses as dicts) and the plan ``extras``."""
    checkpoint = {"state_dict": module.state_dict(), "pytorch-lightning_version": lightning.__version__,
                  "epoch": 0, "global_step": 0, module.CHECKPOINT_HYPER_PARAMS_KEY: dict(module.hparams),
                  PLAN_EXTRAS_KEY: extras}
    module.on_save_checkpoint(checkpoint)
    atomic_write(path, lambda f: torch.save(checkpoint, f))


@torch.no_grad()
def split_accuracy(module: ClientModule, orchestrator: Orchestrator, client: int) -> float | None:
    """Accuracy of ``module`` (its ``forward``) on ``client``'s own test split, over the base classes with the
    base-to-novel protocol; None without test data."""
    index = torch.as_tensor(orchestrator.data.partition.test_indices[client], dtype=torch.long)
    if len(index) == 0:
        return None
    inputs = orchestrator.data.test_inputs(index)
    logits = torch.cat([module(inputs[i : i + EVAL_CHUNK]) for i in range(0, len(inputs), EVAL_CHUNK)])
    labels = orchestrator.data.test_labels[index]
    if orchestrator.split is not None:
        base = torch.as_tensor(orchestrator.split[0])
        predicted = base[logits[:, base].argmax(-1)]
    else:
        predicted = logits.argmax(-1)
    return float((predicted == labels).double().mean())


def export_client(run_dir: str | Path, client: int, out: str | Path | None = None) -> Exported:
    """Write ``client``'s personalised model of the run in ``run_dir`` (a method's folder) as a Lightning checkpoint
    at ``out`` (default ``<run_dir>/export/client-<client>.ckpt``), then load it back and measure its accuracy on
    the client's test split next to the run's record."""
    module, orchestrator, extras, state = client_module(run_dir, client)
    folder = orchestrator.run_dir
    path = Path(out) if out is not None else folder / "export" / f"client-{client}.ckpt"
    save_lightning_checkpoint(module, path, extras)
    restored = type(module).load_from_checkpoint(path, backbone=module.backbone, weights_only=True).eval()
    return Exported(path, type(module), split_accuracy(restored, orchestrator, client),
                    recorded_accuracy(state.per_client, client), state.server.round)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def run(args: argparse.Namespace) -> int:
    """Export ``args.client`` of ``args.run_dir`` to ``args.out``; prints what was written and how to load it."""
    done = export_client(args.run_dir, args.client, args.out)
    name = done.module_class.__name__
    echo(f"fedlit | client {args.client} after round {done.round}: test accuracy {_percent(done.accuracy)} from the "
         f"exported checkpoint, {_percent(done.recorded)} recorded by the run")
    echo(f"fedlit | wrote {done.path}; load it with {done.module_class.__module__}.{name}.load_from_checkpoint("
         f"{str(done.path)!r}, weights_only=True)")
    return 0
