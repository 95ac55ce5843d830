"""Round time of the straightforward path vs the optimised paths, same config, same numbers.

(a) straightforward: image features recomputed at every step and evaluation, full 77-token text sequences, one
    client at a time;
(b) optimised: cached image features, end-token cut, shared-prefix text encoding, per-round expert features,
    matrix-product evaluation, clients grouped as ``perf.client_batch=0`` (auto) decides;
(c) the same with G clients through the text encoder together (``--group``, default 10: the whole round).

Each path of each config runs in its own subprocess (so peak memory is its own). Prints one table: seconds per
round, client-steps per second, peak memory, the ratio, and whether the per-client accuracies are identical.
Also prints the memory of 1,000 simulated clients of the CIFAR-100 setting.

    python benchmarks/round_time.py                      # all configs (tens of minutes on 2 CPU cores)
    python benchmarks/round_time.py --configs cifar10-vitb32 --rounds 1 --group 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Random backbones of the papers' sizes on shapes images resized to 224 (no downloads); a class subset of shapes
# stands in for CIFAR-10's 10 classes.
CONFIGS: dict[str, list[str]] = {
    "cifar10-rn50": ["backbone.name=RN50", "backbone.pretrained=random", "data.partition=dirichlet",
                     "data.alpha=0.5", "data.min_size=4",
                     "data.num_clients=10", "bench.num_classes=10", "data.train_per_class=20",
                     "data.test_per_class=8"],
    "cifar10-vitb32": ["backbone.name=ViT-B-32", "backbone.pretrained=random", "data.partition=dirichlet",
                       "data.alpha=0.5", "data.min_size=4",
                       "data.num_clients=10", "bench.num_classes=10", "data.train_per_class=20",
                       "data.test_per_class=8"],
    "pathological10-rn50": ["backbone.name=RN50", "backbone.pretrained=random", "data.partition=pathological",
                            "data.num_clients=10",
                            "bench.num_classes=20", "data.shots=8", "data.train_per_class=8",
                            "data.test_per_class=8"],
}
SMOKE = {"tiny": ["backbone.name=tiny", "gate.d_gate=16", "data.partition=dirichlet", "data.alpha=0.5",
                  "data.min_size=4", "data.num_clients=10", "bench.num_classes=10", "data.train_per_class=20",
                  "data.test_per_class=8"]}
COMMON = ["algorithm=pfedmoap", "fed.frac=1.0", "fed.local_epochs=5", "method.num_experts=10", "run.quiet=true"]


def _split_bench(overrides: list[str]) -> tuple[list[str], int]:
    classes = [int(o.split("=")[1]) for o in overrides if o.startswith("bench.num_classes=")]
    return [o for o in overrides if not o.startswith("bench.")], (classes[0] if classes else 0)


def restrict_classes(bundle, num_classes: int):
    """The first ``num_classes`` classes of a shapes bundle (a CIFAR-10-sized label space)."""
    from fedlit.data.shapes import ShapesImages

    def subset(split):
        keep = np.flatnonzero(split.targets < num_classes)
        return ShapesImages(split.images[keep], torch.as_tensor(split.targets[keep]), split.transform)

    bundle.train, bundle.test = subset(bundle.train), subset(bundle.test)
    bundle.classnames = bundle.classnames[:num_classes]
    bundle.transform_id += f"-first{num_classes}"
    return bundle


def build_bench_job(overrides: list[str], fabric=None, config: str | Path | None = None):
    """The :class:`~fedlit.federation.experiment.Job` of the YAML file ``config`` (None: the defaults) with
    ``overrides`` (config overrides plus the benchmark's own ``bench.num_classes=C``: the first C classes of the
    dataset) on ``fabric.device`` (CPU without Fabric), and the seconds its one-off image cache took (features or
    tokens, as ``perf.cache_features`` and the method ask)."""
    from fedlit.backbone import load_backbone
    from fedlit.config import load_config
    from fedlit.data.features import FeatureCache
    from fedlit.data.partition import make_partition
    from fedlit.data.registry import build_dataset
    from fedlit.federation.client_data import build_client_data
    from fedlit.federation.experiment import Job

    config_overrides, num_classes = _split_bench(overrides)
    cfg = load_config(config, config_overrides)
    device = fabric.device if fabric is not None else torch.device("cpu")
    backbone = load_backbone(cfg.backbone.name, cfg.backbone.pretrained, device=device, progress=False)
    bundle = build_dataset(cfg.data, backbone.preprocess)
    if num_classes:
        bundle = restrict_classes(bundle, num_classes)
    partition = make_partition(bundle, cfg.data, cfg.seed)
    t0 = time.perf_counter()
    data = build_client_data(cfg, backbone, bundle, partition, device, FeatureCache(None))
    return Job(cfg, backbone, bundle, partition, data, fabric), time.perf_counter() - t0


def run_rounds(job, run_dir: Path, name: str | None = None) -> dict:
    """Run algorithm ``name`` (default ``job.cfg.algorithm``) of ``job`` into ``run_dir``; returns its mean
    seconds per round, client-steps per second, peak memory of the process (CUDA: max allocated during the run),
    per-round mean accuracies, and the orchestrator (its checkpoint is in ``run_dir``)."""
    from fedlit.federation.orchestrator import peak_memory_bytes

    cfg, device = job.cfg, job.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    orchestrator = job.orchestrator(Path(run_dir), name)
    results = orchestrator.run()
    rows = list((Path(run_dir) / "metrics.csv").read_text().splitlines())
    column = rows[0].split(",").index("seconds")
    seconds = float(np.mean([float(r.split(",")[column]) for r in rows[1:]]))
    steps_per_round = sum(math.ceil(len(ix) / cfg.data.batch_size) for ix in job.partition.train_indices)
    steps_per_round *= cfg.fed.local_epochs
    return {
        "seconds_per_round": seconds,
        "client_steps_per_second": steps_per_round / seconds,
        "peak_memory_mib": peak_memory_bytes(device) / 2**20,
        "accuracies": [r["accuracy"] for r in results["rounds"]],
        "classes": len(job.bundle.classnames),
        "orchestrator": orchestrator,
    }


def run_one_path(name: str, optimised: bool, rounds: int, client_batch: int) -> dict:
    """Run ``rounds`` rounds of config ``name`` on one path in this process; returns timings and accuracies."""
    perf = ([f"perf.client_batch={client_batch}"] if optimised else
            ["perf.cache_features=false", "perf.cut_text=false", "perf.share_prefix=false",
             "perf.client_batch=1"])
    job, cache_seconds = build_bench_job(COMMON + {**CONFIGS, **SMOKE}[name] + perf + [f"fed.rounds={rounds}"])
    with tempfile.TemporaryDirectory() as tmp:
        out = run_rounds(job, Path(tmp))
    out.pop("orchestrator")
    return {**out, "feature_cache_seconds": cache_seconds}


def memory_of_many_clients(num_clients: int = 1000) -> dict:
    """Allocate the real per-client state of the CIFAR-100 pFedMoAP setting (RN50: D=1024, W=512, n_ctx=16,
    d_g=128, K=9, persistent momentum) for ``num_clients`` clients plus CIFAR-100's cached features (60,000 x
    1024 fp32), and measure the process's resident memory."""
    from fedlit.gating import AttentionGate

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    before = rss()
    gate_numel = sum(p.numel() for p in AttentionGate(1024).parameters())
    features = torch.randn(60_000, 1024)
    store = {}
    for cid in range(num_clients):
        ctx = torch.randn(16, 512)
        store[cid] = {"state": {"ctx": ctx, "gate": torch.randn(gate_numel), "momentum.ctx": torch.randn(16, 512),
                                "momentum.gate": torch.randn(gate_numel)},
                      "experts": torch.randn(9, 16, 512)}
    used = rss() - before
    del features, store
    return {"clients": num_clients, "resident_mib": used / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), help=f"any of {list(CONFIGS) + list(SMOKE)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--group", type=int, default=10, help="G of path (c): clients batched together")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, path = args.one
        print(json.dumps(run_one_path(name, path != "a", args.rounds, args.group if path == "c" else 0)))
        return
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    labels = {"a": "straightforward", "b": "optimised", "c": f"optimised G={args.group}"}
    rows = []
    for name in args.configs:
        out = {}
        for path in labels:
            cmd = [sys.executable, __file__, "--one", name, path, "--rounds", str(args.rounds), "--group",
                   str(args.group)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"{name} path {path} failed:\n{done.stderr[-4000:]}")
            out[path] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {name} ({labels[path]}): "
                  f"{out[path]['seconds_per_round']:.1f} s/round", flush=True)
        rows.append((name, out))
    header = (f"{'config':<22} {'path':<18} {'s/round':>9} {'steps/s':>8} {'peak MiB':>9} {'ratio':>7} "
              f"{'same acc':>8}")
    print("\n" + header + "\n" + "-" * len(header))
    for name, out in rows:
        a = out["a"]
        for path, label in labels.items():
            r = out[path]
            ratio = f"{a['seconds_per_round'] / r['seconds_per_round']:.1f}x" if path != "a" else ""
            same = str(a["accuracies"] == r["accuracies"]) if path != "a" else ""
            print(f"{name:<22} {label:<18} {r['seconds_per_round']:>9.2f} {r['client_steps_per_second']:>8.2f} "
                  f"{r['peak_memory_mib']:>9.0f} {ratio:>7} {same:>8}")
        print(f"{'':<22} (optimised paths' one-off feature cache: {out['b']['feature_cache_seconds']:.1f} s, "
              f"{out['b']['classes']} classes)")
    mem = memory_of_many_clients()
    print(f"\n{mem['clients']} simulated clients of the CIFAR-100 setting (state + experts + momentum + cached "
          f"features): {mem['resident_mib']:.0f} MiB resident")


if __name__ == "__main__":
    main()
