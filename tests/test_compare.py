"""``fedlit compare``: groups by every differing config key except the seed and bookkeeping, mean ± std and a 95%
t-interval over seeds, text / Markdown / CSV; experiments/compare.py prints the same."""

from __future__ import annotations

import csv
import io
import math
import subprocess
import sys

import pytest

from fedlit.command import main
from fedlit.compare import comparable_config, differing_keys, render, t_interval
from fedlit.federation.experiment import build_job
from tests.helpers import ROOT, fast_config, read_results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three finished pFedMoAP runs: method.lam=0.5 with seeds 0 and 1 (different run names and thread layouts),
    and method.lam=0.3 with seed 0."""
    root = tmp_path_factory.mktemp("compare")
    cells = [("a", ["seed=0", "method.lam=0.5", "run.name=first"]),
             ("b", ["seed=1", "method.lam=0.5", "run.name=second", "data.num_workers=0", "perf.client_batch=2"]),
             ("c", ["seed=0", "method.lam=0.3"])]
    for name, overrides in cells:
        cfg = fast_config(root, "algorithm=pfedmoap", "fed.rounds=2", *overrides)
        build_job(cfg).orchestrator(root / name).run()
    return root


def test_t_interval_numbers():
    s = t_interval([50.0, 70.0])  # std 14.142, t(0.975, 1) = 12.706: half-width 12.706 * 14.142 / sqrt(2) = 127.06
    assert (s.n, s.mean) == (2, 60.0) and s.std == pytest.approx(14.1421, abs=1e-4)
    assert (s.ci_low, s.ci_high) == (pytest.approx(-67.0620, abs=1e-3), pytest.approx(187.0620, abs=1e-3))
    three = t_interval([1.0, 2.0, 3.0])  # t(0.975, 2) = 4.3027, std 1: half-width 2.4842
    assert (three.ci_low, three.ci_high) == (pytest.approx(-0.4842, abs=1e-4), pytest.approx(4.4842, abs=1e-4))
    single = t_interval([42.0])
    assert single.mean == 42.0 and math.isnan(single.std) and math.isnan(single.ci_low)


def test_bookkeeping_keys_and_the_seed_never_separate_runs():
    base = {"algorithm": "all", "seed": 0, "method": {"lam": 0.5}, "data": {"root": "a", "num_workers": 0},
            "backbone": {"cache_dir": "x"}, "perf": {"client_batch": 0}, "run": {"name": "a"},
            "store": {"backend": "memory"}, "eval": {"diagnostics": False, "protocol": "standard"}}
    other = {**base, "seed": 3, "data": {"root": "b", "num_workers": 4}, "backbone": {"cache_dir": "y"},
             "perf": {"client_batch": 8}, "run": {"name": "b"}, "store": {"backend": "disk"},
             "eval": {"diagnostics": True, "protocol": "standard"}}
    configs = [comparable_config({"config": c, "algorithm": "promptfl"}) for c in (base, other)]
    assert differing_keys(configs) == []
    assert configs[0]["algorithm"] == "promptfl"  # the method a run of algorithm=all trained, not "all"
    assert differing_keys(configs + [comparable_config({"config": base, "algorithm": "pfedmoap"})]) == ["algorithm"]


def test_compare_separates_an_ablation_key_and_merges_seeds(runs, capsys):
    assert main(["compare", str(runs), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert set(rows[0]) == {"method.lam", "metric", "summary", "n", "mean", "std", "ci_low", "ci_high", "seeds"}
    personal = {(r["method.lam"], r["summary"]): r for r in rows if r["metric"] == "acc_mean"}
    merged, alone = personal[("0.5", "last_round")], personal[("0.3", "last_round")]
    assert (merged["n"], merged["seeds"], alone["n"], alone["seeds"]) == ("2", "0 1", "1", "0")
    values = [100 * read_results(runs / d)["final"]["acc_mean"]["last_round"] for d in ("a", "b")]
    expected = t_interval(values)
    assert float(merged["mean"]) == pytest.approx(expected.mean, abs=0.006)
    assert float(merged["std"]) == pytest.approx(expected.std, abs=0.006)
    assert float(merged["ci_low"]) == pytest.approx(expected.ci_low, abs=0.006)
    assert alone["std"] == "n/a" and float(alone["mean"]) == pytest.approx(
        100 * read_results(runs / "c")["final"]["acc_mean"]["last_round"], abs=0.006)
    assert {r["metric"] for r in rows} == {"acc_mean", "acc_global"}
    assert {r["summary"] for r in rows} == {"last_round", "mean_last_5"}


def test_text_and_markdown_name_the_groups_and_seed_counts(runs, capsys):
    assert main(["compare", str(runs)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("3 runs grouped by method.lam; mean ± sample std over seeds, 95% CI from Student's t")
    lines = text.splitlines()
    header = lines[2].split()
    assert header[:3] == ["method.lam", "seeds", "metric"]
    assert [line.split()[:3] for line in lines[4:]] == [["0.3", "1", "personalised"], ["0.3", "1", "global"],
                                                        ["0.5", "2", "personalised"], ["0.5", "2", "global"]]
    assert "n/a (1 seed)" in lines[4] and "±" in lines[6]
    assert main(["compare", str(runs), "--format", "markdown"]) == 0
    table = capsys.readouterr().out.splitlines()[2:]
    assert table[0].startswith("| method.lam | seeds | metric |") and table[1].startswith("|---|")
    assert len(table) == 6


def test_experiments_compare_prints_the_same(runs):
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "compare.py"), str(runs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from fedlit.compare import finished_results

    assert done.stdout.strip() == render(finished_results([runs])).strip()


def test_nothing_to_compare_is_one_line(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: no results.json with final numbers under {tmp_path}"
    assert main(["compare", str(tmp_path / "missing")]) == 2
