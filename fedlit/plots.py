"""Figures of finished runs (``fedlit plot RUN_DIR... --out DIR``, needs the ``plots`` extra: matplotlib).

Runs are grouped as in :mod:`fedlit.compare` (every differing config key except the seed and bookkeeping). Each
figure is written as PNG and PDF:

- ``accuracy``: mean per-client accuracy per round of each group, the band spanning mean ± sample std over seeds;
- ``clients``: the spread of per-client accuracies in the last round (one box per group, seeds pooled);
- ``expert_attention``: pFedMoAP's gate weight of each expert slot per client in the last evaluated round (local
  expert first), one panel per pFedMoAP-family run recorded with ``eval.diagnostics=true``;
- ``base_novel``: base, novel and HM bars per group (``eval.protocol=base2novel`` runs only);
- ``heldout``: per round, the mean accuracy of the participating clients (solid) and of the held-out clients
  (dashed) of each group, bands ± std over seeds; the vertical distance is the participation gap
  (``eval.protocol=heldout`` runs only);
- ``transfer``: last-round accuracy of the global prompt on each transfer target, one bar per group (mean over
  seeds; ``eval.protocol=transfer`` runs of methods with a global prompt);
- ``overview``: accuracy, client spread and the first expert-attention heatmap side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from fedlit.compare import finished_results, group_runs
from fedlit.errors import UserError
from fedlit.metrics import TRANSFER_PREFIX

FORMATS = ("png", "pdf")
DPI = 90


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend; UserError naming the extra when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("fedlit plot needs matplotlib: pip install 'fedlit[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def group_label(keys: list[str], values: tuple[str, ...]) -> str:
    """A legend label: the algorithm alone, other differing keys as ``key=value``."""
    parts = [v if k == "algorithm" else f"{k}={v}" for k, v in zip(keys, values)]
    return ", ".join(parts) or "all runs"


def labelled_groups(results: list[dict]) -> list[tuple[str, list[dict]]]:
    """(label, runs) per group of :func:`fedlit.compare.group_runs`, in sorted order."""
    keys, groups = group_runs(results)
    return [(group_label(keys, values), runs) for values, runs in sorted(groups.items())]


def round_curve(runs: list[dict], metric: str = "acc_mean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rounds, mean, sample std) in % over the runs of ``metric`` per evaluated round (rounds all runs share;
    std 0 for one run)."""
    per_run = [{row["round"]: row[metric] for row in r["rounds"] if row.get(metric) is not None} for r in runs]
    rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    values = np.asarray([[100.0 * p[x] for x in rounds] for p in per_run], dtype=np.float64)
    std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(rounds))
    return np.asarray(rounds), values.mean(axis=0), std


def last_round_clients(runs: list[dict]) -> list[float]:
    """Per-client accuracies (%) of the last evaluated round of every run, pooled (clients without test left out)."""
    return [100.0 * a for r in runs for a in r["rounds"][-1]["accuracy"] if a is not None]


def expert_attention(result: dict) -> np.ndarray | None:
    """Clients x expert slots of the last evaluated round's mean gate weights (NaN rows for clients without a
    record, None when the run has none; slots beyond a client's experts are NaN). The rows are every client, or
    the round's ``evaluated_clients`` when it evaluated a subset."""
    diagnostics = result["rounds"][-1].get("diagnostics") or {}
    weights = diagnostics.get("expert_attention")
    if not weights or all(w is None for w in weights):
        return None
    slots = max(len(w) for w in weights if w is not None)
    table = np.full((len(weights), slots), np.nan)
    for i, w in enumerate(weights):
        if w is not None:
            table[i, : len(w)] = w
    return table


