"""Round time with 1 vs 2 processes (Fabric DDP, gloo on CPU / NCCL on GPU) for a compute-bound config.

A random ViT-B/32-sized CLIP (its 12-layer text tower dominates: image features are cached), PromptFL on a
pathological split of the shapes dataset over 8 clients. Every layout gives the same numbers; the table shows
seconds per round (mean over rounds) and the speed-up. On CPU each process gets ``threads`` intra-op threads.

    python benchmarks/scaling.py [--rounds 3] [--accelerator gpu]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ["algorithm=promptfl", "backbone.name=ViT-B-32", "backbone.pretrained=random", "data.num_clients=8",
          "data.shots=8",
          "data.train_per_class=8", "data.test_per_class=4", "prompt.n_ctx=16", "fed.local_epochs=2",
          "perf.disk_cache=true", "run.quiet=true"]


def run(devices: int, threads: int, rounds: int, accelerator: str, out_dir: Path) -> dict:
    """One training run; returns seconds per round and the per-client accuracies of the last round."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = [sys.executable, str(ROOT / "experiments" / "train.py"), *CONFIG, f"fed.rounds={rounds}",
            f"trainer.devices={devices}", f"trainer.accelerator={accelerator}", f"run.out_dir={out_dir}"]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run with {devices} process(es) failed:\n{done.stderr[-4000:]}")
    run_dir = next(out_dir.rglob("results.json")).parent  # logs/csv/ holds a metrics.csv of its own
    seconds = [float(r["seconds"]) for r in csv.DictReader((run_dir / "metrics.csv").open())]
    results = json.loads((run_dir / "results.json").read_text())
    return {"seconds": sum(seconds) / len(seconds), "accuracy": results["rounds"][-1]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    layouts = [(1, 1), (1, cores), (2, 1)] if args.accelerator == "cpu" else [(1, 1), (2, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        run(1, cores, 1, args.accelerator, Path(tmp) / "warmup")  # builds the shared feature cache
        rows = []
        for devices, threads in layouts:
            r = run(devices, threads, args.rounds, args.accelerator, Path(tmp) / f"{devices}x{threads}")
            rows.append((devices, threads, r))
            print(f"  {devices} process(es) x {threads} thread(s): {r['seconds']:.2f} s/round", flush=True)
    base = rows[0][2]
    print(f"\nmachine: {cores} CPU cores | accelerator {args.accelerator} | {args.rounds} rounds of PromptFL, "
          "8 clients, ViT-B/32-sized text tower")
    header = f"{'processes':>9} {'threads/proc':>12} {'s/round':>9} {'speed-up vs 1x1':>16} {'same accuracies':>16}"
    print(header + "\n" + "-" * len(header))
    for devices, threads, r in rows:
        print(f"{devices:>9} {threads:>12} {r['seconds']:>9.2f} {base['seconds'] / r['seconds']:>15.2f}x "
              f"{str(r['accuracy'] == base['accuracy']):>16}")


if __name__ == "__main__":
    main()
