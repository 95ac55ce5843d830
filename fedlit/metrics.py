"""Round metrics over per-client accuracies (SPEC §5)."""

from __future__ import annotations

import math

import numpy as np


def round_metrics(accuracies: list[float], sizes: list[int]) -> dict[str, float]:
    """Unweighted mean (the papers' number), sample-weighted mean, std and worst-10% mean of per-client
    accuracies (fractions in [0, 1]); ``sizes`` are the clients' test sample counts."""
    acc = np.asarray(accuracies, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    worst = np.sort(acc)[: max(1, math.ceil(0.1 * len(acc)))]
    return {
        "acc_mean": float(acc.mean()),
        "acc_weighted": float((acc * n).sum() / n.sum()),
        "acc_std": float(acc.std()),
        "acc_worst10": float(worst.mean()),
    }


def domain_metrics(accuracies: list[float], client_domains: list[int], domain_names: list[str]) -> dict:
    """Per-domain mean and std of per-client accuracy: ``{domain: {"mean": m, "std": s}}``."""
    acc = np.asarray(accuracies, dtype=np.float64)
    dom = np.asarray(client_domains)
    return {
        name: {"mean": float(acc[dom == d].mean()), "std": float(acc[dom == d].std())}
        for d, name in enumerate(domain_names)
        if (dom == d).any()
    }


def final_summary(evaluated: list[dict], last: int = 5) -> dict[str, float]:
    """``acc_mean`` of the last evaluated round and the mean over the last ``last`` evaluated rounds."""
    means = [row["acc_mean"] for row in evaluated]
    return {"last_round": float(means[-1]), f"mean_last_{last}": float(np.mean(means[-last:]))}
