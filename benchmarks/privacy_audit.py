"""The membership-inference audit (``fedlit audit``) of PromptFL and pFedMoAP with and without client-level DP, on
the offline default with one client per class, half of them held out of training (``eval.protocol=heldout``), so
that the client game has members and non-members.

Rows: each variant (PromptFL with one shared context, PromptFL with a context per class, pFedMoAP) without DP and
with central DP at a target epsilon of 8 and 1 (``privacy.clip`` 0.1, as in ``benchmarks/robustness.py``; the
accountant picks the noise multiplier for the planned rounds). Columns: mean client accuracy after the last round
(%), the AUC of the loss-threshold and of the likelihood-ratio attack on the sample game of the global and of the
personalised models, the AUC of the client game (trained vs held-out clients), the largest empirical epsilon lower
bound of the four sample attacks and that of the client attack (95% confidence, see docs/methods.md, *Privacy
audit*), and the accountant's epsilon: client-level as the run records it (what the client game is compared to),
and for one client's data replaced (what the sample games are compared to). The backbone, data and partition are
built once; each row is one run, then its audit.

    python benchmarks/privacy_audit.py                      # configs/default.yaml, 9 runs
    python benchmarks/privacy_audit.py --as-configured      # the default's own 8 clients, none held out
    python benchmarks/privacy_audit.py --rounds 1 --variants promptfl --epsilons 1 -- backbone.name=tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlit.audit import audit  # noqa: E402
from fedlit.config import load_config  # noqa: E402
from fedlit.federation.checkpoint import CHECKPOINT_NAME, restore  # noqa: E402
from fedlit.federation.experiment import build_job  # noqa: E402

DP = ["privacy.clip=0.1", "privacy.delta=1e-5"]
FEDERATION = ["eval.protocol=heldout", "data.num_clients=32", "eval.heldout_fraction=0.5"]
VARIANTS = {"promptfl": ["algorithm=promptfl"],
            "promptfl, ctx per class": ["algorithm=promptfl", "prompt.class_specific=true"],
            "pfedmoap": ["algorithm=pfedmoap"]}


def _cell(value: float | str | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str) or math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _largest(bounds: list[float | str | None]) -> float | None:
    """The largest epsilon lower bound (``"inf"`` as infinity), None when there is none."""
    return max((math.inf if b == "inf" else b for b in bounds if b is not None), default=None)


def main(argv: list[str] | None = None) -> None:
    """Print one markdown table: a row per (variant, DP setting), the columns of the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epsilons", nargs="*", type=float, default=[8.0, 1.0], help="DP targets besides no DP")
    parser.add_argument("--rounds", type=int, default=None, help="fed.rounds (default: the config's)")
    parser.add_argument("--as-configured", action="store_true",
                        help="the config's own federation, no client held out (the client game is n/a)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (after the federation's)")
    args = parser.parse_args(argv)
    settings = [("none", [])] + [(f"ε = {eps:g}", DP + [f"privacy.target_epsilon={eps:g}"]) for eps in args.epsilons]
    with tempfile.TemporaryDirectory() as out:
        federation = [] if args.as_configured else FEDERATION
        common = ["run.quiet=true", f"run.out_dir={out}", *federation, *args.overrides]
        if args.rounds is not None:
            common.append(f"fed.rounds={args.rounds}")
        base = load_config(args.config, common + VARIANTS[args.variants[0]])
        job = build_job(base)
        held = (f", {base.eval.protocol}: {base.eval.heldout_fraction:g} never train"
                if base.eval.heldout_fraction is not None else "")
        print(f"{base.data.name}, {base.data.num_clients} clients ({base.data.partition}{held}), {base.fed.rounds} "
              f"rounds of {base.fed.local_epochs} local epochs, seed {base.seed}, backbone {base.backbone.name}")
        print("| method | DP | accuracy (%) | loss AUC, global | LRT AUC, global | loss AUC, personalised | "
              "LRT AUC, personalised | client AUC | empirical ε ≥, samples | empirical ε ≥, clients | "
              "accountant ε (client) | ε, one client's data | s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for index, variant in enumerate(args.variants):
            for label, overrides in settings:
                t0 = time.perf_counter()
                cfg = load_config(args.config, common + VARIANTS[variant] + overrides)
                folder = Path(out) / f"{index}-{label.replace(' ', '')}"
                orchestrator = dataclasses.replace(job, cfg=cfg).orchestrator(folder)
                results = orchestrator.run()
                state = restore(folder / CHECKPOINT_NAME, orchestrator.identity, orchestrator.store_directory)
                result = audit(orchestrator, state)
                samples = {(r["attack"], r["model"]): r for r in result["attacks"] if r["level"] == "sample"}
                [client] = [r for r in result["attacks"] if r["level"] == "client"] or [None]
                accuracy = 100 * results["rounds"][-1]["acc_mean"]
                aucs = [_cell(samples[a, m]["auc"]) if (a, m) in samples else "n/a"
                        for m in ("global", "personalised") for a in ("loss", "lrt")]
                aucs.append(_cell(client["auc"]) if client else "n/a")
                bounds = [_cell(_largest([r["epsilon_lower_bound"] for r in samples.values()]), 2),
                          _cell(client["epsilon_lower_bound"], 2) if client else "n/a"]
                acc = result["accountant"]
                print(f"| {variant} | {label} | {accuracy:.2f} | " + " | ".join(aucs + bounds)
                      + f" | {_cell(acc['epsilon'], 2)} | {_cell(acc['epsilon_replace_one'], 2)}"
                      + f" | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
