"""Honest comparison of finished runs (``fedlit compare RUN_DIR...``): runs are grouped by every config key that
differs between them except the seed and bookkeeping keys, and each group's metrics are reported as mean ± std and
a 95% confidence interval (Student's t) over its distinct seeds.

A group counts each seed once: when several runs of one group share a seed (a rerun), the newest ``results.json``
is kept and the others are named in a warning. The precision and the accelerator a run computed with
(``trainer.precision``, ``trainer.accelerator`` in ``results.json``) separate groups; files written before they were
recorded show ``-`` there. Nothing is clipped: an interval from 2 seeds (t = 12.71) is printed and marked as not
meaningful, and "mean of last k" names the k evaluated rounds actually averaged.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from fedlit.config import BUILTIN_BACKBONES
from fedlit.errors import UserError
from fedlit.metrics import TRANSFER_PREFIX
from fedlit.reporting import load_results

# Keys that never change a run's numbers: layout, storage, bookkeeping and what is recorded besides the metrics.
# Of trainer.*, results.json keeps only the precision and the accelerator, which do change them.
IGNORED_KEYS = ("seed", "backbone.cache_dir", "data.root", "data.num_workers", "eval.diagnostics")
IGNORED_SECTIONS = ("run.", "perf.", "store.")
NUMERIC_TRAINER_KEYS = ("trainer.precision", "trainer.accelerator")
METRICS = {"acc_mean": "personalised", "acc_global": "global", "acc_novel_mean": "novel", "hm_of_means": "HM",
           "acc_heldout": "held-out", "participation_gap": "participation gap", "acc_transfer": "transfer"}
SUMMARIES = {"last_round": "last round", "mean_last_5": "mean of last 5"}
MEAN_LAST = 5  # what ``mean_last_5`` averages at most (fedlit.metrics.final_summary)
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
    rounds: tuple[int, ...] = (1,)  # evaluated rounds each value averages (the distinct counts over the runs)


@dataclass
class Row:
    """One group of runs and one metric: the group's values of the differing keys, its seeds and statistics."""

    group: dict[str, str]
    seeds: list[int]
    metric: str
    stats: dict[str, Stat]


@dataclass
class Comparison:
    """The differing keys, one row per (group, metric), the number of runs read and one warning per repeated
    seed."""

    keys: list[str]
    rows: list[Row]
    runs: int
    warnings: list[str] = field(default_factory=list)


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
    """Whether ``key`` is the seed or a bookkeeping key that never separates runs (every ``trainer.*`` key but the
    precision and the accelerator)."""
    if key.startswith("trainer."):
        return key not in NUMERIC_TRAINER_KEYS
    return key in IGNORED_KEYS or key.startswith(IGNORED_SECTIONS)


def comparable_config(result: dict) -> dict[str, str]:
    """The keys of a run that can separate it from others, values as text; ``algorithm`` is the method the run
    trained (not ``all``). Results without a stored config give only dataset and algorithm."""
    config = result.get("config")
    if config is None:
        return {"data.name": str(result.get("dataset", "?")), "algorithm": str(result["algorithm"])}
    keys = {k: str(v) for k, v in flatten(config).items() if not is_ignored(k)}
    keys["algorithm"] = str(result["algorithm"])
    if keys.get("backbone.pretrained") == "None" and keys.get("backbone.name") not in BUILTIN_BACKBONES:
        keys["backbone.pretrained"] = "random"  # written before random weights had to be asked for by name
    return keys


def differing_keys(configs: list[dict[str, str]]) -> list[str]:
    """Keys whose value differs between the given configs (a key missing from some counts as differing);
    ``algorithm`` first, then the rest by name."""
    keys = sorted({k for c in configs for k in c if len({c.get(k) for c in configs}) > 1})
    return sorted(keys, key=lambda k: (k != "algorithm", k))


