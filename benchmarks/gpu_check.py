"""Everything fedlit measures only on a GPU, in one run (under 8 minutes on one GPU), printed as one table.

Rows (``check`` column):

* ``bf16 agreement``: the quickstart (``configs/default.yaml``, 2 rounds) of PromptFL, pFedMoAP, VPT and MaPLe, once
  with ``trainer.precision=32-true`` and once with ``bf16-mixed``: the largest difference of the final per-client
  accuracies (percentage points), of the global state's tensors (the global prompt) and of the logits of client
  0's final model on its test inputs;
* ``round time``: seconds per round of pFedMoAP and MaPLe on ViT-B/16-sized random weights (shapes images at 224
  px, 10 clients of 10 classes, all sampled, 2 local epochs, G = 10 clients per group, bf16-mixed);
* ``memory per client``: in the same runs, (``torch.cuda.max_memory_allocated`` − memory held before the run:
  backbone, cached inputs) / G;
* ``matmul peak`` and ``text encoder``: a bf16 8192² matmul (fp32 on the CPU) and the text-side training step of
  ``benchmarks/text_encoder.py`` (ViT-B/16 text tower, 10 classes, n_ctx 16) in TFLOP/s and % of that peak.

Nothing needs a GPU: without one the script says so in one line and exits 0. ``--cpu-smoke`` runs every row on
the CPU with tiny sizes (tiny backbone, bf16 autocast on the CPU), for the test of the table's shape; its numbers
mean nothing. A method this checkout lacks gets a ``missing`` row.

    python benchmarks/gpu_check.py              # make gpu-check
    python benchmarks/gpu_check.py --cpu-smoke  # seconds, on any machine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.round_time import build_bench_job, run_rounds  # noqa: E402
from benchmarks.text_encoder import class_names, matmul_peak_tflops, text_step_cost  # noqa: E402

QUICKSTART = ROOT / "configs" / "default.yaml"
AGREEMENT_METHODS = ("promptfl", "pfedmoap", "vpt", "maple")
ROUND_TIME_METHODS = ("pfedmoap", "maple")
PRECISIONS = ("32-true", "bf16-mixed")
LOGIT_SAMPLES = 512  # test inputs whose logits are compared
COLUMNS = ("check", "method", "setting", "value", "unit")
MISSING = "missing"


@dataclass(frozen=True)
class Sizes:
    """The sizes of one mode: overrides of the quickstart for the agreement rows, the config of the round-time
    rows, clients per group, and the text-encoder step."""

    quickstart: tuple[str, ...]
    large: tuple[str, ...]
    large_label: str
    group: int
    text_classes: int
    text_n_ctx: int
    text_groups: tuple[int, ...]
    matmul_size: int
    repeats: int


GPU_SIZES = Sizes(
    quickstart=("fed.rounds=2", "eval.diagnostics=false"),
    large=("backbone.name=ViT-B-16", "backbone.pretrained=random", "data.partition=dirichlet", "data.alpha=0.5",
           "data.min_size=4", "data.num_clients=10", "bench.num_classes=10", "data.train_per_class=20",
           "data.test_per_class=8", "fed.frac=1.0", "fed.rounds=2", "fed.local_epochs=2", "method.num_experts=9"),
    large_label="ViT-B-16 random, 224 px, 10 clients x 10 classes, 2 local epochs",
    group=10, text_classes=10, text_n_ctx=16, text_groups=(16, 64), matmul_size=8192, repeats=10)
SMOKE_SIZES = Sizes(
    quickstart=("backbone.name=tiny", "data.partition=dirichlet", "data.alpha=0.5", "data.min_size=2",
                "data.num_clients=3", "bench.num_classes=4", "data.train_per_class=4", "data.test_per_class=2",
                "fed.rounds=1", "fed.local_epochs=1", "method.num_experts=2", "gate.d_gate=16",
                "eval.diagnostics=false"),
    large=("backbone.name=tiny", "data.partition=dirichlet", "data.alpha=0.5", "data.min_size=2",
           "data.num_clients=3", "bench.num_classes=4", "data.train_per_class=4", "data.test_per_class=2",
           "fed.frac=1.0", "fed.rounds=1", "fed.local_epochs=1", "method.num_experts=2", "gate.d_gate=16"),
    large_label="tiny backbone, 3 clients x 4 classes (smoke)",
    group=3, text_classes=4, text_n_ctx=4, text_groups=(2,), matmul_size=256, repeats=1)


def available_methods() -> set[str]:
    """The method names this checkout has (``fedlit.algorithms.ALGORITHMS``)."""
    from fedlit.algorithms import ALGORITHMS

    return set(ALGORITHMS)


def resident_bytes(device: torch.device) -> int:
    """Memory this process holds now: allocated CUDA memory on a GPU, the resident set size (``VmRSS``) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def bench_job(overrides: list[str], cpu: bool, config: Path | None = None):
    """The job of ``overrides`` (on ``config``) under a launched Fabric of its ``trainer.*`` settings (on the CPU
    when ``cpu``), and the seconds of its one-off image cache."""
    from fedlit.config import load_config
    from fedlit.federation.experiment import make_fabric

    overrides = [*overrides, "run.quiet=true"] + (["trainer.accelerator=cpu"] if cpu else [])
    fabric = make_fabric(load_config(config, [o for o in overrides if not o.startswith("bench.")]))
    return build_bench_job(overrides, fabric, config)