def draw_accuracy(ax: Any, groups: list[tuple[str, list[dict]]]) -> None:
    """Mean per-client accuracy per round of each group with a band over seeds."""
    curves = [(label, len(runs), *round_curve(runs)) for label, runs in groups]
    last = max((int(rounds.max()) for _, _, rounds, _, _ in curves if len(rounds)), default=1)
    for label, n, rounds, mean, std in curves:
        if len(rounds) == 1:  # evaluated once (zero-shot): a dashed level across every round
            rounds, mean, std = np.asarray([rounds[0], max(last, rounds[0] + 1)]), mean.repeat(2), std.repeat(2)
        line = ax.plot(rounds, mean, marker="o" if len(rounds) > 2 else None, markersize=3,
                       linestyle="-" if len(rounds) > 2 else "--", label=f"{label} (n={n})")[0]
        ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel="round", ylabel="mean per-client accuracy (%)", title="accuracy per round (band: ± std)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def draw_clients(ax: Any, groups: list[tuple[str, list[dict]]]) -> None:
    """One box of last-round per-client accuracies per group."""
    ax.boxplot([last_round_clients(runs) for _, runs in groups])
    ax.set_xticks(range(1, len(groups) + 1), [label for label, _ in groups], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="per-client accuracy (%)", title="clients, last round")
    ax.grid(alpha=0.3, axis="y")


def draw_attention(ax: Any, table: np.ndarray, title: str, clients: list[int] | None = None) -> Any:
    """A clients x expert-slots heatmap (slot 0 is the local expert; rows labelled by ``clients``, default 0..n-1),
    colours spanning the weights' range and each weight written in its cell when there are at most 120; returns
    the image for a colour bar."""
    image = ax.imshow(table, aspect="auto", cmap="viridis", vmin=float(np.nanmin(table)),
                      vmax=float(np.nanmax(table)))
    ax.set(xlabel="expert slot (0 = local)", ylabel="client", title=f"{title}\n(uniform = {1 / table.shape[1]:.3g})")
    if table.size <= 120:
        middle = (np.nanmin(table) + np.nanmax(table)) / 2
        for (i, j), weight in np.ndenumerate(table):
            if not np.isnan(weight):
                ax.text(j, i, f"{weight:.3f}", ha="center", va="center", fontsize=6,
                        color="black" if weight > middle else "white")
    ax.set_xticks(range(table.shape[1]))
    ax.set_yticks(range(table.shape[0]), [str(c) for c in (clients or range(table.shape[0]))])
    ax.tick_params(labelsize=7)
    return image


def draw_base_novel(ax: Any, groups: list[tuple[str, list[dict]]]) -> None:
    """Grouped bars of last-round base, novel and HM accuracy (mean over seeds) per group."""
    names = {"acc_mean": "base", "acc_novel_mean": "novel", "hm_of_means": "HM"}
    x = np.arange(len(groups))
    for i, (metric, name) in enumerate(names.items()):
        heights = [np.mean([100.0 * r["final"][metric]["last_round"] for r in runs]) for _, runs in groups]
        ax.bar(x + (i - 1) * 0.27, heights, width=0.27, label=name)
    ax.set_xticks(x, [label for label, _ in groups], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="accuracy (%)", title="base-to-novel, last round")
    ax.legend(fontsize=7)


