"""The round loop: sample, train each rank's share of clients, gather, aggregate, evaluate, checkpoint.

The orchestrator never knows which method runs (it asks the :class:`~fedlit.algorithms.Algorithm` for plans and
aggregation and stores their typed results without reading them), and the algorithm never knows how many
processes exist. Server state and the client store are replicated on every rank: every rank plans every sampled
client, trains only its own share (:class:`~fedlit.federation.trainer.LocalTrainer`), and receives everybody's
uploads through one all-gather, so any rank can run any client next round and 1 or N processes give the same
numbers. A synchronous algorithm (``Algorithm.synchronous``) trains its round in lock-step instead, with one more
gather per step (:mod:`fedlit.federation.synchronous`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedlit.algorithms import Algorithm
from fedlit.config import FLIPPING_ATTACKS, Config, heldout_size
from fedlit.data.partition import base_classes
from fedlit.errors import Diverged
from fedlit.federation.checkpoint import CHECKPOINT_NAME, Identity, RunState, checkpoint_round, restore, with_backend
from fedlit.federation.client_data import ClientData
from fedlit.federation.collectives import gather_uploads
from fedlit.federation.evaluation import evaluate
from fedlit.federation.reporter import RoundReporter
from fedlit.federation.sampling import (
    assign_to_ranks,
    attacked_clients,
    evaluation_subset,
    heldout_clients,
    sample_clients,
    surviving_clients,
)
from fedlit.federation.signals import STOP, Preempted
from fedlit.federation.store import DiskStore, MemoryStore, RecordTable, choose_backend, estimated_bytes
from fedlit.federation.synchronous import steps_bound, train_synchronous
from fedlit.federation.trainer import LocalTrainer, default_client_batch
from fedlit.federation.transfer import TransferTarget, transfer_models
from fedlit.metrics import (
    base_novel_metrics,
    domain_metrics,
    heldout_metrics,
    poison_metrics,
    round_metrics,
    transfer_metrics,
)
from fedlit.modules import ClientModule
from fedlit.reporting import build_results, memory_per_client, write_results
from fedlit.state import ClientState, ServerState, StoreEntry, Upload


def upload_is_finite(upload: Upload) -> bool:
    """Whether an upload's loss and every tensor of its state are finite."""
    return math.isfinite(upload.loss) and all(bool(torch.isfinite(t).all()) for t in upload.state.flat().values())


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: max allocated CUDA memory on a GPU, peak resident set size on CPU (``VmHWM``
    where /proc has it: ``ru_maxrss`` survives exec and would report a large parent's size)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Orchestrator:
    """Runs one algorithm's federated job and writes ``metrics.csv``, ``results.json`` and checkpoints to
    ``run_dir``. ``fabric`` may be None for a single process without Fabric (tests, library use). ``numerics``: the
    precision and accelerator the run computes with (a checkpoint resumes only with the same ones)."""

    def __init__(self, cfg: Config, algorithm: Algorithm, module: ClientModule, data: ClientData, run_dir: Path,
                 fabric=None, meta: dict | None = None, numerics: dict[str, str] | None = None,
                 transfer: Sequence[TransferTarget] = ()):
        self.cfg = cfg
        self.algorithm = algorithm
        self.data = data
        self.run_dir = Path(run_dir)
        self.fabric = fabric
        self.meta = dict(meta or {})
        self.rank = fabric.global_rank if fabric is not None else 0
        self.world = fabric.world_size if fabric is not None else 1
        device = fabric.device if fabric is not None else torch.device("cpu")
        self.num_clients = data.partition.num_clients
        self.initial = ClientState(module.client_state())
        self.trainer = LocalTrainer(module, data, seed=cfg.seed, local_epochs=cfg.fed.local_epochs,
                                    persistent_state=cfg.optim.persistent_state,
                                    client_batch=default_client_batch(cfg.perf.client_batch, device),
                                    device=device, fabric=fabric)
        num_classes = module.num_classes
        base = base_classes(num_classes)
        self.split = (base, list(range(len(base), num_classes))) if cfg.eval.protocol == "base2novel" else None
        if self.split is not None:
            self.trainer.trained_classes = base
        # Byzantine clients (chosen once from the seed): left out of every metric; label_flip and mislead ones train on
        # y -> C-1-y
        self.attacked = attacked_clients(cfg.seed, self.num_clients, cfg.attack.fraction) \
            if cfg.attack.kind != "none" and algorithm.trains else []
        if cfg.attack.kind in FLIPPING_ATTACKS:
            self.trainer.flipped_clients = frozenset(self.attacked)
        if cfg.attack.kind != "none":
            self.meta["attacked_clients"] = list(self.attacked)
        # held-out clients (eval.protocol=heldout, chosen once from the seed) are never sampled for training
        self.heldout = heldout_clients(cfg.seed, self.num_clients, heldout_size(cfg))
        if cfg.eval.protocol == "heldout":
            self.meta["heldout_clients"] = list(self.heldout)
        self.transfer = transfer_models(algorithm, module, self.initial, data, transfer, seed=cfg.seed, device=device,
                                        fabric=fabric)
        self.identity = Identity(algorithm.name, self.meta.get("config_digest", ""), data.partition.digest(),
                                 numerics=dict(numerics or {}))
        self.stop = STOP
        self.store_backend = choose_backend(cfg.store.backend, estimated_bytes(
            self.initial.flat(), self.num_clients, cfg.optim.persistent_state), cfg.store.memory_budget_mb)
        self.store_directory = Path(cfg.store.directory).expanduser() if cfg.store.directory else self.run_dir / "store"
        if algorithm.synchronous:
            algorithm.bind_steps(steps_bound(data, cfg.fed.local_epochs))

    @property
    def module(self) -> ClientModule:
        """The process's one client module."""
        return self.trainer.module

    @property
    def total_rounds(self) -> int:
        """Rounds this run trains (0 for a method that does not train)."""
        return self.cfg.fed.rounds if self.algorithm.trains else 0

    @property
    def reporter(self) -> RoundReporter:
        """Console lines, the rounds bar and the Lightning loggers of this run (rank 0 only; made on first use)."""
        if getattr(self, "_reporter", None) is None:
            self._reporter = RoundReporter(self.cfg, self.algorithm.name, self.run_dir, self.rank, self.total_rounds)
        return self._reporter

    def log(self, message: str) -> None:
        """Print on rank 0 unless quiet (above the rounds bar when one is drawn)."""
        self.reporter.line(message)

    def verify_checkpoint(self) -> None:
        """Refuse (one :class:`UserError` line) a checkpoint in ``run_dir`` written by another algorithm,
        configuration or partition, before anything is written there."""
        checkpoint = self.run_dir / CHECKPOINT_NAME
        if checkpoint.is_file():
            restore(checkpoint, self.identity, self.store_directory)

    def _new_state(self) -> RunState:
        """The run state before round 1: the algorithm's initial server and an empty store of the configured backend
        (on disk: with a table for the server's per-client records)."""
        server = self.algorithm.init_server(self.initial)
        if self.store_backend == "disk":
            size = self.cfg.store.shard_size
            return RunState(server=server, store=DiskStore(self.store_directory, size),
                            records=RecordTable(self.store_directory, size))
        return RunState(server=server, store=MemoryStore())

    def _restore(self, checkpoint: Path) -> RunState:
        """The run state of ``checkpoint`` on the configured store backend (a disk store reads its shards from the
        store directory; a run may resume on the other backend)."""
        state = restore(checkpoint, self.identity, self.store_directory)
        return with_backend(state, self.store_backend, self.store_directory, self.cfg.store.shard_size)

    def _checkpoint(self, state: RunState) -> None:
        """Write the round's checkpoint (rank 0 writes; see :func:`~fedlit.federation.checkpoint.checkpoint_round`)."""
        barrier = self.fabric.barrier if self.world > 1 else None
        checkpoint_round(self.run_dir, state, self.identity, write=self.rank == 0, barrier=barrier)

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        """Run (or continue) all rounds; returns the results dictionary also written to ``results.json``."""
        checkpoint = self.run_dir / CHECKPOINT_NAME
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        existed = checkpoint.is_file()  # read before any rank writes (decides the same on every rank)
        state = self._new_state()
        if resume and existed:
            state = self._restore(checkpoint)
            if state.records is not None and self.rank == 0:
                state.store.remove_unlisted()  # shard versions of a round whose checkpoint never completed
                state.records.remove_unlisted()
            self._drop_unscheduled_evaluations(state)
            self._reevaluate_extended_final(state)
            self.log(f"[{self.algorithm.name}] resuming after round {state.server.round} from {checkpoint}")
        if not self.algorithm.trains and not state.history:
            self._evaluate_round(state, 0, loss=None, clients=0, seconds=0.0)
        installed_here = not self.stop.installed
        if installed_here:
            self.stop.install()
        try:
            while state.server.round < self.total_rounds:
                self._round(state)
                self._checkpoint(state)
                self._write(state)
                if state.server.round < self.total_rounds and self._stop_requested():
                    raise Preempted(f"stopped after round {state.server.round}")
        finally:
            if installed_here:
                self.stop.uninstall()
        if not existed and state.server.round == 0:  # nothing trained (zero-shot): one checkpoint all the same
            self._checkpoint(state)
        memory = memory_per_client(state.entry_bytes, self.initial.flat(), self.data.cached_bytes(), self.num_clients)
        self.log(f"[{self.algorithm.name}] memory per simulated client: " + ", ".join(
            f"{k.removesuffix('_bytes')} {v / 1024:.1f} KiB" for k, v in memory.items())
            + f" | peak process memory {peak_memory_bytes(self.trainer.device) / 2**20:.0f} MiB")
        return self._write(state, memory)

    def _round(self, state: RunState) -> None:
        """One round: plans for the sampled clients, this rank's training, one gather, aggregation, the store
        update and (on schedule) evaluation; updates ``state`` in place."""
        algorithm, server = self.algorithm, state.server
        t0 = time.perf_counter()
        r = server.round + 1
        sampled = self._sampled(r)
        if not sampled:  # every sampled client dropped out: nothing to aggregate, only the round counter moves
            state.server = ServerState(dict(server.global_state), dict(server.extras), r, dict(server.client_records))
            self._finish_round(state, r, None, 0, time.perf_counter() - t0)
            return
        sizes = {c: self.data.train_size(c) for c in sampled}
        assignment = assign_to_ranks(sampled, sizes, self.world)
        mine = assignment[self.rank]
        # a rank reads the entries of the clients it trains only; the others' plans (made without their entries)
        # serve keep() alone, which depends on the server state only (see Algorithm.keep)
        entries = state.store.get_many(mine)
        plans = algorithm.plan_round(server, {cid: entries.get(cid) for cid in sampled}, self.initial)
        slots = max(len(a) for a in assignment)
        if algorithm.synchronous:  # lock-step: one gradient gather per step, then the uploads' gather below
            local = train_synchronous(self.trainer, algorithm, plans, mine, r, self.fabric, slots)
        else:
            local = self.trainer.train({cid: plans[cid] for cid in mine}, r)
        uploads = gather_uploads(self.fabric, local, self.trainer.empty_upload(self.initial), slots)
        kept = self._finite(uploads, sampled, r)
        for cid in kept:
            entry = StoreEntry(uploads[cid].state, algorithm.keep(plans[cid]), last_round=r)
            state.store.put(cid, entry)
            state.note_entry(entry)
        state.server = algorithm.aggregate(server, {c: uploads[c] for c in kept}, {c: sizes[c] for c in kept})
        loss = float(np.mean([uploads[c].loss for c in kept]))
        self._finish_round(state, r, loss, len(kept), time.perf_counter() - t0)

    def _sampled(self, r: int) -> list[int]:
        """The clients that train in round ``r``: the sampled ones that do not drop out."""
        cfg = self.cfg
        return surviving_clients(cfg.seed, r, sample_clients(cfg.seed, r, self.num_clients, cfg.fed.frac,
                                                             self.heldout), cfg.fed.dropout)

    def _evaluated_clients(self, r: int) -> list[int] | None:
        """The clients round ``r`` evaluates (``eval.clients``; None: all): every client in round 0 and, with
        ``eval.final_all``, in the final round. A subset is drawn among the clients that may train, and the
        held-out clients (``eval.protocol=heldout``) are evaluated in every evaluated round."""
        choice = str(self.cfg.eval.clients)
        if choice == "all" or r == 0 or (self.cfg.eval.final_all and r == self.total_rounds):
            return None
        if choice == "sampled":
            chosen = self._sampled(r)
        else:
            chosen = evaluation_subset(self.cfg.seed, r, self.num_clients, int(choice), self.heldout)
        return sorted(set(chosen) | set(self.heldout))

    def _finish_round(self, state: RunState, r: int, loss: float | None, clients: int, seconds: float) -> None:
        """Evaluate round ``r`` on schedule, else log it."""
        if self._evaluated(r):
            self._evaluate_round(state, r, loss=loss, clients=clients, seconds=seconds)
        else:
            lossed = f"loss {loss:.4f}" if loss is not None else "no uploads"
            self.log(f"[{self.algorithm.name}] round {r:>3}/{self.cfg.fed.rounds} | clients {clients} | "
                     f"{lossed} | {seconds:.1f} s")
            self.reporter.metrics(r, {"clients": clients, "loss": loss, "seconds": round(seconds, 4)})
        self.reporter.round_finished(r)

    def _finite(self, uploads: dict[int, Upload], sampled: list[int], r: int) -> list[int]:
        """The sampled clients whose loss and state are finite. A non-finite one stops the run (:class:`Diverged`,
        nothing of this round is kept: the last checkpoint is the previous round's) or, with
        ``run.on_nonfinite=skip_client``, is left out of this round's aggregation and store (all of them: stop)."""
        bad = [c for c in sampled if not upload_is_finite(uploads[c])]
        if not bad:
            return sampled
        what = ", ".join(f"client {c} (loss {uploads[c].loss:.4g})" for c in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if self.cfg.run.on_nonfinite == "stop" or len(bad) == len(sampled):
            kept = f"the checkpoint of round {r - 1} is kept" if r > 1 else "no checkpoint was written"
            raise Diverged(f"[{self.algorithm.name}] round {r}: non-finite loss or parameters from {what}; {kept}. "
                           "Lower the learning rates (optim.prompt_lr, optim.gate_lr) or set "
                           "run.on_nonfinite=skip_client")
        self.log(f"[{self.algorithm.name}] round {r}: skipped {len(bad)} client(s) with non-finite updates: {what}")
        return [c for c in sampled if c not in bad]

    def _evaluated(self, r: int) -> bool:
        """Rounds on the ``eval_every`` schedule, and the run's final round."""
        return r % self.cfg.fed.eval_every == 0 or r == self.total_rounds

    def _drop_unscheduled_evaluations(self, state: RunState) -> None:
        """A finished run extended by more rounds: its old final round was evaluated only because it was final;
        drop it so that the history equals a straight run's."""
        keep = [i for i, row in enumerate(state.history) if row["round"] == 0 or self._evaluated(row["round"])]
        state.history = [state.history[i] for i in keep]
        state.per_client = [state.per_client[i] for i in keep]

    def _reevaluate_extended_final(self, state: RunState) -> None:
        """A finished run extended by more rounds with ``eval.clients`` a subset: its old final round evaluated every
        client (``eval.final_all``) where a straight run evaluates that round's subset. The restored state is that
        round's, so evaluate it again on the subset (every rank: evaluation all-reduces)."""
        r = state.server.round
        if not state.history or state.history[-1]["round"] != r or r == 0 or r >= self.total_rounds:
            return
        if self._evaluated_clients(r) is None or "evaluated_clients" in state.per_client[-1]:
            return  # evaluated as a straight run evaluates it
        last = state.history.pop()
        state.per_client.pop()
        self._evaluate_round(state, r, loss=last["loss"], clients=last["clients"], seconds=last["seconds"])

    def _stop_requested(self) -> bool:
        """Whether any rank received a stop signal (one all-reduce)."""
        flag = torch.tensor([1.0 if self.stop.requested else 0.0])
        if self.world > 1:
            flag = self.fabric.all_reduce(flag.to(self.trainer.device), reduce_op="sum").cpu()
        return bool(flag.item() > 0)

    # -- evaluation and results -------------------------------------------------------------------------------
    def _evaluate_round(self, state: RunState, r: int, loss: float | None, clients: int, seconds: float) -> None:
        t0 = time.perf_counter()
        chosen = self._evaluated_clients(r)
        result = evaluate(self.trainer, self.algorithm, state.server, state.store, self.initial, self.fabric,
                          self.split, round_index=r, diagnostics=self.cfg.eval.diagnostics,
                          excluded=frozenset(self.attacked), clients=chosen, transfer=self.transfer)
        accuracies, global_acc = result.accuracy, result.global_accuracy
        part = self.data.partition
        evaluated = range(self.num_clients) if chosen is None else sorted(set(chosen))
        attacked, heldout = set(self.attacked), set(self.heldout)
        honest = [c for c in evaluated if c not in attacked]
        participating = [c for c in honest if c not in heldout]  # the personalised metrics: clients that train
        row = {"round": r, "clients": clients, "loss": loss, "acc_global": global_acc,
               "seconds": round(seconds + time.perf_counter() - t0, 4),
               **round_metrics([accuracies[c] for c in participating],
                               [len(part.test_indices[c]) for c in participating]),
               **self.algorithm.report(state.server)}
        if self.cfg.eval.protocol == "heldout":
            row.update(heldout_metrics(row["acc_mean"], [accuracies[c] for c in honest if c in heldout]))
        if result.transfer is not None:
            row.update(transfer_metrics(result.transfer))
        if result.diagnostics is not None and "expert_attention" in result.diagnostics and attacked:
            row.update(poison_metrics(result.diagnostics, honest, attacked))
        if result.novel is not None:
            row.update(base_novel_metrics(accuracies, result.novel, global_acc, result.global_novel))
        domain_names = self.data.bundle.domain_names if self.data.bundle is not None else None
        if part.client_domains is not None and domain_names:
            row["domains"] = domain_metrics(accuracies, part.client_domains, domain_names)
        state.history.append(row)
        state.per_client.append(result.record(r, chosen))
        glob = f" | global {100 * global_acc:.2f}%" if global_acc is not None else ""
        lossed = f" | loss {loss:.4f}" if loss is not None else ""
        glob += f" | epsilon {row['epsilon']:.3g}" if "epsilon" in row else ""
        if row.get("acc_heldout") is not None:
            glob += f" | held-out {100 * row['acc_heldout']:.2f}% (gap {100 * row['participation_gap']:+.2f})"
        if row.get("acc_transfer") is not None:
            glob += f" | transfer {100 * row['acc_transfer']:.2f}%"
        self.log(f"[{self.algorithm.name}] round {r:>3}/{self.total_rounds} | clients {clients}{lossed} | "
                 f"acc {100 * row['acc_mean']:.2f}% (worst10 {100 * row['acc_worst10']:.2f}%){glob} | "
                 f"{row['seconds']:.1f} s")
        self.reporter.metrics(r, row, result.diagnostics, [accuracies[c] for c in honest])

    def _write(self, state: RunState, memory: dict | None = None) -> dict:
        """Write ``metrics.csv`` and ``results.json`` (rank 0); returns the results dictionary."""
        results = build_results(self.meta, self.algorithm.name, self.cfg.seed, self.identity.partition_digest,
                                state.history, state.per_client, memory)
        if self.rank == 0:
            write_results(self.run_dir, state.history, results)
        return results
