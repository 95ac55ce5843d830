"""Wire a :class:`~fedlit.config.Config` to a full job: Fabric, backbone, dataset, partition, cached features,
run directory, one :class:`Orchestrator` per algorithm, and a comparison table at the end."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from lightning.fabric import Fabric

from fedlit.algorithms import Algorithm, build_algorithm
from fedlit.backbone import Backbone, load_backbone
from fedlit.config import PRETRAINED_BUILTINS, RANDOM_WEIGHTS, Config, runnable_algorithms, to_yaml
from fedlit.data.base import DatasetBundle
from fedlit.data.features import FeatureCache
from fedlit.data.partition import Partition, base_classes, make_partition, save_manifest
from fedlit.data.registry import build_dataset
from fedlit.errors import UserError
from fedlit.federation.client_data import ClientData, build_client_data, run_feature_kinds
from fedlit.federation.orchestrator import Orchestrator
from fedlit.federation.signals import Preempted, requeue_slurm_job
from fedlit.federation.transfer import TransferTarget, build_transfer_targets
from fedlit.io import atomic_write, default_cache_dir, remove_stale_temporaries
from fedlit.modules import ClientModule
from fedlit.progress import echo
from fedlit.reporting import RunLock, comparison_table, latest_run_dir, new_run_dir_name
from fedlit.sanity import check_zero_shot, zero_shot_accuracy
from fedlit.threads import apply_thread_default, reduced_threads_note

# Keys that may differ between an interrupted run and its resumption (layout and bookkeeping, not the maths; the
# client store moves to the other backend on resume).
RESUMABLE_KEYS = ("run", "trainer", "store")


def config_digest(cfg: Config) -> str:
    """Hash of everything in ``cfg`` that determines the numbers (not the process layout or run bookkeeping)."""
    data = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_KEYS}
    data["fed"].pop("rounds")  # a finished run may be extended by more rounds
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_pretrained(cfg: Config) -> bool:
    """Whether the backbone carries trained weights (then zero-shot must beat chance)."""
    return cfg.backbone.name in PRETRAINED_BUILTINS or cfg.backbone.pretrained not in (None, RANDOM_WEIGHTS)


def numerics(cfg: Config, fabric: Fabric | None) -> dict[str, str]:
    """The two trainer settings that change a run's numbers: ``{"precision": .., "accelerator": ..}``, as the run
    applies them. The accelerator is the device type the run computes on (``cpu``, ``cuda``, ``mps``; ``auto``
    resolved); without Fabric a run computes in fp32 on the CPU. The process layout (devices, nodes, strategy)
    never changes the numbers and is left out."""
    if fabric is None:
        return {"precision": "32-true", "accelerator": "cpu"}
    return {"precision": cfg.trainer.precision, "accelerator": fabric.device.type}


def results_config(cfg: Config, fabric: Fabric | None = None) -> dict:
    """The resolved configuration stored in ``results.json`` (for ``fedlit compare``): every key except the run
    bookkeeping, the process layout and the client store (``run``, ``store`` and of ``trainer`` all but
    :func:`numerics`), which never change the numbers, so that a resumed run writes the same file as an
    uninterrupted one (a resume must keep the numerics: :class:`~fedlit.federation.checkpoint.Identity`)."""
    config = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_KEYS}
    config["trainer"] = numerics(cfg, fabric)
    return config


def make_fabric(cfg: Config) -> Fabric:
    """A launched Fabric for ``cfg.trainer`` (DDP processes when more than one device or node; never wraps models).
    Unless ``OMP_NUM_THREADS`` is set, each process gets the cores available divided by the processes per node (one
    ``note:`` line on stderr when that is fewer threads than torch would use, unless ``run.quiet``)."""
    # Harmless notices on CPU clusters: srun on PATH outside a job, and the deprecated autograd all_gather path.
    warnings.filterwarnings("ignore", message=".*`srun` command is available.*")
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
    t = cfg.trainer
    multi = t.devices * t.num_nodes > 1
    strategy = t.strategy if t.strategy != "auto" else ("ddp" if multi else "auto")
    threads = apply_thread_default(t.devices)
    fabric = Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
                    strategy=strategy)
    fabric.launch()
    note = reduced_threads_note(*threads, t.devices) if threads is not None else None
    if note is not None and fabric.global_rank == 0 and not cfg.run.quiet:
        print(note, file=sys.stderr, flush=True)
    return fabric


@dataclass
class Job:
    """A configured job: the frozen backbone, the dataset, its partition and the clients' cached data, ready to
    build one orchestrator per algorithm (see :func:`build_job`)."""

    cfg: Config
    backbone: Backbone
    bundle: DatasetBundle
    partition: Partition
    data: ClientData
    fabric: Fabric | None = None
    transfer: list[TransferTarget] = field(default_factory=list)  # eval.protocol=transfer: the targets

    @property
    def device(self) -> torch.device:
        """Where the backbone and the client modules live."""
        return self.fabric.device if self.fabric is not None else torch.device("cpu")

    def build(self, name: str | None = None) -> tuple[Algorithm, ClientModule]:
        """The algorithm ``name`` (default ``cfg.algorithm``) and its client module on the job's device; every
        client's initial prompt and gate come from one draw seeded by ``cfg.seed``."""
        algorithm = build_algorithm(self.cfg, name)
        torch.manual_seed(self.cfg.seed)
        return algorithm, algorithm.build_module(self.backbone, self.bundle.classnames).to(self.device)

    def orchestrator(self, run_dir: str | Path, name: str | None = None, meta: dict | None = None,
                     built: tuple[Algorithm, ClientModule] | None = None) -> Orchestrator:
        """An orchestrator that runs algorithm ``name`` into ``run_dir`` (``built``: a prebuilt algorithm and
        module from :meth:`build`)."""
        algorithm, module = built or self.build(name)
        meta = meta if meta is not None else {"dataset": self.bundle.name, "config_digest": config_digest(self.cfg),
                                               "world_size": self.fabric.world_size if self.fabric else 1,
                                               "config": results_config(self.cfg, self.fabric)}
        data = self.data.for_module(module)  # e.g. patch features for a module that asks for them
        return Orchestrator(self.cfg, algorithm, module, data, Path(run_dir), fabric=self.fabric, meta=meta,
                            numerics=numerics(self.cfg, self.fabric), transfer=self.transfer)