def draw_heldout(ax: Any, groups: list[tuple[str, list[dict]]]) -> None:
    """Participating (``acc_mean``, solid) and held-out (``acc_heldout``, dashed) accuracy per round of each group,
    in one colour per group, with bands ± std over seeds."""
    for label, runs in groups:
        rounds, mean, std = round_curve(runs, "acc_mean")
        line = ax.plot(rounds, mean, marker="o", markersize=3, label=f"{label}: participating")[0]
        ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
        rounds, mean, std = round_curve(runs, "acc_heldout")
        ax.plot(rounds, mean, marker="s", markersize=3, linestyle="--", color=line.get_color(),
                label=f"{label}: held-out")
        ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.1, linewidth=0)
    ax.set(xlabel="round", ylabel="mean per-client accuracy (%)",
           title="participating vs held-out clients (gap = solid - dashed)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def transfer_targets(results: list[dict]) -> list[str]:
    """The transfer targets reported in the runs' finals (``transfer/<target>``), in first-seen order."""
    return [k.removeprefix(TRANSFER_PREFIX) for k in
            dict.fromkeys(k for r in results for k in r["final"] if k.startswith(TRANSFER_PREFIX))]


def draw_transfer(ax: Any, groups: list[tuple[str, list[dict]]], targets: list[str]) -> None:
    """Grouped bars: for each target, the last-round accuracy of each group's global prompt (mean over seeds)."""
    x = np.arange(len(targets))
    width = 0.8 / max(len(groups), 1)
    for i, (label, runs) in enumerate(groups):
        heights = [np.mean([100.0 * r["final"][TRANSFER_PREFIX + t]["last_round"] for r in runs]) for t in targets]
        ax.bar(x + (i - (len(groups) - 1) / 2) * width, heights, width=width, label=label)
    ax.set_xticks(x, targets, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="accuracy (%)", title="global prompt on transfer targets, last round")
    ax.legend(fontsize=7)


def attention_runs(results: list[dict]) -> list[tuple[str, np.ndarray, list[int] | None]]:
    """(title, heatmap, its rows' client ids or None for all) of every run with recorded expert attention, sorted
    by method and seed."""
    found = []
    for r in sorted(results, key=lambda r: (r["algorithm"], r.get("seed", 0), r["_path"])):
        table = expert_attention(r)
        if table is not None:
            found.append((f"{r['algorithm']} seed {r.get('seed', 0)}: expert attention", table,
                          r["rounds"][-1].get("evaluated_clients")))
    return found


def save(plt: Any, fig: Any, out: Path, name: str) -> list[Path]:
    """Write ``fig`` as ``out/name.{png,pdf}`` and close it; returns the paths."""
    fig.tight_layout()
    paths = [out / f"{name}.{fmt}" for fmt in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return paths


def plot_results(results: list[dict], out: str | Path) -> list[Path]:
    """Write every figure that ``results`` support into ``out``; returns the files written."""
    plt = pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = labelled_groups(results)
    attention = attention_runs(results)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    draw_accuracy(ax, groups)
    written += save(plt, fig, out, "accuracy")
    fig, ax = plt.subplots(figsize=(6, 4))
    draw_clients(ax, groups)
    written += save(plt, fig, out, "clients")
    if attention:
        fig, axes = plt.subplots(1, len(attention), figsize=(4 * len(attention), 3.5), squeeze=False)
        for ax, (title, table, clients) in zip(axes[0], attention):
            fig.colorbar(draw_attention(ax, table, title, clients), ax=ax)
        written += save(plt, fig, out, "expert_attention")
    if all(r["final"].get("acc_novel_mean") for _, runs in groups for r in runs):
        fig, ax = plt.subplots(figsize=(6, 4))
        draw_base_novel(ax, groups)
        written += save(plt, fig, out, "base_novel")
    heldout = [(label, runs) for label, runs in groups if all(r["final"].get("acc_heldout") for r in runs)]
    if heldout:
        fig, ax = plt.subplots(figsize=(6, 4))
        draw_heldout(ax, heldout)
        written += save(plt, fig, out, "heldout")
    targets = transfer_targets(results)
    transfer = [(label, runs) for label, runs in groups
                if all(TRANSFER_PREFIX + t in r["final"] for t in targets for r in runs)]
    if targets and transfer:
        fig, ax = plt.subplots(figsize=(6, 4))
        draw_transfer(ax, transfer, targets)
        written += save(plt, fig, out, "transfer")
    fig, axes = plt.subplots(1, 3 if attention else 2, figsize=(15 if attention else 10, 4))
    draw_accuracy(axes[0], groups)
    draw_clients(axes[1], groups)
    if attention:
        title, table, clients = attention[0]
        fig.colorbar(draw_attention(axes[2], table, title, clients), ax=axes[2])
    written += save(plt, fig, out, "overview")
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``fedlit plot``."""
    parser.add_argument("run_dirs", nargs="+", help="run directories (searched recursively for results.json)")
    parser.add_argument("--out", required=True, help="folder for the PNG and PDF files")


def run(args: argparse.Namespace) -> int:
    """Plot ``args.run_dirs`` into ``args.out`` and list the files written; returns the exit code."""
    for path in plot_results(finished_results(args.run_dirs), args.out):
        print(path)
    return 0
