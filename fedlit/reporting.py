"""Run directories and result files: ``config.yaml``, ``metrics.csv``, ``results.json``; comparison tables."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
from torch import Tensor

from fedlit.errors import UserError
from fedlit.io import FileLock, atomic_write
from fedlit.metrics import final_summary

METRIC_COLUMNS = ["round", "clients", "loss", "acc_mean", "acc_weighted", "acc_std", "acc_worst10", "acc_global",
                  "seconds"]
BASE_NOVEL_COLUMNS = ["acc_novel_mean", "acc_hm_mean", "hm_of_means", "acc_global_novel", "acc_global_hm"]


def new_run_dir_name(algorithm: str) -> str:
    """A fresh run directory name: what runs there (a method's name, or ``all``), then a sortable UTC timestamp
    and the process id, e.g. ``pfedmoap-20261201-104130-22073``."""
    return f"{algorithm}-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid()}"


class RunLock:
    """An exclusive lock on a run directory (:class:`~fedlit.io.FileLock` on ``<run_dir>/.lock``), held while a run
    writes there: a second process resuming the same directory is refused in one line. The kernel releases it
    when the holder exits, even after SIGKILL, so a killed run can be resumed at once; a run that ends removes the
    file."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._lock: FileLock | None = None

    def __enter__(self) -> RunLock:
        lock = FileLock(self.path)
        if not lock.acquire(blocking=False):
            holder = lock.holder() or "another process"
            raise UserError(f"run directory {self.path.parent} is in use by {holder}; wait for it to finish or stop "
                            "it before resuming") from None
        lock.write_holder(f"process {os.getpid()} on {socket.gethostname()}")
        self._lock = lock
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def latest_run_dir(out_dir: str | Path, name: str, algorithm: str) -> Path | None:
    """The newest run directory ``out_dir/name/<algorithm>-<stamp>`` that holds a checkpoint, or None
    (``algorithm``: a method's name or ``all``; runs of other methods under the same name are never chosen)."""
    parent = Path(out_dir) / name
    if not parent.is_dir():
        return None
    dirs = sorted(d for d in parent.glob(f"{algorithm}-*") if d.is_dir() and any(d.rglob("checkpoint.pt")))
    return dirs[-1] if dirs else None


def write_metrics_csv(path: Path, rows: list[dict], algorithm: str = "") -> None:
    """One row per evaluated round: the ``algorithm`` column (so that concatenated files stay readable), the
    METRIC_COLUMNS (and the BASE_NOVEL_COLUMNS when reported), then any
    other numeric key the rows carry (an algorithm's ``report``, e.g. ``epsilon``), in first-seen order."""
    known = set(METRIC_COLUMNS) | set(BASE_NOVEL_COLUMNS) | {"clients_without_test"}
    extra = list(dict.fromkeys(k for row in rows for k, v in row.items()
                               if k not in known and (v is None or isinstance(v, (int, float)))))
    reported = [c for c in BASE_NOVEL_COLUMNS if any(c in row for row in rows)]
    columns = ["algorithm"] + METRIC_COLUMNS[:-1] + reported + extra + ["seconds"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({"algorithm": algorithm, **{k: ("" if row.get(k) is None else row.get(k))
                                                    for k in columns[1:]}})
    atomic_write(path, text.getvalue())


def write_results_json(path: Path, results: dict) -> None:
    """``results.json``: per-client accuracies per evaluated round, final summary, seed, algorithm."""
    atomic_write(path, json.dumps(results, indent=1, sort_keys=True))


def build_results(meta: dict, algorithm: str, seed: int, partition_digest: str, history: list[dict],
                  per_client: list[dict], memory: dict | None = None) -> dict:
    """The ``results.json`` dictionary: numbers only (no timings), so that an interrupted and resumed run writes
    exactly the same file as an uninterrupted one."""
    rounds = [{**{k: v for k, v in row.items() if k != "seconds"}, **{k: v for k, v in accs.items() if k != "round"}}
              for row, accs in zip(history, per_client)]
    return {
        **meta,
        "memory_per_client_bytes": memory or {},
        "algorithm": algorithm,
        "seed": seed,
        "partition_digest": partition_digest,
        "rounds": rounds,
        "final": final_summary(history) if history else {},
    }


def write_results(run_dir: Path, history: list[dict], results: dict) -> None:
    """``metrics.csv`` (with timings) and ``results.json`` of a run directory."""
    write_metrics_csv(run_dir / "metrics.csv", history, results["algorithm"])
    write_results_json(run_dir / "results.json", results)


def tensor_bytes(tree) -> int:
    """Bytes of every tensor inside ``tree`` (nested dicts, lists and tuples)."""
    if isinstance(tree, Tensor):
        return int(tree.numel() * tree.element_size())
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def memory_per_client(entry_bytes: dict[str, int], initial_flat: dict, feature_bytes: int,
                      num_clients: int) -> dict[str, int]:
    """Bytes one simulated client costs: its stored state (parameters, optimiser state; the initial state's before
    any client trained), what its algorithm keeps beside it (``extras``, e.g. expert prompts) and its share of the
    cached image features (deterministic; no process overheads). ``entry_bytes``: the largest ``state`` and
    ``extras`` bytes of the store entries written so far (``RunState.entry_bytes``)."""
    state = entry_bytes.get("state", 0) or tensor_bytes(initial_flat)
    extras = entry_bytes.get("extras", 0)
    share = feature_bytes // max(num_clients, 1)
    return {"state_bytes": state, "extras_bytes": extras, "features_share_bytes": share,
            "total_bytes": state + extras + share}


def load_results(run_dirs: list[str | Path]) -> list[dict]:
    """Every ``results.json`` found under the given directories (recursively)."""
    found = []
    for d in run_dirs:
        d = Path(d)
        files = [d] if d.is_file() else sorted(d.rglob("results.json"))
        for f in files:
            data = json.loads(f.read_text())
            data["_path"] = str(f.parent)
            found.append(data)
    return found


def comparison_table(results: list[dict], key: str = "last_round") -> str:
    """A text table: one row per (dataset, algorithm) with mean ± std over seeds of ``final[key]`` (in %)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in results:
        groups.setdefault((r.get("dataset", "?"), r["algorithm"]), []).append(100.0 * r["final"][key])
    width = max([len("algorithm")] + [len(a) for _, a in groups])
    lines = [f"{'dataset':<16} {'algorithm':<{width}} {'seeds':>5} {key + ' (%)':>18}"]
    for (dataset, algorithm), values in sorted(groups.items()):
        v = np.asarray(values)
        lines.append(f"{dataset:<16} {algorithm:<{width}} {len(v):>5} {v.mean():>10.2f} ± {v.std():5.2f}")
    return "\n".join(lines)