def build_job(cfg: Config, fabric: Fabric | None = None,
              announce: Callable[[Backbone, DatasetBundle, Partition], None] | None = None) -> Job:
    """Backbone, dataset, partition and cached features for ``cfg`` (on ``fabric.device``, CPU without Fabric).
    With several processes, rank 0 builds the backbone first so that the others only read the cache. Rank 0 of a
    run that is not ``run.quiet`` shows bars for the backbone build and the feature caching (on a terminal).
    ``announce(backbone, bundle, partition)`` runs before the features are computed (the run's summary line: the
    image-feature cache of a large backbone on a CPU can take minutes)."""
    rank = fabric.global_rank if fabric is not None else 0
    device = fabric.device if fabric is not None else torch.device("cpu")
    progress = rank == 0 and not cfg.run.quiet
    cache_dir = Path(cfg.backbone.cache_dir).expanduser() if cfg.backbone.cache_dir else default_cache_dir()
    backbone = None
    if rank == 0:
        backbone = load_backbone(cfg.backbone.name, cfg.backbone.pretrained, cache_dir, device=device,
                                 progress=progress, data_root=cfg.data.root)
    if fabric is not None:
        fabric.barrier()
    if backbone is None:
        backbone = load_backbone(cfg.backbone.name, cfg.backbone.pretrained, cache_dir, device=device,
                                 progress=False, data_root=cfg.data.root)
    bundle = build_dataset(cfg.data, backbone.preprocess)
    classes = base_classes(bundle.num_classes) if cfg.eval.protocol == "base2novel" else None
    partition = make_partition(bundle, cfg.data, cfg.seed, classes)
    if announce is not None:
        announce(backbone, bundle, partition)
    cache = FeatureCache(cache_dir / "features" if cfg.perf.disk_cache else None)
    data = build_client_data(cfg, backbone, bundle, partition, device, cache, progress=progress)
    transfer = build_transfer_targets(cfg, backbone, device, cache, run_feature_kinds(cfg), progress=progress)
    return Job(cfg, backbone, bundle, partition, data, fabric, transfer)


def _resolve_run_dir(cfg: Config, fabric: Fabric) -> tuple[Path, bool]:
    """(run directory, resuming?) decided on rank 0 and broadcast so that every rank agrees: a new run goes to
    ``run.out_dir/run.name/<algorithm>-<stamp>`` (``all-<stamp>`` for every method), and ``run.resume=auto``
    continues the newest such directory of the same ``algorithm``."""
    choice = None
    if fabric.global_rank == 0:
        if cfg.run.resume == "auto":
            found = latest_run_dir(cfg.run.out_dir, cfg.run.name, cfg.algorithm)
            choice = (str(found), True) if found else None
        elif cfg.run.resume:
            choice = (str(cfg.run.resume), True)
        if choice is None:
            choice = (str(Path(cfg.run.out_dir) / cfg.run.name / new_run_dir_name(cfg.algorithm)), False)
    choice = fabric.broadcast(choice, src=0)
    return Path(choice[0]), bool(choice[1])


