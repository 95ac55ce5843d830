"""pFedMoAP under expert poisoning: honest accuracy against the share of Byzantine clients, per pool defence.

Attacks (docs/methods.md, *Expert poisoning*), each on what the server aggregates and what the pool stores
(``attack.target=both``): ``sign_flip`` (``attack.scale=10``: the pool prompt is ``P_g - 10 Δ_i``) and ``mislead``
(trained on flipped labels, then placed at half the honest median distance from the honest centroid, where the
nearest-neighbour selection picks it). Defences: none; the distance filter (``robust.pool_filter=2``); byzfl's NNM on
the pool (``robust.pool_pre=nnm``, ``robust.f=4``); clipping of the pool around the global prompt
(``robust.pool_pre=clipping``, ``robust.pre_clip=0.2``); the gate cap (``gate.cap=0.1``, each downloaded expert at most
10% of the weight). Columns: attack fraction 0, 10%, 20%, 40% of the clients; each cell the mean accuracy (%) after
the last round over the clients that are honest in every column, and (after the slash) the mean gate weight (%)
honest clients give to poisoned experts (``poison_attention``). The backbone, data and partition are built once.

Defaults: ``configs/default.yaml`` (pathological shapes, 5 local epochs, 4 experts) with 10 clients and 3 rounds.

    python benchmarks/expert_poisoning.py                      # 35 runs: 20-35 minutes on 2 shared CPU cores
    python benchmarks/expert_poisoning.py --rounds 1 --attacks mislead --defences none cap
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.robustness import common_overrides, run_row  # noqa: E402
from fedlit.config import load_config  # noqa: E402
from fedlit.federation.experiment import build_job  # noqa: E402
from fedlit.federation.sampling import attacked_clients  # noqa: E402

FRACTIONS = (0.0, 0.1, 0.2, 0.4)
ATTACKS = {"sign_flip": ["attack.kind=sign_flip", "attack.scale=10"], "mislead": ["attack.kind=mislead"]}
DEFENCES = {
    "none": [],
    "filter": ["robust.pool_filter=2"],
    "nnm": ["robust.pool_pre=nnm", "robust.f=4"],
    "clipping": ["robust.pool_pre=clipping", "robust.pre_clip=0.2"],
    "cap": ["gate.cap=0.1"],
}


def honest_everywhere(seed: int, clients: int) -> list[int]:
    """The clients honest at every attack fraction of the table."""
    attacked = {c for f in FRACTIONS for c in attacked_clients(seed, clients, f)}
    return [c for c in range(clients) if c not in attacked]


def main(argv: list[str] | None = None) -> None:
    """Print one table per attack: a row per defence, a column per attack fraction."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=list(DEFENCES))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        common = common_overrides(out, args.clients, args.rounds, ["algorithm=pfedmoap", *args.overrides])
        base = load_config(args.config, common)
        job = build_job(base)
        honest = honest_everywhere(base.seed, args.clients)
        print(f"{base.data.name}, {args.clients} clients, {base.fed.rounds} rounds of {base.fed.local_epochs} local "
              f"epochs, {base.method.num_experts - 1} experts per client, seed {base.seed}; accuracy (%) of clients "
              f"{honest} after the last round / gate weight on poisoned experts (%)")
        clean = {}
        for attack in args.attacks:
            print(f"\n{attack:<10}" + "".join(f"{f'{100 * f:.0f}%':>15}" for f in FRACTIONS) + f"{'s':>7}")
            for name in args.defences:
                t0, cells = time.perf_counter(), []
                for fraction in FRACTIONS:
                    if fraction == 0 and name in clean:
                        cells.append(clean[name])
                        continue
                    extra = [*ATTACKS[attack], f"attack.fraction={fraction}"] if fraction else []
                    cfg = load_config(args.config, common + DEFENCES[name] + extra)
                    accuracy, last = run_row(job, cfg, Path(out) / attack / name / str(fraction), honest)
                    weight = last.get("poison_attention")
                    cells.append(f"{accuracy:.2f}" + (f" / {100 * weight:.1f}" if weight is not None else ""))
                    if fraction == 0:
                        clean[name] = cells[-1]
                print(f"{name:<10}" + "".join(f"{c:>15}" for c in cells) + f"{time.perf_counter() - t0:>7.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