@torch.no_grad()
def final_model(out: dict) -> dict:
    """Of a finished :func:`~benchmarks.round_time.run_rounds` output: the final per-client accuracies, the global
    state's tensors (float32, CPU) and the logits ``(N, C)`` of the final model on the first
    :data:`LOGIT_SAMPLES` test inputs of client 0's final model (as it is evaluated) under the run's autocast."""
    from fedlit.federation.checkpoint import CHECKPOINT_NAME, restore
    from fedlit.federation.evaluation import EvalModel

    orchestrator = out["orchestrator"]
    state = restore(orchestrator.run_dir / CHECKPOINT_NAME, orchestrator.identity, orchestrator.store_directory)
    algorithm, trainer, module = orchestrator.algorithm, orchestrator.trainer, orchestrator.module
    entry = state.store.get_many([0]).get(0)
    plan = algorithm.eval_plan(state.server, 0, entry, orchestrator.initial)
    model = EvalModel(trainer)
    model.use(plan)
    part = orchestrator.data.partition
    index = torch.as_tensor(part.test_indices[0], dtype=torch.long)[:LOGIT_SAMPLES]
    inputs = orchestrator.data.test_inputs(index).to(trainer.device)
    with trainer.autocast():
        logits = module.logits_from(module.image_features(inputs), model.text())
    final = state.per_client[-1]["accuracy"]
    return {"accuracy": final, "global": {k: v.detach().float().cpu() for k, v in state.server.global_state.items()
                                          if isinstance(v, Tensor)},
            "logits": logits.float().cpu()}


def agreement_rows(method: str, sizes: Sizes, cpu: bool) -> list[dict]:
    """The three ``bf16 agreement`` rows of ``method``: 32-true against bf16-mixed on the shortened quickstart."""
    finals = {}
    for precision in PRECISIONS:
        job, _ = bench_job([*sizes.quickstart, f"algorithm={method}", f"trainer.precision={precision}"], cpu,
                           QUICKSTART)
        with tempfile.TemporaryDirectory() as tmp:
            finals[precision] = final_model(run_rounds(job, Path(tmp)))
    a, b = (finals[p] for p in PRECISIONS)
    accuracy = max(abs(x - y) for x, y in zip(a["accuracy"], b["accuracy"]) if x is not None and y is not None)
    shared = sorted(a["global"].keys() & b["global"].keys())
    prompt = max((float((a["global"][k] - b["global"][k]).abs().max()) for k in shared), default=float("nan"))
    logits = float((a["logits"] - b["logits"]).abs().max())
    mean = {p: 100 * sum(v for v in f["accuracy"] if v is not None) / sum(v is not None for v in f["accuracy"])
            for p, f in finals.items()}
    setting = "quickstart, " + ", ".join(o for o in sizes.quickstart if o.startswith("fed.rounds"))
    return [
        row("bf16 agreement", method, f"{setting}; mean acc fp32 {mean['32-true']:.2f}%, bf16 "
            f"{mean['bf16-mixed']:.2f}%", 100 * accuracy, "max abs diff of acc (pp)"),
        row("bf16 agreement", method, f"global state: {', '.join(shared) or 'none'}", prompt, "max abs diff"),
        row("bf16 agreement", method, f"logits of client 0's model on its {len(a['logits'])} test inputs, fp32 "
            f"max abs logit {float(a['logits'].abs().max()):.1f}", logits, "max abs diff"),
    ]