def run_experiment(cfg: Config) -> list[dict]:
    """Run every algorithm of ``cfg``; returns their results dictionaries. Raises Preempted after a stop signal
    (the checkpoint of the last finished round is on disk)."""
    fabric = make_fabric(cfg)
    torch.manual_seed(cfg.seed)
    lead = fabric.global_rank == 0
    log = echo if lead and not cfg.run.quiet else (lambda m: None)

    # Everything that can fail on bad input happens before the run directory exists (its name is chosen first, for
    # the summary line printed before the features are computed).
    names = runnable_algorithms(cfg)
    run_dir, resuming = _resolve_run_dir(cfg, fabric)

    def announce(backbone: Backbone, bundle: DatasetBundle, partition: Partition) -> None:
        log(summary_line(cfg, bundle, partition, backbone, fabric.world_size, names, run_dir, resuming))

    job = build_job(cfg, fabric, announce)
    bundle, partition, data = job.bundle, job.partition, job.data
    zero_shot = None
    if is_pretrained(cfg) and data.test_features is not None:
        accuracy = zero_shot_accuracy(job.backbone, bundle.classnames, data.test_features, data.test_labels,
                                      cfg.method.template)
        zero_shot = (f"fedlit | zero-shot accuracy before training: {100 * accuracy:.2f}% on {bundle.num_classes} "
                     f"classes (chance {100 / bundle.num_classes:.2f}%)")
        if cfg.backbone.sanity_check:
            check_zero_shot(accuracy, bundle.num_classes, bundle.name)

    built = {name: job.build(name) for name in names}  # before the run directory exists: bad settings leave nothing

    outs = {name: run_dir / name if len(names) > 1 else run_dir for name in names}
    orchestrators = {name: job.orchestrator(outs[name], built=built[name]) for name in names}
    with ExitStack() as held:
        error = None
        if fabric.global_rank == 0:
            try:  # nothing is written until the directory is ours and every checkpoint to resume matches
                held.enter_context(RunLock(run_dir))
                for out in outs.values():
                    remove_stale_temporaries(out)
                if resuming:
                    for orchestrator in orchestrators.values():
                        orchestrator.verify_checkpoint()
                atomic_write(run_dir / "config.yaml", to_yaml(cfg))
                save_manifest(partition, run_dir / "partition.json", bundle.train.targets, bundle.test.targets)
            except UserError as err:
                error = str(err)
        error = fabric.broadcast(error, src=0)
        if error is not None:
            raise UserError(error)
        if zero_shot is not None:
            log(zero_shot)
        results = [run_one(orchestrators[name], resuming) for name in names]
    if len(results) > 1:
        log("\n" + comparison_table(results))
    if lead:  # even with run.quiet: where the results are
        echo(f"fedlit | results in {run_dir}")
    return results


def summary_line(cfg: Config, bundle: DatasetBundle, partition: Partition, backbone: Backbone, world: int,
                 names: list[str], run_dir: Path, resuming: bool) -> str:
    """The one console line of a run: dataset, clients, rounds, method(s), backbone, processes, precision and run
    directory (the whole configuration is in the run directory's ``config.yaml``)."""
    methods = f"all {len(names)} methods" if cfg.algorithm == "all" else ", ".join(names)
    rounds = f"{cfg.fed.rounds} round{'s' if cfg.fed.rounds != 1 else ''}"
    return (f"fedlit | {bundle.name} ({bundle.num_classes} classes) | {partition.num_clients} clients "
            f"({cfg.data.partition}) | {rounds} | {methods} | backbone {backbone.name} | "
            f"{world} process{'es' if world > 1 else ''}, {cfg.trainer.precision} | "
            f"{'resuming ' if resuming else ''}{run_dir}")


def run_one(orchestrator: Orchestrator, resume: bool) -> dict:
    """Run one orchestrator with its rounds bar drawn from the start (and removed however the run ends)."""
    orchestrator.reporter.start()
    try:
        return orchestrator.run(resume=resume)
    finally:
        orchestrator.reporter.close()


__all__ = ["run_experiment", "build_job", "Job", "Preempted", "requeue_slurm_job", "config_digest"]
