"""Seconds per round and peak memory of the image-side prompt methods (VPT-deep, MaPLe) on ViT-B/16-sized random
weights: the image path's switches side by side, same config, one run.

Variants of each method (``perf.*`` and ``prompt.vision_start_layer``):

* ``uncached``: images through the whole frozen tower at every step and evaluation (``perf.cache_features=false``),
  prompts from block 0, one client at a time;
* ``cached``: the frozen tokens entering block 0 (patch embedding + class token + positional embedding +
  ``ln_pre``) cached once per image;
* ``cached G``: the same with the round's G clients through the tower as one batch (``perf.client_batch=G``);
* ``cached ckpt``: the same as ``cached`` with activation checkpointing (``perf.checkpoint_activations=true``);
* ``uncached L`` / ``cached L``: prompts from block L (``prompt.vision_start_layer=L``): a different model, whose
  cache holds the tokens after the first L frozen blocks, so a step runs only the last layers - L blocks.

Each variant runs in its own subprocess (so peak memory, the resident peak on CPU, is its own). The table gives
seconds per round, the speed-up over ``uncached`` of the same method, the peak memory, the one-off cache time and,
for the variants that must give the same numbers as another, whether the per-round accuracies are identical. A
method this checkout lacks is named and skipped.

    python benchmarks/image_prompts.py                           # vpt + maple, ViT-B-16 (31 min on 2 loaded cores)
    python benchmarks/image_prompts.py --methods vpt --backbone tiny --start-layer 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.round_time import build_bench_job, run_rounds  # noqa: E402

METHODS = ("vpt", "maple")
COLUMNS = ("method", "variant", "start layer", "G", "checkpointing", "s/round", "speed-up", "peak MiB", "cache s",
           "same accuracies as", "same")
# shapes images resized to the backbone's 224 px, a few clients and images: ViT-B/16's cost per image, small N
# (a ViT-B/16 forward + backward of one image takes seconds on a shared 2-core CPU)
DATA = ["data.partition=iid", "data.num_clients=2", "bench.num_classes=2", "data.train_per_class=2",
        "data.test_per_class=1", "data.batch_size=2", "fed.frac=1.0", "fed.local_epochs=1", "run.quiet=true"]


@dataclass(frozen=True)
class Variant:
    """One row: whether the frozen tokens are cached, the first prompted block (0 or the ``--start-layer``),
    clients per group (1 or the ``--group``), activation checkpointing, and the variant whose accuracies it must
    reproduce exactly (None: no such variant)."""

    name: str
    cached: bool
    late_start: bool = False
    grouped: bool = False
    checkpoint: bool = False
    same_as: str | None = None

    def overrides(self, start_layer: int, group: int) -> list[str]:
        """The config overrides of this variant."""
        return [f"perf.cache_features={str(self.cached).lower()}",
                f"prompt.vision_start_layer={start_layer if self.late_start else 0}",
                f"perf.client_batch={group if self.grouped else 1}",
                f"perf.checkpoint_activations={str(self.checkpoint).lower()}"]


VARIANTS = (
    Variant("uncached", cached=False),
    Variant("cached", cached=True, same_as="uncached"),
    Variant("cached G", cached=True, grouped=True, same_as="cached"),
    Variant("cached ckpt", cached=True, checkpoint=True, same_as="cached"),
    Variant("uncached L", cached=False, late_start=True),
    Variant("cached L", cached=True, late_start=True, same_as="uncached L"),
)


def backbone_overrides(name: str) -> list[str]:
    """``backbone.*`` overrides of an open_clip model with random weights, or of a built-in backbone."""
    from fedlit.backbone import LOCAL_NAMES

    return [f"backbone.name={name}"] + ([] if name in LOCAL_NAMES else ["backbone.pretrained=random"])


def run_variant(method: str, variant: Variant, backbone: str, rounds: int, start_layer: int, group: int,
                extra: list[str] = ()) -> dict:
    """Run ``rounds`` rounds of ``method`` as ``variant`` (plus the overrides ``extra``) in this process: seconds per
    round, peak memory (MiB), one-off cache seconds and the per-round per-client accuracies."""
    overrides = (backbone_overrides(backbone) + DATA + [f"algorithm={method}", f"fed.rounds={rounds}"]
                 + variant.overrides(start_layer, group) + list(extra))
    job, cache_seconds = build_bench_job(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        out = run_rounds(job, Path(tmp))
    return {"seconds_per_round": out["seconds_per_round"], "peak_memory_mib": out["peak_memory_mib"],
            "cache_seconds": cache_seconds, "accuracies": out["accuracies"]}


def machine() -> str:
    """The CPU model, cores and torch's threads, and the torch version (one line)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"no GPU used")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--backbone", default="ViT-B-16", help="open_clip name (random weights) or tiny")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--start-layer", type=int, default=6, help="L of the late-start variants")
    parser.add_argument("--group", type=int, default=2, help="G of the grouped variant (the clients of a round)")
    parser.add_argument("--variants", nargs="*", default=[v.name for v in VARIANTS])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = {v.name: v for v in VARIANTS}
    if args.one:
        method, name = args.one
        print(json.dumps(run_variant(method, variants[name], args.backbone, args.rounds, args.start_layer,
                                     args.group, args.set)))
        return
    from fedlit.algorithms import ALGORITHMS

    methods = [m for m in args.methods if m in ALGORITHMS]
    missing = [m for m in args.methods if m not in ALGORITHMS]
    print(f"machine: {machine()}")
    print(f"{args.backbone} random weights, shapes images at its input size, "
          f"{' '.join(o for o in DATA if not o.startswith('run.'))}, {args.rounds} round(s), L={args.start_layer}, "
          f"G={args.group}{''.join(' ' + o for o in args.set)}")
    if missing:
        print(f"missing methods (not in this checkout): {', '.join(missing)}")
    results: dict[tuple[str, str], dict] = {}
    for method in methods:
        for name in args.variants:
            cmd = [sys.executable, __file__, "--one", method, name, "--backbone", args.backbone, "--rounds",
                   str(args.rounds), "--start-layer", str(args.start_layer), "--group", str(args.group),
                   "--set", *args.set]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"{method} {name} failed:\n{done.stderr[-4000:]}")
            results[method, name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {method} {name}: {results[method, name]['seconds_per_round']:.1f} s/round", flush=True)
    print("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for (method, name), r in results.items():
        v = variants[name]
        base = results.get((method, "uncached"))
        speed = f"{base['seconds_per_round'] / r['seconds_per_round']:.2f}x" if base else ""
        ref = results.get((method, v.same_as)) if v.same_as else None
        cells = [method, name, args.start_layer if v.late_start else 0, args.group if v.grouped else 1,
                 "on" if v.checkpoint else "off", f"{r['seconds_per_round']:.2f}", speed,
                 f"{r['peak_memory_mib']:.0f}", f"{r['cache_seconds']:.1f}", v.same_as if ref else "",
                 ("yes" if ref["accuracies"] == r["accuracies"] else "no") if ref else ""]
        print("| " + " | ".join(str(c) for c in cells) + " |")

if __name__ == "__main__":
    main()