def t_interval(values: list[float], level: float = 0.95) -> Stat:
    """Mean, sample std (ddof 1) and the two-sided ``level`` t-interval of ``values`` (not clipped to any range);
    std and interval are NaN for a single value."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return Stat(1, mean, math.nan, math.nan, math.nan)
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1)) * std / math.sqrt(len(v))
    return Stat(len(v), mean, std, mean - half, mean + half)


def written_at(result: dict) -> float:
    """When ``result``'s ``results.json`` was last written (its mtime; 0 for a result not read from a file)."""
    path = result.get("_path")
    try:
        return (Path(path) / "results.json").stat().st_mtime if path else 0.0
    except OSError:
        return 0.0


def newest_per_seed(runs: list[dict]) -> tuple[list[dict], dict[int, list[dict]]]:
    """(one run per seed, by seed: the newest ``results.json``, ties to the later path; the runs of every seed
    that occurs more than once, oldest first)."""
    by_seed: dict[int, list[dict]] = {}
    for run in runs:
        by_seed.setdefault(int(run.get("seed", 0)), []).append(run)
    for seed in by_seed:
        by_seed[seed].sort(key=lambda r: (written_at(r), str(r.get("_path", ""))))
    kept = [by_seed[seed][-1] for seed in sorted(by_seed)]
    return kept, {seed: group for seed, group in sorted(by_seed.items()) if len(group) > 1}


def _all_groups(results: list[dict]) -> tuple[list[str], dict[tuple[str, ...], list[dict]]]:
    configs = [comparable_config(r) for r in results]
    keys = differing_keys(configs)
    groups: dict[tuple[str, ...], list[dict]] = {}
    for result, config in zip(results, configs):
        groups.setdefault(tuple(config.get(k, "-") for k in keys), []).append(result)
    return keys, groups


def group_runs(results: list[dict]) -> tuple[list[str], dict[tuple[str, ...], list[dict]]]:
    """(the differing keys, the runs of each group keyed by their values of those keys, one run per seed: see
    :func:`newest_per_seed`)."""
    keys, groups = _all_groups(results)
    return keys, {values: newest_per_seed(runs)[0] for values, runs in groups.items()}


def repeat_warning(keys: list[str], values: tuple[str, ...], seed: int, runs: list[dict]) -> str:
    """One line naming the runs of a group that share ``seed`` and the one kept (the last of ``runs``)."""
    group = ", ".join(f"{k}={v}" for k, v in zip(keys, values)) or "all runs"
    paths = [str(r.get("_path", "?")) for r in runs]
    return (f"warning: seed {seed} occurs {len(runs)} times in the group {group} ({', '.join(paths)}); counting it "
            f"once, with the newest results.json ({paths[-1]})")


def rounds_averaged(result: dict, metric: str, summary: str) -> int:
    """How many evaluated rounds ``final[metric][summary]`` averages: 1 for the last round, the last
    ``MEAN_LAST`` evaluated rounds that report ``metric`` for ``mean_last_5`` (fewer in a shorter run)."""
    if summary == "last_round":
        return 1
    reported = sum(1 for row in result.get("rounds", []) if row.get(metric) is not None)
    return min(MEAN_LAST, reported) if reported else MEAN_LAST


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


def compare(results: list[dict]) -> Comparison:
    """The differing keys, one row per (group, reported metric) with groups in sorted order, each group counting
    every seed once (:func:`newest_per_seed`), and a warning per repeated seed. A metric a group's runs do
    not all report (a method without a global prompt has no transfer numbers) gets no row."""
    keys, groups = _all_groups(results)
    metrics = reported_metrics(results)
    rows, warnings = [], []
    for values, everything in sorted(groups.items()):
        runs, repeats = newest_per_seed(everything)
        warnings += [repeat_warning(keys, values, seed, group) for seed, group in repeats.items()]
        seeds = [int(r.get("seed", 0)) for r in runs]
        for metric in metrics:
            finals = [final_of(r["final"], metric) for r in runs]
            if any(f is None for f in finals):
                continue
            summary = {}
            for s in SUMMARIES:
                if s in finals[0]:
                    stat = t_interval([100.0 * f[s] for f in finals])
                    stat.rounds = tuple(sorted({rounds_averaged(r, metric, s) for r in runs}))
                    summary[s] = stat
            rows.append(Row(dict(zip(keys, values)), seeds, metric, summary))
    return Comparison(keys, rows, len(results), warnings)


