"""PromptFL and pFedMoAP under Byzantine clients, robust aggregation and client-level DP, on the offline default.

Rows: no attack; 20% sign-flipping clients (``attack.scale=10``: each uploads -10 times its own update) with the
plain mean and with each robust aggregator (``robust.f`` = the attackers' count); central client-level DP at a
target epsilon of 1, 8 and 50 (``privacy.clip`` 0.1, about the median honest update norm here; the accountant picks
the noise multiplier for the planned rounds). Columns: mean per-client accuracy after the last round (%), per method,
over the same clients in every row: the 8 that are honest in the attacked rows. The backbone, the data and the
partition are built once; each row is one run.

Defaults: ``configs/default.yaml`` (8 clients, 5 rounds of 5 local epochs) but 10 clients, so that 20% is 2
clients. ``--rounds`` shortens the runs (the DP rows then calibrate the noise for those rounds).

    python benchmarks/robustness.py                  # about 6 minutes on 2 CPU cores (26 runs)
    python benchmarks/robustness.py --rounds 2 --methods promptfl
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlit.config import AGGREGATORS, load_config  # noqa: E402
from fedlit.federation.experiment import build_job  # noqa: E402
from fedlit.federation.sampling import attacked_clients  # noqa: E402

ATTACK = ["attack.kind=sign_flip", "attack.fraction=0.2", "attack.scale=10", "robust.f=2"]
DP = ["privacy.clip=0.1", "privacy.delta=1e-5"]


def rows() -> dict[str, list[str]]:
    """Row label -> the overrides of that row."""
    out = {"no attack": [], "20% sign-flip, mean": ATTACK}
    out.update({f"20% sign-flip, {name}": ATTACK + [f"robust.aggregator={name}"] for name in AGGREGATORS
                if name != "mean"})
    out.update({f"DP, epsilon = {eps}": DP + [f"privacy.target_epsilon={eps}"] for eps in (1, 8, 50)})
    return out


def common_overrides(out: str, clients: int, rounds: int | None, extra: list[str]) -> list[str]:
    """The overrides every run of a robustness table shares: quiet, under ``out``, ``clients`` clients, ``rounds``
    rounds (None: the config's) and the user's ``extra`` ones."""
    common = ["run.quiet=true", f"run.out_dir={out}", f"data.num_clients={clients}", *extra]
    return common + ([f"fed.rounds={rounds}"] if rounds is not None else [])


def run_row(job, cfg, run_dir: Path, clients: list[int]) -> tuple[float, dict]:
    """Run ``cfg`` on ``job``'s backbone, data and partition in ``run_dir``: the mean accuracy (%) of ``clients``
    after the last round, and that round's row of ``results.json``."""
    last = dataclasses.replace(job, cfg=cfg).orchestrator(run_dir).run()["rounds"][-1]
    return 100 * sum(last["accuracy"][c] for c in clients) / len(clients), last


def main(argv: list[str] | None = None) -> None:
    """Print one table: rows of :func:`rows`, one accuracy column per method (and the noise multiplier of DP)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--methods", nargs="+", default=["promptfl", "pfedmoap"])
    parser.add_argument("--rounds", type=int, default=None, help="fed.rounds (default: the config's)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        common = common_overrides(out, args.clients, args.rounds, args.overrides)
        base = load_config(args.config, common + [f"algorithm={args.methods[0]}"])
        job = build_job(base)
        honest = [c for c in range(args.clients) if c not in attacked_clients(base.seed, args.clients, 0.2)]
        print(f"{base.data.name}, {args.clients} clients, {base.fed.rounds} rounds of {base.fed.local_epochs} local "
              f"epochs, seed {base.seed}; mean accuracy of clients {honest} after the last round (%)")
        header = f"{'setting':<36}" + "".join(f"{m:>10}" for m in args.methods) + f"{'z':>8}{'epsilon':>9}{'s':>7}"
        print(header)
        for label, overrides in rows().items():
            t0, accuracies, eps, z = time.perf_counter(), [], "", ""
            for method in args.methods:
                cfg = load_config(args.config, common + [f"algorithm={method}", *overrides])
                accuracy, last = run_row(job, cfg, Path(out) / label.replace(" ", "_") / method, honest)
                accuracies.append(accuracy)
                if "epsilon" in last:
                    eps, z = f"{last['epsilon']:.2f}", f"{last['noise_multiplier']:.3f}"
            print(f"{label:<36}" + "".join(f"{a:>10.2f}" for a in accuracies)
                  + f"{z:>8}{eps:>9}{time.perf_counter() - t0:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
