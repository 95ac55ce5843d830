"""Round metrics over per-client accuracies (SPEC §5). A client without test samples has accuracy None: it is left
out of every average and counted in ``clients_without_test``."""

from __future__ import annotations

import math

import numpy as np

SUMMARISED = ("acc_mean", "acc_weighted", "acc_worst10", "acc_global")  # the metrics ``final`` summarises


def round_metrics(accuracies: list[float | None], sizes: list[int]) -> dict[str, float | int]:
    """Unweighted mean (the papers' number), sample-weighted mean, std and worst-10% mean of per-client
    accuracies (fractions in [0, 1]; None entries are skipped); ``sizes`` are the clients' test sample counts."""
    scored = [(a, n) for a, n in zip(accuracies, sizes) if a is not None]
    acc = np.asarray([a for a, _ in scored], dtype=np.float64)
    n = np.asarray([s for _, s in scored], dtype=np.float64)
    worst = np.sort(acc)[: max(1, math.ceil(0.1 * len(acc)))]
    return {
        "acc_mean": float(acc.mean()),
        "acc_weighted": float((acc * n).sum() / n.sum()),
        "acc_std": float(acc.std()),
        "acc_worst10": float(worst.mean()),
        "clients_without_test": len(accuracies) - len(scored),
    }


def domain_metrics(accuracies: list[float | None], client_domains: list[int], domain_names: list[str]) -> dict:
    """Per-domain mean and std of per-client accuracy: ``{domain: {"mean": m, "std": s}}`` (None entries skipped)."""
    acc = np.asarray([np.nan if a is None else a for a in accuracies], dtype=np.float64)
    dom = np.asarray(client_domains)
    out = {}
    for d, name in enumerate(domain_names):
        values = acc[(dom == d) & ~np.isnan(acc)]
        if len(values):
            out[name] = {"mean": float(values.mean()), "std": float(values.std())}
    return out


def final_summary(evaluated: list[dict], last: int = 5) -> dict:
    """The last evaluated round and the mean over the last ``last`` evaluated rounds of every summarised metric:
    ``{"last_round": acc_mean, "mean_last_5": ..., "acc_mean": {"last_round": .., "mean_last_5": ..}, ...}``
    (a metric a method does not report, e.g. ``acc_global`` of CoOp local, is left out)."""
    out: dict = {}
    for metric in SUMMARISED:
        values = [row[metric] for row in evaluated if row.get(metric) is not None]
        if values:
            out[metric] = {"last_round": float(values[-1]), f"mean_last_{last}": float(np.mean(values[-last:]))}
    out["last_round"] = out["acc_mean"]["last_round"]
    out[f"mean_last_{last}"] = out["acc_mean"][f"mean_last_{last}"]
    return out
