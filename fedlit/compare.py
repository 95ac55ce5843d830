"""Honest comparison of finished runs (``fedlit compare RUN_DIR...``): runs are grouped by every config key that
differs between them except the seed and bookkeeping keys, and each group's metrics are reported as mean ± std and
a 95% confidence interval (Student's t) over its seeds."""

from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from fedlit.errors import UserError
from fedlit.metrics import TRANSFER_PREFIX
from fedlit.reporting import load_results

# Keys that never separate runs: the seed, run bookkeeping, the process layout, where files live, speed settings.
# Keys that never change a run's numbers: layout, storage, bookkeeping and what is recorded besides the metrics.
IGNORED_KEYS = ("seed", "backbone.cache_dir", "data.root", "data.num_workers", "eval.diagnostics")
IGNORED_SECTIONS = ("run.", "trainer.", "perf.", "store.")
METRICS = {"acc_mean": "personalised", "acc_global": "global", "acc_novel_mean": "novel", "hm_of_means": "HM",
           "acc_heldout": "held-out", "participation_gap": "participation gap", "acc_transfer": "transfer"}
SUMMARIES = {"last_round": "last round", "mean_last_5": "mean of last 5"}
FORMATS = ("text", "markdown", "csv")
LEGACY_KEYS = ("dataset", "algorithm")  # results.json without a config: grouped by these two


@dataclass
class Stat:
    """Mean, sample standard deviation and the 95% t-interval of one metric over a group's seeds (in %)."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


@dataclass
class Row:
    """One group of runs and one metric: the group's values of the differing keys, its seeds and statistics."""

    group: dict[str, str]
    seeds: list[int]
    metric: str
    stats: dict[str, Stat]


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested dict as ``{"a.b": value}``."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_ignored(key: str) -> bool:
    """Whether ``key`` is the seed or a bookkeeping key that never separates runs."""
    return key in IGNORED_KEYS or key.startswith(IGNORED_SECTIONS)


def comparable_config(result: dict) -> dict[str, str]:
    """The keys of a run that can separate it from others, values as text; ``algorithm`` is the method the run
    trained (not ``all``). Results without a stored config give only dataset and algorithm."""
    config = result.get("config")
    if config is None:
        return {"data.name": str(result.get("dataset", "?")), "algorithm": str(result["algorithm"])}
    keys = {k: str(v) for k, v in flatten(config).items() if not is_ignored(k)}
    keys["algorithm"] = str(result["algorithm"])
    return keys


def differing_keys(configs: list[dict[str, str]]) -> list[str]:
    """Keys whose value differs between the given configs (a key missing from some counts as differing);
    ``algorithm`` first, then the rest by name."""
    keys = sorted({k for c in configs for k in c if len({c.get(k) for c in configs}) > 1})
    return sorted(keys, key=lambda k: (k != "algorithm", k))


def t_interval(values: list[float], level: float = 0.95) -> Stat:
    """Mean, sample std (ddof 1) and the two-sided ``level`` t-interval of ``values``; std and interval are NaN
    for a single value."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return Stat(1, mean, math.nan, math.nan, math.nan)
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1)) * std / math.sqrt(len(v))
    return Stat(len(v), mean, std, mean - half, mean + half)


def group_runs(results: list[dict]) -> tuple[list[str], dict[tuple[str, ...], list[dict]]]:
    """(the differing keys, the runs of each group keyed by their values of those keys)."""
    configs = [comparable_config(r) for r in results]
    keys = differing_keys(configs)
    groups: dict[tuple[str, ...], list[dict]] = {}
    for result, config in zip(results, configs):
        groups.setdefault(tuple(config.get(k, "-") for k in keys), []).append(result)
    return keys, groups


def final_of(final: dict, metric: str) -> dict | None:
    """``final[metric]`` (``{"last_round": .., "mean_last_5": ..}``); results.json files written before ``final``
    summarised every metric hold ``acc_mean``'s two numbers at the top level."""
    if metric in final:
        return final[metric]
    if metric == "acc_mean" and "last_round" in final:
        return {k: final[k] for k in SUMMARIES if k in final}
    return None


def metric_label(metric: str) -> str:
    """The table's name of ``metric``: :data:`METRICS`, or ``transfer <target>`` for ``transfer/<target>``."""
    return METRICS.get(metric) or metric.replace(TRANSFER_PREFIX, "transfer ", 1)


