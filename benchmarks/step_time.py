"""One client's local-training step time at two checkouts of fedlit, side by side in one run.

Each (backbone, method) pair runs in two long-lived worker processes, one per checkout (``PYTHONPATH`` pointing at
it, so each runs its own code). A worker builds a random backbone of the papers' size, the method's client module,
a Fabric as ``fedlit train`` makes it (``trainer.precision=32-true``, one CPU process) and one client holding
``steps x B`` cached image features; a pFedMoAP client gets K downloaded experts from a pool of K + 1 prompts.
Then the parent asks the workers in turn (old, new, new, old, ...) so that load from other processes on a shared
machine falls on both alike: a worker trains the client for one local epoch of ``steps`` steps through its
checkout's own trainer entry point (``Orchestrator.train_client`` before the method-seam rebuild of #10,
``LocalTrainer.train`` after it) and reports the wall time divided by the steps. Expert text features are encoded
once per client (no grad) before its first step in both versions; the workers' warm-up fills their caches, so the
figures are the steps themselves (text-tower forward and backward, gate, loss, optimiser) plus each checkout's
per-client bookkeeping spread over the steps.

The workers' OpenMP threads sleep at barriers (``OMP_WAIT_POLICY=PASSIVE``) unless ``--omp-wait-policy`` says
otherwise: on a machine whose cores are oversubscribed by other processes, threads spinning at every barrier take
the CPU from the thread doing the work, and 2-thread steps become an order of magnitude slower and erratic, for
both checkouts alike.

Prints the machine, then one table: config, method, ms/step old, ms/step new, ratio new/old, in wall time and in
the workers' CPU time (every thread; less disturbed by other processes than the wall time, but it counts threads
spinning at a barrier), each the median of the repetitions (all of them go to stderr).
``--profile`` prints, per checkout, torch.profiler's top operators of one client's training.

    python benchmarks/step_time.py                                 # 0a20e8c (temporary worktree) vs this checkout
    python benchmarks/step_time.py --backbones tiny --steps 2 --repeats 1 --old-root .   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_REVISION = "0a20e8c"  # the last commit before the method-seam rebuild of #10
BACKBONES = {"RN50": "RN50", "ViT-B/16": "ViT-B-16"}
METHODS = ("pfedmoap", "promptfl")
CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RESULT = "RESULT "  # prefix of the lines a worker answers with (anything else on its stdout is ignored)


# -- worker: runs inside one checkout ---------------------------------------------------------------------------
def build_client(args: argparse.Namespace, run_dir: Path):
    """Everything one checkout needs to train one client; returns ``train() -> steps`` (one local epoch of the
    client through the checkout's trainer entry point) and the client module."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from fedlit.algorithms import build_algorithm
    from fedlit.backbone import load_backbone
    from fedlit.config import load_config
    from fedlit.data.partition import Partition
    from fedlit.federation import orchestrator as orchestration
    from fedlit.federation.client_data import ClientData
    from fedlit.federation.experiment import make_fabric
    from fedlit.prompts import init_context

    overrides = [f"algorithm={args.method}", f"backbone.name={args.backbone}", "fed.local_epochs=1",
                 f"prompt.n_ctx={args.n_ctx}", f"data.batch_size={args.batch}", f"method.num_experts={args.k + 1}",
                 "perf.cut_text=true", "perf.share_prefix=true", "perf.client_batch=1", "trainer.precision=32-true",
                 "run.quiet=true"] + (["gate.d_gate=16"] if args.backbone == "tiny" else [])
    cfg = load_config(None, overrides)
    fabric = make_fabric(cfg)
    torch.set_num_threads(args.threads)
    backbone = load_backbone(cfg.backbone.name, None)
    names = (CLASSNAMES * (args.classes // len(CLASSNAMES) + 1))[: args.classes]
    classnames = [f"{n} {i}" if i >= len(CLASSNAMES) else n for i, n in enumerate(names)]
    algorithm = build_algorithm(cfg)
    module = algorithm.build_module(backbone, classnames).to(fabric.device)
    generator = torch.Generator().manual_seed(0)
    size = args.steps * args.batch
    features = F.normalize(torch.randn(size, backbone.feature_dim, generator=generator), dim=-1)
    labels = torch.randint(args.classes, (size,), generator=generator)
    partition = Partition(scheme="iid", params={}, seed=0, num_classes=args.classes,
                          train_indices=[np.arange(size)], test_indices=[np.arange(0)])
    data = ClientData(partition=partition, train_labels=labels, test_labels=torch.empty(0, dtype=torch.long),
                      train_features=features, batch_size=args.batch)
    orch = orchestration.Orchestrator(cfg, algorithm, module, data, run_dir, fabric=fabric)
    pool = {i: {"ctx": init_context(args.n_ctx, backbone.text_width, None, 0.02, seed=100 + i), "round": 1}
            for i in range(args.k + 1)}
    rebuilt = hasattr(orch, "trainer")  # the method seam of #10: typed plans, one LocalTrainer
    if rebuilt:
        server = algorithm.init_server(orch.initial)
        if args.method == "pfedmoap":
            server.client_records, server.round = pool, 1

        def train() -> int:
            plans = algorithm.plan_round(server, {0: None}, orch.initial)
            return orch.trainer.train(plans, 2)[0].steps
    else:
        server = algorithm.init_server(module)
        if args.method == "pfedmoap":
            server.pool, server.round = pool, 1

        def train() -> int:
            upload = orch.train_client(0, algorithm.plan(server, 0, None, orch.initial), 2)
            return int(upload["stat.steps"].item())

    return train, module


def worker(args: argparse.Namespace) -> None:
    """Build the client, warm up, then answer each ``run`` line on stdin with the ms per step of one local epoch."""
    sys.path.insert(0, str(Path(args.root).resolve()))
    import fedlit

    run_dir = tempfile.TemporaryDirectory()
    train, module = build_client(args, Path(run_dir.name))
    for _ in range(max(args.warmup, 1) if args.method == "pfedmoap" else args.warmup):
        train()
    if args.method == "pfedmoap" and module.num_loaded_experts != args.k:
        raise RuntimeError(f"the client trained with {module.num_loaded_experts} experts, not K = {args.k}")
    if args.profile:
        print_profile(train, args)
    print(RESULT + json.dumps({"ready": str(Path(fedlit.__file__).resolve().parent)}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start, cpu = time.perf_counter(), time.process_time()
        steps = train()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        print(RESULT + json.dumps({"ms_per_step": 1e3 * seconds / steps, "cpu_ms_per_step": 1e3 * cpu_seconds / steps,
                                   "steps": steps}), flush=True)
    run_dir.cleanup()


def print_profile(train, args: argparse.Namespace) -> None:
    """torch.profiler's operators of one client's local epoch, by self CPU time (to stderr)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile)
    print(f"\n== profile of {args.root} ({args.backbone}, {args.method}, {args.steps} steps)\n{table}", file=sys.stderr)


# -- parent: starts the workers and prints the table ------------------------------------------------------------
class Worker:
    """A worker process for one checkout, configuration and method."""

    def __init__(self, root: Path, backbone: str, method: str, args: argparse.Namespace):
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(args.threads)}
        if args.omp_wait_policy != "default":
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--root", str(root), "--backbone",
                   backbone, "--method", method, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--classes", str(args.classes), "--k", str(args.k), "--n-ctx", str(args.n_ctx),
                   "--threads", str(args.threads), "--warmup", str(args.warmup), "--profile", str(args.profile)]
        self.process = subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        self.code = Path(self.answer()["ready"])

    def answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        raise RuntimeError(f"worker exited with code {self.process.wait()} before answering")

    def run(self) -> dict:
        """One timed local epoch: ``{"ms_per_step", "cpu_ms_per_step", "steps"}``."""
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self.answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def compare(old_root: Path, new_root: Path, backbones: list[str], args: argparse.Namespace) -> list[dict]:
    """Wall and CPU ms/step of each (backbone, method) at both checkouts, asked in alternating order: the median
    of the repetitions (all of them printed to stderr)."""
    rows = []
    for label in backbones:
        for method in args.methods:
            workers = {"old": Worker(old_root, BACKBONES.get(label, label), method, args),
                       "new": Worker(new_root, BACKBONES.get(label, label), method, args)}
            if workers["old"].code == workers["new"].code and old_root.resolve() != new_root.resolve():
                raise RuntimeError(f"both workers imported fedlit from {workers['old'].code}")
            times: dict[str, list[dict]] = {"old": [], "new": []}
            for rep in range(args.repeats):
                for name in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                    times[name].append(workers[name].run())
            for w in workers.values():
                w.close()
            row = {"config": label, "method": method}
            for name, runs in times.items():
                for key in ("ms_per_step", "cpu_ms_per_step"):
                    row[f"{key}_{name}"] = statistics.median(r[key] for r in runs)
                    row[f"{key}_{name}_all"] = [round(r[key], 1) for r in runs]
            rows.append(row)
            print(f"  {label} {method}: " + ", ".join(f"{k[:-4]} {v}" for k, v in row.items() if k.endswith("_all")),
                  file=sys.stderr, flush=True)
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default=OLD_REVISION, help="git revision checked out in a temporary worktree")
    parser.add_argument("--old-root", help="an existing checkout to use as the old code instead of --old")
    parser.add_argument("--new-root", default=str(ROOT), help="the new code (default: this checkout)")
    parser.add_argument("--backbones", nargs="*", default=list(BACKBONES), help=f"{list(BACKBONES)} or tiny")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=4, help="steps of the client's local epoch (B samples each)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=9, help="downloaded experts of a pFedMoAP client")
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8, help="timed epochs per checkout (alternating)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs first (pFedMoAP: at least one, after "
                        "which the worker checks that the client holds K experts)")
    parser.add_argument("--omp-wait-policy", choices=("passive", "active", "default"), default="passive",
                        help="OMP_WAIT_POLICY of the workers (default: leave it unset)")
    parser.add_argument("--profile", type=int, default=0, help="print this many profiler rows per worker")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    temporary = None
    if args.old_root:
        old_root, old_name = Path(args.old_root).resolve(), args.old_root
    else:
        temporary = Path(tempfile.mkdtemp(prefix="fedlit-old-")) / "checkout"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(temporary), args.old],
                       check=True, capture_output=True)
        old_root, old_name = temporary, args.old
    new_root = Path(args.new_root).resolve()
    new_name = subprocess.run(["git", "-C", str(new_root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or str(new_root)
    try:
        print(f"machine: {os.cpu_count()} CPU cores (nproc), {cpu_model()}, torch {torch.__version__}, "
              f"{args.threads} threads per worker, OMP_WAIT_POLICY {args.omp_wait_policy}, load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(f"old: {old_name} ({old_root}); new: {new_name} ({new_root})")
        print(f"one client: B={args.batch}, C={args.classes}, n_ctx={args.n_ctx}, K={args.k} experts (pFedMoAP), "
              f"fp32, cached image features, end-token cut, shared prefix, {args.steps} steps per epoch, "
              f"median of {args.repeats} timed epochs per checkout")
        rows = compare(old_root, new_root, args.backbones, args)
    finally:
        if temporary is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(temporary)],
                           capture_output=True)
            shutil.rmtree(temporary.parent, ignore_errors=True)
    header = (f"{'config':<10} {'method':<9} {'ms/step old':>12} {'ms/step new':>12} {'ratio':>7} "
              f"{'CPU ms old':>11} {'CPU ms new':>11} {'CPU ratio':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        wall_old, wall_new = r["ms_per_step_old"], r["ms_per_step_new"]
        cpu_old, cpu_new = r["cpu_ms_per_step_old"], r["cpu_ms_per_step_new"]
        print(f"{r['config']:<10} {r['method']:<9} {wall_old:>12.1f} {wall_new:>12.1f} {wall_new / wall_old:>6.2f}x "
              f"{cpu_old:>11.1f} {cpu_new:>11.1f} {cpu_new / cpu_old:>8.2f}x")

if __name__ == "__main__":
    main()
