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


def class_names(count: int) -> list[str]:
    """``count`` distinct class names: CIFAR-10's, then numbered repeats of them."""
    names = (CLASSNAMES * (count // len(CLASSNAMES) + 1))[:count]
    return [f"{n} {i}" if i >= len(CLASSNAMES) else n for i, n in enumerate(names)]


def bench_device() -> tuple[torch.device, torch.dtype]:
    """The device the benchmark measures on and its dtype: the GPU in bf16 when one is visible, else CPU fp32."""
    gpu = torch.cuda.is_available()
    return (torch.device("cuda"), torch.bfloat16) if gpu else (torch.device("cpu"), torch.float32)


def text_step_cost(learner, backbone, n_ctx: int, groups: int, device: torch.device, dtype: torch.dtype,
                   repeats: int) -> tuple[float, int]:
    """(median seconds, FLOPs) of one text-side training step of ``groups`` prompts ``(G, n_ctx, W)`` through
    ``learner`` (a :class:`~fedlit.prompts.PromptLearner` on ``device``), under ``dtype`` autocast off the CPU."""
    from fedlit.prompts import init_context

    contexts = torch.stack([init_context(n_ctx, backbone.text_width, None, 0.02, seed=s)
                            for s in range(groups)]).to(device).requires_grad_()
    autocast = torch.autocast(device.type, dtype=dtype) if device.type != "cpu" else contextlib.nullcontext()
    step = encoder_step(learner, backbone, contexts, autocast)
    with FlopCounterMode(display=False) as counter:
        step()
    return seconds_per_call(step, device, repeats), counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="RN50", help="open_clip model name (random weights, no download)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--groups", type=int, nargs="*", default=None, help="G values (default: 1 4 16; GPU adds 64)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    from fedlit.backbone import LOCAL_NAMES, load_backbone
    from fedlit.prompts import PromptLearner

    device, dtype = bench_device()
    gpu = device.type == "cuda"
    groups = args.groups or ([1, 4, 16, 64] if gpu else [1, 4, 16])
    weights = None if args.backbone in LOCAL_NAMES else "random"  # the papers' sizes, random: nothing downloaded
    backbone = load_backbone(args.backbone, weights, device=device)
    names = class_names(args.classes)
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
            seconds, flops = text_step_cost(learner, backbone, args.n_ctx, g, device, dtype, args.repeats)
            achieved = flops / seconds / 1e12
            label = "shared prefix" if share else "per class"
            print(f"{label:<14} {g:>4} {seconds * 1e3:>9.1f} {flops / 1e9:>11.2f} {achieved:>8.3f} "
                  f"{100 * achieved / peak:>8.1f}%")


if __name__ == "__main__":
    main()