def round_time_rows(method: str, sizes: Sizes, cpu: bool) -> tuple[list[dict], object]:
    """The ``round time`` and ``memory per client`` rows of ``method`` (bf16-mixed, G clients per group), and the
    job's backbone (for the text-encoder rows)."""
    job, cache_seconds = bench_job([*sizes.large, f"algorithm={method}", f"perf.client_batch={sizes.group}",
                                    "trainer.precision=bf16-mixed"], cpu)
    before = resident_bytes(job.device)
    with tempfile.TemporaryDirectory() as tmp:
        out = run_rounds(job, Path(tmp))
    peak = out["peak_memory_mib"]
    label = f"{sizes.large_label}, G={sizes.group}, bf16-mixed"
    return [
        row("round time", method, f"{label}; one-off image cache {cache_seconds:.1f} s",
            out["seconds_per_round"], "s/round"),
        row("memory per client", method, f"(peak {peak:.0f} MiB - {before / 2**20:.0f} MiB before the run) / "
            f"{sizes.group}", (peak - before / 2**20) / sizes.group, "MiB"),
    ], job.backbone


def text_encoder_rows(backbone, sizes: Sizes, device: torch.device) -> list[dict]:
    """``matmul peak`` and the ``text encoder`` rows (per class and shared prefix, each G of the sizes)."""
    from fedlit.prompts import PromptLearner

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # text_step_cost autocasts off the CPU only
    peak = matmul_peak_tflops(device, dtype, sizes.matmul_size, sizes.repeats)
    rows = [row("matmul peak", "-", f"{str(dtype).removeprefix('torch.')} {sizes.matmul_size}x{sizes.matmul_size}",
                peak, "TFLOP/s")]
    names = class_names(sizes.text_classes)
    for share in (False, True):
        learner = PromptLearner(backbone, names, n_ctx=sizes.text_n_ctx, seed=0, share_prefix=share).to(device)
        for g in sizes.text_groups:
            seconds, flops = text_step_cost(learner, backbone, sizes.text_n_ctx, g, device, dtype, sizes.repeats)
            achieved = flops / seconds / 1e12
            path = "shared prefix" if share else "per class"
            rows.append(row("text encoder", "-", f"{backbone.name} text tower, {path}, G={g}, {sizes.text_classes} "
                            f"classes, n_ctx {sizes.text_n_ctx}; {100 * achieved / peak:.1f}% of peak", achieved,
                            "TFLOP/s"))
    return rows


def row(check: str, method: str, setting: str, value: float | str, unit: str) -> dict:
    """One table row."""
    return {"check": check, "method": method, "setting": setting, "value": value, "unit": unit}


def missing_rows(check: str, method: str) -> list[dict]:
    """The row standing for a check of a method this checkout lacks."""
    return [row(check, method, "method not in this checkout", MISSING, "")]


def markdown(rows: list[dict]) -> str:
    """``rows`` as one markdown table with :data:`COLUMNS` (floats with 4 significant digits)."""

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="every row on the CPU with tiny sizes (a test)")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no GPU is visible (torch.cuda.is_available() is False), nothing measured; "
              "--cpu-smoke runs the rows on the CPU with tiny sizes")
        return
    start = time.perf_counter()
    sizes, cpu = (SMOKE_SIZES, True) if args.cpu_smoke else (GPU_SIZES, False)
    device = torch.device("cpu" if cpu else "cuda")
    where = "CPU (smoke: tiny sizes, numbers mean nothing)" if cpu else torch.cuda.get_device_name(device)
    print(f"device: {where}; torch {torch.__version__}", flush=True)
    have = available_methods()
    missing = sorted({m for m in AGREEMENT_METHODS + ROUND_TIME_METHODS if m not in have})
    rows: list[dict] = []
    for method in AGREEMENT_METHODS:
        rows += agreement_rows(method, sizes, cpu) if method in have else missing_rows("bf16 agreement", method)
        print(f"  bf16 agreement {method}: done", flush=True)
    backbone = None
    for method in ROUND_TIME_METHODS:
        if method in have:
            more, backbone = round_time_rows(method, sizes, cpu)
            rows += more
        else:
            rows += missing_rows("round time", method) + missing_rows("memory per client", method)
        print(f"  round time {method}: done", flush=True)
    if backbone is not None:
        rows += text_encoder_rows(backbone, sizes, device)
    print("\n" + markdown(rows))
    if missing:
        print(f"\nmissing methods (not in this checkout): {', '.join(missing)}")
    print(f"\ngpu_check took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