def reported_metrics(results: list[dict]) -> list[str]:
    """The metrics a comparison reports: :data:`METRICS`, then every ``transfer/<target>`` of the runs' finals."""
    transfer = dict.fromkeys(k for r in results for k in r.get("final", {}) if k.startswith(TRANSFER_PREFIX))
    return [*METRICS, *transfer]


def compare(results: list[dict]) -> tuple[list[str], list[Row]]:
    """The differing keys and one row per (group, reported metric), groups in sorted order. A metric a group's
    runs do not all report (a method without a global prompt has no transfer numbers) gets no row."""
    keys, groups = group_runs(results)
    metrics = reported_metrics(results)
    rows = []
    for values, runs in sorted(groups.items()):
        seeds = sorted(int(r.get("seed", 0)) for r in runs)
        for metric in metrics:
            finals = [final_of(r["final"], metric) for r in runs]
            if any(f is None for f in finals):
                continue
            summary = {s: t_interval([100.0 * f[s] for f in finals]) for s in SUMMARIES if s in finals[0]}
            rows.append(Row(dict(zip(keys, values)), seeds, metric, summary))
    return keys, rows


def _number(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"


def _cells(stat: Stat | None) -> list[str]:
    if stat is None:
        return ["", ""]
    spread = "" if math.isnan(stat.std) else f" ± {stat.std:.2f}"
    interval = "n/a (1 seed)" if stat.n < 2 else f"[{stat.ci_low:.2f}, {stat.ci_high:.2f}]"
    return [f"{stat.mean:.2f}{spread}", interval]


def _table(keys: list[str], rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = (keys or ["runs"]) + ["seeds", "metric"]
    for label in SUMMARIES.values():
        header += [f"{label} (%)", "95% CI"]
    body = []
    for row in rows:
        group = [row.group[k] for k in keys] if keys else ["all"]
        cells = [c for s in SUMMARIES for c in _cells(row.stats.get(s))]
        body.append(group + [str(len(row.seeds)), metric_label(row.metric)] + cells)
    return header, body


def format_text(keys: list[str], rows: list[Row]) -> str:
    """An aligned text table (mean ± sample std in %, 95% t-interval)."""
    header, body = _table(keys, rows)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + body]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def format_markdown(keys: list[str], rows: list[Row]) -> str:
    """A Markdown table of the same cells as :func:`format_text`."""
    header, body = _table(keys, rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def format_csv(keys: list[str], rows: list[Row]) -> str:
    """CSV with one line per (group, metric, summary): n, mean, std, ci_low, ci_high (in %), and the seeds."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(keys + ["metric", "summary", "n", "mean", "std", "ci_low", "ci_high", "seeds"])
    for row in rows:
        for summary, s in row.stats.items():
            writer.writerow([row.group[k] for k in keys] + [row.metric, summary, s.n] +
                            [_number(x) for x in (s.mean, s.std, s.ci_low, s.ci_high)] +
                            [" ".join(map(str, row.seeds))])
    return text.getvalue().rstrip("\n")


def render(results: list[dict], fmt: str = "text") -> str:
    """The comparison of ``results`` in ``fmt`` (text, markdown or csv); text and Markdown start with one line
    naming the keys that separate the groups."""
    keys, rows = compare(results)
    if fmt == "csv":
        return format_csv(keys, rows)
    table = format_markdown(keys, rows) if fmt == "markdown" else format_text(keys, rows)
    grouped = ", ".join(keys) if keys else "nothing (every run has the same config)"
    note = (f"{len(results)} runs grouped by {grouped}; mean ± sample std over seeds, 95% CI from Student's t "
            "(ignored: seed, run.*, trainer.*, perf.*, backbone.cache_dir, data.root, data.num_workers)")
    return note + "\n\n" + table


def finished_results(run_dirs: list[str | Path]) -> list[dict]:
    """Every ``results.json`` with final numbers under ``run_dirs``; UserError when there is none."""
    missing = [str(d) for d in run_dirs if not Path(d).exists()]
    if missing:
        raise UserError(f"no such run directory: {', '.join(missing)}")
    results = [r for r in load_results(list(run_dirs)) if r.get("final")]
    if not results:
        raise UserError(f"no results.json with final numbers under {', '.join(map(str, run_dirs))}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``fedlit compare`` (and ``experiments/compare.py``)."""
    parser.add_argument("run_dirs", nargs="+", help="run directories (searched recursively for results.json)")
    parser.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")


def run(args: argparse.Namespace) -> int:
    """Print the comparison of ``args.run_dirs`` in ``args.format``; returns the exit code."""
    print(render(finished_results(args.run_dirs), args.format))
    return 0
