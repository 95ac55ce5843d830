"""Run directories and result files: ``config.yaml``, ``metrics.csv``, ``results.json``; comparison tables."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np

METRIC_COLUMNS = ["round", "clients", "loss", "acc_mean", "acc_weighted", "acc_std", "acc_worst10", "acc_global",
                  "seconds"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def new_run_dir_name() -> str:
    """A fresh run directory name: a sortable UTC timestamp plus the process id."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid()}"


def latest_run_dir(out_dir: str | Path, name: str) -> Path | None:
    """The newest run directory ``out_dir/name/<stamp>`` that holds a checkpoint, or None."""
    parent = Path(out_dir) / name
    if not parent.is_dir():
        return None
    dirs = sorted(d for d in parent.iterdir() if d.is_dir() and any(d.rglob("checkpoint.pt")))
    return dirs[-1] if dirs else None


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    """One row per evaluated round with the METRIC_COLUMNS."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})
    os.replace(tmp, path)


def write_results_json(path: Path, results: dict) -> None:
    """``results.json``: per-client accuracies per evaluated round, final summary, seed, algorithm."""
    atomic_write_text(path, json.dumps(results, indent=1, sort_keys=True))


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
    lines = [f"{'dataset':<16} {'algorithm':<12} {'seeds':>5} {key + ' (%)':>18}"]
    for (dataset, algorithm), values in sorted(groups.items()):
        v = np.asarray(values)
        lines.append(f"{dataset:<16} {algorithm:<12} {len(v):>5} {v.mean():>10.2f} ± {v.std():5.2f}")
    return "\n".join(lines)