def _number(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"


def interval_note(stat: Stat) -> str:
    """What the 95% interval of ``stat`` is worth: "n/a (1 seed)", "not meaningful (2 seeds)" (t = 12.71 makes it
    wider than any difference worth reporting), or "" from 3 seeds on."""
    if stat.n < 2:
        return "n/a (1 seed)"
    return "not meaningful (2 seeds)" if stat.n == 2 else ""


def _k(rounds: tuple[int, ...]) -> str:
    return "-".join(map(str, (rounds[0], rounds[-1]) if len(rounds) > 1 else rounds))


def _cells(stat: Stat | None, own_k: bool) -> list[str]:
    if stat is None:
        return ["", ""]
    spread = "" if math.isnan(stat.std) else f" ± {stat.std:.2f}"
    note = interval_note(stat)
    interval = note if stat.n < 2 else f"[{stat.ci_low:.2f}, {stat.ci_high:.2f}]" + (f" {note}" if note else "")
    k = f" (k={_k(stat.rounds)})" if own_k else ""
    return [f"{stat.mean:.2f}{spread}{k}", interval]


def _summary_label(summary: str, rows: list[Row]) -> tuple[str, bool]:
    """The column label of ``summary`` and whether each cell names its own k: "mean of last k" with the number of
    rounds actually averaged when every row agrees on it."""
    if summary == "last_round":
        return SUMMARIES[summary], False
    ks = {row.stats[summary].rounds for row in rows if summary in row.stats}
    if len(ks) == 1:
        return f"mean of last {_k(next(iter(ks)))}", False
    return "mean of last k", True


def _table(keys: list[str], rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = (keys or ["runs"]) + ["seeds", "metric"]
    labels = {s: _summary_label(s, rows) for s in SUMMARIES}
    for label, _ in labels.values():
        header += [f"{label} (%)", "95% CI"]
    body = []
    for row in rows:
        group = [row.group[k] for k in keys] if keys else ["all"]
        cells = [c for s in SUMMARIES for c in _cells(row.stats.get(s), labels[s][1])]
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
    """CSV with one line per (group, metric, summary): k (evaluated rounds averaged; "3-5" when the runs differ),
    n (distinct seeds), mean, std, ci_low, ci_high (in %, not clipped), the interval's note
    (:func:`interval_note`) and the seeds."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(keys + ["metric", "summary", "k", "n", "mean", "std", "ci_low", "ci_high", "note", "seeds"])
    for row in rows:
        for summary, s in row.stats.items():
            writer.writerow([row.group[k] for k in keys] + [row.metric, summary, _k(s.rounds), s.n] +
                            [_number(x) for x in (s.mean, s.std, s.ci_low, s.ci_high)] +
                            [interval_note(s), " ".join(map(str, row.seeds))])
    return text.getvalue().rstrip("\n")


def format_comparison(comparison: Comparison, fmt: str = "text") -> str:
    """``comparison`` in ``fmt`` (text, markdown or csv); text and Markdown start with one line naming the keys
    that separate the groups."""
    keys, rows = comparison.keys, comparison.rows
    if fmt == "csv":
        return format_csv(keys, rows)
    table = format_markdown(keys, rows) if fmt == "markdown" else format_text(keys, rows)
    grouped = ", ".join(keys) if keys else "nothing (every run has the same config)"
    note = (f"{comparison.runs} runs grouped by {grouped}; mean ± sample std over distinct seeds, 95% CI from "
            "Student's t (ignored: seed, run.*, trainer.* but precision and accelerator, perf.*, store.*, "
            "backbone.cache_dir, data.root, data.num_workers, eval.diagnostics)")
    return note + "\n\n" + table


def render(results: list[dict], fmt: str = "text") -> str:
    """The comparison of ``results`` in ``fmt`` (see :func:`format_comparison`; warnings not included)."""
    return format_comparison(compare(results), fmt)


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
    """Print the comparison of ``args.run_dirs`` in ``args.format`` (warnings about repeated seeds on stderr);
    returns the exit code."""
    comparison = compare(finished_results(args.run_dirs))
    for warning in comparison.warnings:
        print(warning, file=sys.stderr)
    print(format_comparison(comparison, args.format))
    return 0
