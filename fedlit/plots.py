"""Figures of finished runs (``fedlit plot RUN_DIR... --out DIR``, needs the ``plots`` extra: matplotlib).

Runs are grouped as in :mod:`fedlit.compare` (every differing config key except the seed and bookkeeping) and
labelled by their method first. Each group keeps one colour and marker in every figure (:func:`group_styles`: 11
colours, with 9 markers distinct pairs for 99 groups), and legends sit outside the axes, right of the curves. Each
figure is written as PNG and PDF (by default into ``plots/`` of the first run directory):

- ``accuracy``: mean per-client accuracy per round of each group, the band spanning mean ± sample std over seeds;
- ``clients``: the spread of per-client accuracies in the last round (one box per group, seeds pooled);
- ``expert_attention``: pFedMoAP's gate weight of each expert slot per client in the last evaluated round (local
  expert first), one panel per pFedMoAP-family run recorded with ``eval.diagnostics=true``, on a diverging colour
  scale centred on the uniform weight 1/(K+1) (white) and spanning the largest deviation from it either way; the
  weights' range is written in the colour bar's label;
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
COLOURS = tuple(f"C{i}" for i in range(10)) + ("black",)  # tab10 and black: 11 methods, 11 colours
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h")  # 9 markers: 99 distinct (colour, marker) pairs


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend; UserError naming the extra when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("fedlit plot needs matplotlib: pip install 'fedlit[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def group_label(keys: list[str], values: tuple[str, ...], methods: list[str] | None = None) -> str:
    """A legend label: the method first (the ``algorithm`` value, else the runs' ``methods``), then the other
    differing keys as ``key=value``."""
    method = [v for k, v in zip(keys, values) if k == "algorithm"] or ["+".join(sorted(set(methods or [])))]
    parts = [m for m in method if m] + [f"{k}={v}" for k, v in zip(keys, values) if k != "algorithm"]
    return ", ".join(parts) or "all runs"


def labelled_groups(results: list[dict]) -> list[tuple[str, list[dict]]]:
    """(label, runs) per group of :func:`fedlit.compare.group_runs`, in sorted order."""
    keys, groups = group_runs(results)
    return [(group_label(keys, values, [r["algorithm"] for r in runs]), runs)
            for values, runs in sorted(groups.items())]


def group_styles(count: int) -> list[tuple[str, str]]:
    """(colour, marker) of each of ``count`` groups: the :data:`COLOURS` in turn (distinct for 11 groups), each
    pass through them shifted by one marker, so that every (colour, marker) pair differs for up to 99 groups."""
    n = len(COLOURS)
    return [(COLOURS[i % n], MARKERS[(i % n + i // n) % len(MARKERS)]) for i in range(count)]


def outside_legend(ax: Any) -> Any:
    """The axes' legend to the right of the axes, outside the plotted area."""
    return ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


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
    """Mean per-client accuracy per round of each group (its colour and marker) with a band over seeds; the legend
    outside the axes, in the order of the groups."""
    curves = [(label, len(runs), *round_curve(runs)) for label, runs in groups]
    last = max((int(rounds.max()) for _, _, rounds, _, _ in curves if len(rounds)), default=1)
    for (label, n, rounds, mean, std), (colour, marker) in zip(curves, group_styles(len(curves))):
        once = len(rounds) == 1
        if once:  # evaluated once (zero-shot): a dashed level across every round
            rounds, mean, std = np.asarray([rounds[0], max(last, rounds[0] + 1)]), mean.repeat(2), std.repeat(2)
        ax.plot(rounds, mean, color=colour, marker=marker, markersize=4, linestyle="--" if once else "-",
                label=f"{label} (n={n})")
        ax.fill_between(rounds, mean - std, mean + std, color=colour, alpha=0.15, linewidth=0)
    ax.set(xlabel="round", ylabel="mean per-client accuracy (%)", title="accuracy per round (band: ± std)")
    outside_legend(ax)
    ax.grid(alpha=0.3)


def draw_clients(ax: Any, groups: list[tuple[str, list[dict]]]) -> None:
    """One box of last-round per-client accuracies per group, in the group's colour, labelled by its method."""
    boxes = ax.boxplot([last_round_clients(runs) for _, runs in groups], patch_artist=True)
    for box, (colour, _) in zip(boxes["boxes"], group_styles(len(groups))):
        box.set(facecolor=colour, alpha=0.45, edgecolor=colour)
    for median in boxes["medians"]:
        median.set(color="black")
    ax.set_xticks(range(1, len(groups) + 1), [label for label, _ in groups], rotation=35, ha="right", fontsize=7)
    ax.set(ylabel="per-client accuracy (%)", title="clients, last round")
    ax.grid(alpha=0.3, axis="y")


def attention_scale(table: np.ndarray) -> tuple[float, float, float]:
    """(uniform weight ``1 / slots``, lowest, highest colour) of a heatmap: centred on uniform and spanning the
    largest deviation of any weight from it (at least 1e-6), so that white is uniform and equal colours mean equal
    deviations on either side."""
    uniform = 1.0 / table.shape[1]
    spread = max(float(np.nanmax(np.abs(table - uniform))), 1e-6)
    return uniform, uniform - spread, uniform + spread


def attention_label(table: np.ndarray) -> str:
    """The colour bar's label: the uniform weight the scale is centred on and the weights' range."""
    uniform = 1.0 / table.shape[1]
    return (f"gate weight (white = uniform 1/{table.shape[1]} = {uniform:.3g};\n"
            f"weights {np.nanmin(table):.4f} to {np.nanmax(table):.4f})")


def draw_attention(ax: Any, table: np.ndarray, title: str, clients: list[int] | None = None) -> Any:
    """A clients x expert-slots heatmap (slot 0 is the local expert; rows labelled by ``clients``, default 0..n-1)
    on the diverging scale of :func:`attention_scale`, each weight written in its cell when there are at most 120;
    returns the image for a colour bar (label: :func:`attention_label`)."""
    uniform, low, high = attention_scale(table)
    image = ax.imshow(table, aspect="auto", cmap="RdBu_r", vmin=low, vmax=high)
    largest = high - uniform
    ax.set(xlabel="expert slot (0 = local)", ylabel="client",
           title=f"{title}\n(within ±{largest:.2g} of uniform {uniform:.3g})")
    if table.size <= 120:
        digits = 4 if largest < 0.005 else 3  # enough to tell the cells of a nearly uniform gate apart
        for (i, j), weight in np.ndenumerate(table):
            if not np.isnan(weight):
                ax.text(j, i, f"{weight:.{digits}f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(weight - uniform) > 0.6 * largest else "black")
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
    outside_legend(ax)


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
    outside_legend(ax)
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
    outside_legend(ax)


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


def attention_colorbar(fig: Any, image: Any, ax: Any, table: np.ndarray) -> Any:
    """The heatmap's colour bar, labelled with :func:`attention_label`."""
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(attention_label(table), fontsize=7)
    return bar


def save(plt: Any, fig: Any, out: Path, name: str) -> list[Path]:
    """Write ``fig`` as ``out/name.{png,pdf}`` (cropped to what is drawn, legends outside the axes included) and
    close it; returns the paths."""
    paths = [out / f"{name}.{fmt}" for fmt in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
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
    fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
    draw_accuracy(ax, groups)
    written += save(plt, fig, out, "accuracy")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(groups) + 1), 4), layout="constrained")
    draw_clients(ax, groups)
    written += save(plt, fig, out, "clients")
    if attention:
        fig, axes = plt.subplots(1, len(attention), figsize=(4.5 * len(attention), 3.8), squeeze=False,
                                 layout="constrained")
        for ax, (title, table, clients) in zip(axes[0], attention):
            attention_colorbar(fig, draw_attention(ax, table, title, clients), ax, table)
        written += save(plt, fig, out, "expert_attention")
    if all(r["final"].get("acc_novel_mean") for _, runs in groups for r in runs):
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        draw_base_novel(ax, groups)
        written += save(plt, fig, out, "base_novel")
    heldout = [(label, runs) for label, runs in groups if all(r["final"].get("acc_heldout") for r in runs)]
    if heldout:
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        draw_heldout(ax, heldout)
        written += save(plt, fig, out, "heldout")
    targets = transfer_targets(results)
    transfer = [(label, runs) for label, runs in groups
                if all(TRANSFER_PREFIX + t in r["final"] for t in targets for r in runs)]
    if targets and transfer:
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        draw_transfer(ax, transfer, targets)
        written += save(plt, fig, out, "transfer")
    panels = 3 if attention else 2
    fig, axes = plt.subplots(1, panels, figsize=(18 if attention else 12, 4.5), layout="constrained",
                             gridspec_kw={"width_ratios": [1.0, 1.0, 0.8][:panels]})
    draw_accuracy(axes[0], groups)
    draw_clients(axes[1], groups)
    if attention:
        title, table, clients = attention[0]
        attention_colorbar(fig, draw_attention(axes[2], table, title, clients), axes[2], table)
    written += save(plt, fig, out, "overview")
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``fedlit plot``."""
    parser.add_argument("run_dirs", nargs="+", help="run directories (searched recursively for results.json)")
    parser.add_argument("--out", default=None, help="folder for the PNG and PDF files (default: plots/ in the first "
                                                      "RUN_DIR)")


def default_out(run_dirs: list[str]) -> Path:
    """``plots/`` inside the first run directory (beside it when a ``results.json`` file is given)."""
    first = Path(run_dirs[0])
    return (first.parent if first.is_file() else first) / "plots"


def run(args: argparse.Namespace) -> int:
    """Plot ``args.run_dirs`` into ``args.out`` (default :func:`default_out`) and list the files written; returns
    the exit code."""
    results = finished_results(args.run_dirs)
    for path in plot_results(results, args.out or default_out(args.run_dirs)):
        print(path)
    return 0
