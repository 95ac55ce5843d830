"""Deterministic client sampling, per-client random streams and rank assignment (independent of process layout)."""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np
import torch

SAMPLING_STREAM = 7_919  # stream tags keep the server's and the clients' draws apart
CLIENT_STREAM = 104_729
FINETUNE_STREAM = 15_485_863  # a client's draws when it fine-tunes before its evaluation
DROPOUT_STREAM = 32_452_843  # whether a sampled client fails to upload
ATTACK_STREAM = 49_979_687  # which clients are Byzantine (once per run)
EVAL_STREAM = 67_867_967  # which clients a round evaluates (eval.clients=N)
HELDOUT_STREAM = 86_028_121  # which clients never train (eval.protocol=heldout, once per run)


def sample_size(num_clients: int, frac: float) -> int:
    """``m = max(1, floor(frac * N))``: the clients sampled per round."""
    return max(1, math.floor(frac * num_clients + 1e-9))


def _pool(num_clients: int, excluded: Collection[int]) -> list[int]:
    """The client ids ``0..N-1`` not in ``excluded``, ascending."""
    left_out = set(excluded)
    return [c for c in range(num_clients) if c not in left_out]


def sample_clients(seed: int, round_index: int, num_clients: int, frac: float,
                   excluded: Collection[int] = ()) -> list[int]:
    """``m = max(1, floor(frac * P))`` client ids drawn without replacement from the server stream of this round,
    among the ``P`` clients not in ``excluded`` (held-out clients never train; with none excluded the draw is
    exactly the one over ``0..N-1``)."""
    pool = _pool(num_clients, excluded)
    m = sample_size(len(pool), frac)
    rng = np.random.default_rng([seed, round_index, SAMPLING_STREAM])
    return sorted(pool[int(i)] for i in rng.choice(len(pool), size=m, replace=False))


def heldout_clients(seed: int, num_clients: int, count: int) -> list[int]:
    """The clients of a run that never train (``eval.protocol=heldout``): ``count`` ids drawn once without
    replacement from a stream seeded by the run seed only (sorted), so they do not depend on the process layout."""
    if count <= 0:
        return []
    rng = np.random.default_rng([seed, HELDOUT_STREAM])
    return sorted(int(i) for i in rng.choice(num_clients, size=min(count, num_clients), replace=False))


def surviving_clients(seed: int, round_index: int, sampled: list[int], dropout: float) -> list[int]:
    """The sampled clients that upload: each drops out with probability ``dropout``, drawn from its own stream
    seeded by (seed, round, client), so a client's fate does not depend on which others were sampled."""
    if dropout <= 0:
        return list(sampled)
    return [c for c in sampled if np.random.default_rng([seed, round_index, c, DROPOUT_STREAM]).random() >= dropout]


def evaluation_subset(seed: int, round_index: int, num_clients: int, count: int,
                      excluded: Collection[int] = ()) -> list[int]:
    """``min(count, P)`` client ids drawn without replacement from the evaluation stream of this round among the
    ``P`` clients not in ``excluded`` (sorted; with none excluded exactly the draw over ``0..N-1``)."""
    pool = _pool(num_clients, excluded)
    rng = np.random.default_rng([seed, round_index, EVAL_STREAM])
    return sorted(pool[int(i)] for i in rng.choice(len(pool), size=min(count, len(pool)), replace=False))


def attacked_clients(seed: int, num_clients: int, fraction: float) -> list[int]:
    """The Byzantine clients of a run: ``round(fraction * N)`` ids drawn once without replacement from a stream
    seeded by the run seed only (sorted)."""
    count = min(num_clients, int(round(fraction * num_clients)))
    if count == 0:
        return []
    rng = np.random.default_rng([seed, ATTACK_STREAM])
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))


def client_generator(seed: int, round_index: int, client_id: int, stream: int = CLIENT_STREAM) -> torch.Generator:
    """The torch generator of client ``client_id`` in round ``round_index`` (data order, any other draw); ``stream``
    keeps apart draws of the same round for different purposes (training, fine-tuning before evaluation)."""
    state = np.random.SeedSequence([seed, round_index, client_id, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def assign_to_ranks(client_ids: list[int], sizes: dict[int, int], world_size: int) -> list[list[int]]:
    """Greedy balance, largest first: each client goes to the rank with the least work so far (ties: lower rank).
    Returns the client ids of each rank, sorted."""
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for cid in sorted(client_ids, key=lambda c: (-sizes[c], c)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shares[rank].append(cid)
        loads[rank] += max(sizes[cid], 1)
    return [sorted(s) for s in shares]
