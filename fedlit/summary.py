"""What a configuration will do, before it runs: clients per round, pFedMoAP's expert count per round, estimated
client-steps, and warnings when a method's defining feature is inert (``fedlit print-config``, start of ``train``)."""

from __future__ import annotations

import math

from fedlit.config import Config, heldout_size, runnable_algorithms, skipped_algorithms, to_yaml, training_pool_size

# Approximate train images and classes of each dataset (CoOp's splits for the CLIP datasets), for the estimate
# of client-steps before anything is loaded; None where the size depends on the files found under data.root.
TRAIN_SIZES: dict[str, tuple[int, int] | None] = {
    "cifar10": (50_000, 10), "cifar100": (50_000, 100), "caltech101": (4_128, 100), "oxford_pets": (2_944, 37),
    "flowers102": (4_093, 102), "food101": (50_500, 101), "dtd": (2_820, 47), "domainnet": None,
    "office_caltech10": None, "fashion_mnist": (60_000, 10), "digits": (1_352, 10),
}
SHAPES_CLASSES = 32


def has_experts(method: str) -> bool:
    """Whether ``method`` is of the pFedMoAP family (K downloaded expert prompts per client)."""
    return method.startswith("pfedmoap")


def clients_per_round(cfg: Config) -> int:
    """``m = max(1, floor(fed.frac * P))`` of the ``P`` clients that may train, as the sampler draws them."""
    return max(1, math.floor(cfg.fed.frac * training_pool_size(cfg) + 1e-9))


def experts_per_round(cfg: Config) -> list[int]:
    """For each round, the most expert prompts any sampled pFedMoAP client downloads: a client gets
    ``min(num_experts - 1, pool size - 1)`` once it has uploaded itself, 0 before (the same sampling and client
    dropout as the run)."""
    from fedlit.federation.sampling import heldout_clients, sample_clients, surviving_clients

    wanted = cfg.method.num_experts - 1
    pool: set[int] = set()
    counts = []
    heldout = heldout_clients(cfg.seed, cfg.data.num_clients, heldout_size(cfg))
    for r in range(1, cfg.fed.rounds + 1):
        sampled = sample_clients(cfg.seed, r, cfg.data.num_clients, cfg.fed.frac, heldout)
        trained = surviving_clients(cfg.seed, r, sampled, cfg.fed.dropout)
        counts.append(max((min(wanted, len(pool - {c})) if c in pool else 0 for c in trained), default=0))
        pool.update(trained)
    return counts


def train_images_per_client(cfg: Config) -> float | None:
    """Mean train images per client, estimated from the dataset's size and the partition; None when unknown."""
    d = cfg.data
    if d.name == "shapes":
        images, classes = SHAPES_CLASSES * d.train_per_class, SHAPES_CLASSES
    elif TRAIN_SIZES.get(d.name) is None:
        return None
    else:
        images, classes = TRAIN_SIZES[d.name]  # type: ignore[misc]
        if d.max_train_per_class is not None:  # an upper bound: a class may hold fewer
            images = min(images, classes * d.max_train_per_class)
    if cfg.eval.protocol == "base2novel":
        images, classes = images * math.ceil(classes / 2) / classes, math.ceil(classes / 2)
    if d.partition == "pathological" and d.shots is not None:
        images = classes * d.shots
    return images / d.num_clients


def estimated_client_steps(cfg: Config) -> int | None:
    """Optimiser steps summed over clients and rounds: rounds x clients per round x local epochs x batches per
    epoch of a mean-sized client (None when the dataset's size is only known once loaded)."""
    images = train_images_per_client(cfg)
    if images is None:
        return None
    rounding = math.floor if cfg.data.drop_last else math.ceil
    batches = max(1, rounding(images / cfg.data.batch_size))
    return cfg.fed.rounds * clients_per_round(cfg) * cfg.fed.local_epochs * batches


def inert_warnings(cfg: Config) -> list[str]:
    """One line per method of ``cfg`` whose defining feature does nothing in this configuration: pFedMoAP with no
    expert in any round (K = 0), FedProx with mu = 0; and one per method ``algorithm=all`` leaves out (it cannot run
    this configuration: :func:`fedlit.config.method_conflict`)."""
    found = []
    methods = runnable_algorithms(cfg)
    if any(has_experts(m) for m in methods) and max(experts_per_round(cfg)) == 0:
        why = ("method.num_experts=1 leaves no expert besides the local one" if cfg.method.num_experts == 1
               else f"with {clients_per_round(cfg)} client(s) per round over {cfg.fed.rounds} round(s) no sampled "
                    "client ever has another client's prompt in the pool")
        names = ", ".join(m for m in methods if has_experts(m))
        found.append(f"{names}: K = 0 experts in every round ({why}); the run is CoOp with a gate over one prompt")
    if "fedprox" in methods and cfg.method.mu == 0:
        found.append("fedprox: method.mu=0 removes the proximal term; the run is PromptFL")
    found += [f"algorithm=all leaves out {name}: {why}" for name, why in skipped_algorithms(cfg).items()]
    return found


def summary_line(cfg: Config) -> str:
    """One line: clients per round, K experts (pFedMoAP family), rounds, estimated client-steps."""
    held = f" ({heldout_size(cfg)} held out)" if heldout_size(cfg) else ""
    parts = [f"clients per round {clients_per_round(cfg)} of {training_pool_size(cfg)}{held}"]
    if any(has_experts(m) for m in runnable_algorithms(cfg)):
        counts = experts_per_round(cfg)
        low, high = min(counts), max(counts)
        spread = f"{high}" if low == high else f"{low} (round 1) to {high}"
        parts.append(f"K experts {spread} (method.num_experts={cfg.method.num_experts} counts the local one)")
    parts.append(f"rounds {cfg.fed.rounds}")
    steps = estimated_client_steps(cfg)
    per_method = "unknown until the dataset is loaded" if steps is None else f"~{steps:,}"
    methods = len(runnable_algorithms(cfg))
    parts.append(f"estimated client-steps {per_method}" + (f" per method ({methods} methods)" if methods > 1 else ""))
    return "fedlit | " + " | ".join(parts)


def describe(cfg: Config) -> str:
    """The resolved configuration as YAML followed by :func:`summary_line`."""
    return to_yaml(cfg).rstrip("\n") + "\n\n" + summary_line(cfg)
