"""What CoCoOp's per-image text pass costs: one training step (forward + backward) of a batch of B cached image
features over C classes, CoOp (one pass over C prompts) against CoCoOp (B x C prompts) at several
``method.cocoop_chunk`` values. FLOPs come from ``torch.utils.flop_counter``; peak memory is the step's own peak
(``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the rise of the process's resident peak, ``VmHWM``, over
its resident size before the step, each configuration in a fresh process).

    python benchmarks/cocoop_cost.py                                    # tiny backbone, 32 classes, B = 32
    python benchmarks/cocoop_cost.py --backbone ViT-B-16 --classes 10 --batch 32 --chunks 0 8 1
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (0 where there is none)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _build(args, method: str, chunk: int):
    from fedlit.backbone import load_backbone
    from fedlit.modules.cocoop import CoCoOpClient
    from fedlit.modules.coop import CoOpClient

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that a random backbone has no weights
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone, pretrained=None) if args.backbone != "tiny" else load_backbone("tiny")
    names = [f"{CLASSNAMES[i % len(CLASSNAMES)]} {i}" for i in range(args.classes)]
    prompt = {"n_ctx": args.n_ctx}
    module = (CoOpClient(backbone, names, prompt=prompt, seed=0) if method == "coop"
              else CoCoOpClient(backbone, names, chunk=chunk, prompt=prompt, seed=0))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device)
    features = torch.nn.functional.normalize(torch.randn(args.batch, backbone.feature_dim, device=device), dim=-1)
    labels = torch.arange(args.batch, device=device) % args.classes
    return module, features, labels, device


def _step(module, features, labels) -> None:
    module.zero_grad(set_to_none=True)
    module.loss(module(features), labels).backward()


def measure(args, method: str, chunk: int, queue) -> None:
    """One configuration in this (fresh) process: ``{s, gflop, peak_mib}`` onto ``queue``."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    module, features, labels, device = _build(args, method, chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kib("VmRSS") * 1024
    _step(module, features, labels)  # the first step sets the peak (later ones reuse freed memory)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kib("VmHWM") * 1024 - base
    with FlopCounterMode(display=False) as counter:
        _step(module, features, labels)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        _step(module, features, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    queue.put({"s": sorted(times)[len(times) // 2], "gflop": counter.get_total_flops() / 1e9,
               "peak_mib": peak / 2**20})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tiny", help="tiny, or an open_clip model name (random weights)")
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=4, help="context tokens (CoCoOp's scripts use 4)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 8, 1], help="method.cocoop_chunk values")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    print(f"{args.backbone}: C = {args.classes}, B = {args.batch}, n_ctx = {args.n_ctx}, one training step, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}, torch {torch.__version__}")
    print(f"{'method':<10} {'chunk':>5} {'text seqs':>9} {'s/step':>8} {'GFLOP':>9} {'peak MiB':>9}")
    for method, chunk in [("coop", 0), *[("cocoop", c) for c in args.chunks]]:
        queue = context.Queue()
        child = context.Process(target=measure, args=(args, method, chunk, queue))
        child.start()
        row = queue.get()
        child.join()
        seqs = args.classes * (1 if method == "coop" else args.batch)
        label = "all" if method == "coop" or chunk == 0 or chunk >= args.batch else str(chunk)
        print(f"{method:<10} {label:>5} {seqs:>9} {row['s']:>8.3f} {row['gflop']:>9.2f} {row['peak_mib']:>9.1f}")
    print(json.dumps({"args": vars(args)}))


if __name__ == "__main__":
    main()
