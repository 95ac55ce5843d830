"""Round metrics over per-client accuracies (SPEC §5). A client without test samples has accuracy None: it is left
out of every average and counted in ``clients_without_test``."""

from __future__ import annotations

import math

import numpy as np

SUMMARISED = ("acc_mean", "acc_weighted", "acc_worst10", "acc_global", "acc_novel_mean", "acc_hm_mean", "hm_of_means",
              "acc_global_hm", "acc_heldout", "participation_gap", "acc_transfer")  # the metrics ``final`` summarises
TRANSFER_PREFIX = "transfer/"  # ``transfer/<target>``: the global prompt on one eval.transfer_datasets entry


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


def harmonic_mean(base: float, novel: float) -> float:
    """``HM = 2 B N / (B + N)`` (0 when both are 0)."""
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def base_novel_metrics(base: list[float | None], novel: list[float | None], global_base: float | None,
                       global_novel: float | None) -> dict[str, float]:
    """Base-to-novel summary of per-client base and novel accuracies: the mean novel accuracy, the mean of the
    per-client harmonic means, the harmonic mean of the mean base and mean novel accuracies (CoOp's HM), and
    the global model's novel accuracy and HM (when it has one). Clients without base test samples are skipped."""
    pairs = [(b, n) for b, n in zip(base, novel) if b is not None and n is not None]
    mean_base = float(np.mean([b for b, _ in pairs]))
    mean_novel = float(np.mean([n for _, n in pairs]))
    out = {"acc_novel_mean": mean_novel, "acc_hm_mean": float(np.mean([harmonic_mean(b, n) for b, n in pairs])),
           "hm_of_means": harmonic_mean(mean_base, mean_novel)}
    if global_base is not None and global_novel is not None:
        out.update({"acc_global_novel": global_novel, "acc_global_hm": harmonic_mean(global_base, global_novel)})
    return out


def heldout_metrics(participating: float, heldout: list[float | None]) -> dict[str, float | None]:
    """The participation gap (``eval.protocol=heldout``): ``acc_heldout``, the unweighted mean accuracy of the
    held-out clients (None entries skipped), and ``participation_gap = participating - acc_heldout`` with
    ``participating`` the mean over the clients that train (``acc_mean``); both None without a held-out number."""
    scored = [a for a in heldout if a is not None]
    if not scored:
        return {"acc_heldout": None, "participation_gap": None}
    mean = float(np.mean(np.asarray(scored, dtype=np.float64)))
    return {"acc_heldout": mean, "participation_gap": participating - mean}


def transfer_metrics(accuracies: dict[str, float | None]) -> dict[str, float | None]:
    """``transfer/<target>`` per target of ``eval.transfer_datasets`` (the global prompt's accuracy on its test set,
    None for a method without a global prompt) and ``acc_transfer``, their unweighted mean (None if any is None)."""
    row: dict[str, float | None] = {TRANSFER_PREFIX + name: acc for name, acc in accuracies.items()}
    values = list(accuracies.values())
    row["acc_transfer"] = None if any(v is None for v in values) else float(np.mean(np.asarray(values)))
    return row


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
    (a metric a method does not report, e.g. ``acc_global`` of CoOp local, is left out); the ``transfer/<target>``
    metrics of ``eval.protocol=transfer`` follow the SUMMARISED ones."""
    out: dict = {}
    transfer = dict.fromkeys(k for row in evaluated for k in row if k.startswith(TRANSFER_PREFIX))
    for metric in (*SUMMARISED, *transfer):
        values = [row[metric] for row in evaluated if row.get(metric) is not None]
        if values:
            out[metric] = {"last_round": float(values[-1]), f"mean_last_{last}": float(np.mean(values[-last:]))}
    out["last_round"] = out["acc_mean"]["last_round"]
    out[f"mean_last_{last}"] = out["acc_mean"][f"mean_last_{last}"]
    return out


def poison_metrics(diagnostics: dict[str, list], clients: list[int], attacked: set[int]) -> dict[str, float | None]:
    """The harm a Byzantine client's pool prompt does through pFedMoAP's gates, from a round's per-client
    ``diagnostics`` (``expert_ids``: pool ids of the K downloaded experts; ``expert_attention``: the gate's mean
    weight of the local expert then each downloaded one) over ``clients`` (the honest evaluated ones) that hold
    experts: ``poison_selected``, the share of their expert slots holding an ``attacked`` client's prompt;
    ``poison_reach``, the share of them with at least one; ``poison_attention``, the mean over them of the gate
    weight on those slots (a client's weights sum to 1). None when no such client holds experts."""
    ids, weights = diagnostics.get("expert_ids") or [], diagnostics.get("expert_attention") or []
    held = [c for c in clients if c < len(ids) and ids[c] is not None and c < len(weights) and weights[c] is not None]
    if not held:
        return {"poison_selected": None, "poison_reach": None, "poison_attention": None}
    poisoned = {c: [j for j, pid in enumerate(ids[c]) if round(pid) in attacked] for c in held}
    slots = sum(len(ids[c]) for c in held)
    return {
        "poison_selected": sum(len(p) for p in poisoned.values()) / slots,
        "poison_reach": sum(1 for p in poisoned.values() if p) / len(held),
        "poison_attention": math.fsum(math.fsum(weights[c][1 + j] for j in poisoned[c]) for c in held) / len(held),
    }
