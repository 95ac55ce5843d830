"""Many simulated clients on the disk store: resident memory, checkpoint bytes and seconds, round time per N.

pFedMoAP in the CIFAR-100 setting (RN50 sizes: a 16 x 512 prompt, the gate of ``AttentionGate(1024)``, K = 9
expert prompts, persistent momentum) with 100 clients sampled per round out of N = 1,000, 10,000 and 100,000.
Local training is replaced by a random update of each sampled client's state (the tiny fast path: no backbone),
so that a round times what depends on N: sampling, the store's reads and writes, pFedMoAP's expert selection and
aggregation (the real ``PFedMoAP.plan``/``aggregate``), and the incremental checkpoint (``DiskStore.commit``, the
main file, compaction). Each N runs in its own process, so its resident memory is its own.

    python benchmarks/scale.py                       # the table (N = 1k, 10k, 100k; 10 rounds each)
    python benchmarks/scale.py --one 20000 --rounds 3   # one N as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedlit.algorithms import build_algorithm
from fedlit.config import load_config
from fedlit.federation.checkpoint import CHECKPOINT_NAME, Identity, RunState, checkpoint_round
from fedlit.federation.sampling import sample_clients
from fedlit.federation.store import SHARD_SUFFIX, DiskStore, RecordTable
from fedlit.gating import AttentionGate
from fedlit.state import GATE, PROMPT, ClientState, StoreEntry, Upload

COHORT = 100
SIZES = (1_000, 10_000, 100_000)


def rss_bytes(field: str = "VmRSS") -> int:
    """The process's current resident set size (``VmHWM``: its peak). Read from /proc rather than ``getrusage``,
    whose ``ru_maxrss`` survives exec and so reports the parent's size when a large process started this one."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def initial_state() -> ClientState:
    """A client's initial state in the CIFAR-100 pFedMoAP setting: prompt (16, 512) and the AttentionGate(1024)."""
    gate = {GATE + name: p.detach().clone() for name, p in AttentionGate(1024).named_parameters()}
    return ClientState({PROMPT: torch.randn(16, 512) * 0.02, **gate})


def trained(start: ClientState, generator: torch.Generator) -> ClientState:
    """A random stand-in for local training: every tensor moved a little, momentum buffers beside them."""
    params = {k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in start.params.items()}
    optim = {k: {"momentum_buffer": torch.randn(v.shape, generator=generator)} for k, v in params.items()}
    return ClientState(params, optim)


def run_one(num_clients: int, rounds: int, shard_size: int) -> dict:
    """``rounds`` rounds of 100 sampled clients out of ``num_clients``; per-round checkpoint bytes and seconds, and
    resident memory (``base_rss_bytes``: after the imports, before any client exists)."""
    base = rss_bytes()
    cfg = load_config(None, ["prompt.n_ctx=16", "method.num_experts=10", f"data.num_clients={num_clients}",
                             f"fed.frac={COHORT / num_clients}", "optim.persistent_state=true"])
    algorithm = build_algorithm(cfg, "pfedmoap")
    initial = initial_state()
    generator = torch.Generator().manual_seed(0)
    identity = Identity("pfedmoap", "bench", "bench")
    rounds_out = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        store = DiskStore(run_dir / "store", shard_size)
        state = RunState(server=algorithm.init_server(initial), store=store,
                         records=RecordTable(run_dir / "store", shard_size))
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            sampled = sample_clients(cfg.seed, r, num_clients, cfg.fed.frac)
            entries = store.get_many(sampled)
            plans = algorithm.plan_round(state.server, entries, initial)
            uploads = {c: Upload(trained(plans[c].start, generator), loss=1.0, steps=5) for c in sampled}
            for c in sampled:
                store.put(c, StoreEntry(uploads[c].state, algorithm.keep(plans[c]), last_round=r))
            state.server = algorithm.aggregate(state.server, uploads, dict.fromkeys(sampled, 50))
            t1 = time.perf_counter()
            checkpoint_round(run_dir, state, identity)  # the round's shards and records, main file, compaction
            written = (run_dir / CHECKPOINT_NAME).stat().st_size + sum(
                p.stat().st_size for p in store.directory.glob(f"*.r{r:06d}{SHARD_SUFFIX}"))
            t2 = time.perf_counter()
            rounds_out.append({"round_s": t2 - t0, "checkpoint_s": t2 - t1, "checkpoint_bytes": written,
                               "main_file_bytes": (run_dir / CHECKPOINT_NAME).stat().st_size})
        on_disk = sum(p.stat().st_size for p in store.directory.iterdir())
    later = rounds_out[1:] or rounds_out  # the first round also pays for imports and warm-up
    return {"clients": num_clients, "rounds": rounds, "stored_clients": len(store), "store_bytes": on_disk,
            "base_rss_bytes": base, "rss_bytes": rss_bytes(),
            "peak_rss_bytes": rss_bytes("VmHWM"),
            "round_s": sum(x["round_s"] for x in later) / len(later),
            "checkpoint_s": sum(x["checkpoint_s"] for x in later) / len(later),
            "checkpoint_bytes": sum(x["checkpoint_bytes"] for x in later) / len(later),
            "main_file_bytes": rounds_out[-1]["main_file_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=1)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.rounds, args.shard_size)))
        return
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}; {COHORT} clients per round, "
          f"{args.rounds} rounds, shards of {args.shard_size} clients")
    print(f"{'N':>8} {'stored':>7} {'peak RSS MiB':>12} {'of it imports':>13} {'ckpt MiB/round':>14} "
          f"{'main file KiB':>13} {'ckpt s/round':>12} {'s/round':>8}")
    for n in args.sizes:
        done = subprocess.run([sys.executable, __file__, "--one", str(n), "--rounds", str(args.rounds),
                               "--shard-size", str(args.shard_size)], capture_output=True, text=True, check=True)
        row = json.loads(done.stdout)
        print(f"{n:>8} {row['stored_clients']:>7} {row['peak_rss_bytes'] / 2**20:>12.0f} "
              f"{row['base_rss_bytes'] / 2**20:>13.0f} {row['checkpoint_bytes'] / 2**20:>14.1f} "
              f"{row['main_file_bytes'] / 1024:>13.0f} "
              f"{row['checkpoint_s']:>12.2f} {row['round_s']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
