"""Achieved throughput of the prompt text encoder as a fraction of the device's measured matrix-multiply peak.

One training step of the text side: the text features of G clients' prompts for C classes (forward), then the
gradient with respect to the contexts (backward; the frozen weights get none). FLOPs are counted by
``torch.utils.flop_counter`` on the ops that actually run, so the shared-prefix path is credited only with the
work it does. The peak is a large square matmul in the same dtype on the same device, timed in the same run.
On a GPU the step runs under bf16 autocast (as ``trainer.precision=bf16-mixed``); on CPU in fp32.

    python benchmarks/text_encoder.py                               # RN50 text tower, 10 classes, n_ctx 16
    python benchmarks/text_encoder.py --backbone ViT-B-16 --groups 1 16 64
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """TFLOP/s of an ``size x size`` matmul in ``dtype`` (2 * size^3 FLOPs per call)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / seconds_per_call(lambda: a @ b, device, repeats) / 1e12


def encoder_step(learner, backbone, contexts: torch.Tensor, autocast: contextlib.AbstractContextManager):
    """A closure running one forward + context-gradient backward of ``contexts (G, n_ctx, W)``."""

    def step() -> None:
        contexts.grad = None
        with autocast:
            features = learner.text_features(backbone, contexts)  # (G, C, D)
        features.float().square().sum().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="RN50", help="open_clip model name (random weights, no download)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--groups", type=int, nargs="*", default=None, help="G values (default: 1 4 16; GPU adds 64)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    from fedlit.backbone import LOCAL_NAMES, load_backbone
    from fedlit.prompts import PromptLearner, init_context

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    groups = args.groups or ([1, 4, 16, 64] if gpu else [1, 4, 16])
    weights = None if args.backbone in LOCAL_NAMES else "random"  # the papers' sizes, random: nothing downloaded
    backbone = load_backbone(args.backbone, weights, device=device)
    names = (CLASSNAMES * (args.classes // len(CLASSNAMES) + 1))[: args.classes]
    names = [f"{n} {i}" if i >= len(CLASSNAMES) else n for i, n in enumerate(names)]
    peak = matmul_peak_tflops(device, dtype, 8192 if gpu else 2048, args.repeats)
    threads = f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name(device) if gpu else threads
    print(f"device: {where}; torch {torch.__version__}; {dtype}; measured matmul peak {peak:.2f} TFLOP/s")
    print(f"text tower of {args.backbone} (width {backbone.text_width}), {args.classes} classes, n_ctx {args.n_ctx}")

    header = f"{'path':<14} {'G':>4} {'ms/step':>9} {'GFLOP/step':>11} {'TFLOP/s':>8} {'% of peak':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for share in (False, True):
        learner = PromptLearner(backbone, names, n_ctx=args.n_ctx, seed=0, share_prefix=share).to(device)
        for g in groups:
            contexts = torch.stack([init_context(args.n_ctx, backbone.text_width, None, 0.02, seed=s)
                                    for s in range(g)]).to(device).requires_grad_()
            autocast = torch.autocast(device.type, dtype=dtype) if gpu else contextlib.nullcontext()
            step = encoder_step(learner, backbone, contexts, autocast)
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
            seconds = seconds_per_call(step, device, args.repeats)
            achieved = flops / seconds / 1e12
            label = "shared prefix" if share else "per class"
            print(f"{label:<14} {g:>4} {seconds * 1e3:>9.1f} {flops / 1e9:>11.2f} {achieved:>8.3f} "
                  f"{100 * achieved / peak:>8.1f}%")


if __name__ == "__main__":
    main()
