"""``fedlit compare``: groups by every differing config key except the seed and bookkeeping (but by the precision
and accelerator), mean ± std and a 95% t-interval over distinct seeds, text / Markdown / CSV; experiments/compare.py
prints the same."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys

import pytest

from fedlit.command import main
from fedlit.compare import comparable_config, compare, differing_keys, render, t_interval
from fedlit.errors import UserError
from fedlit.federation.experiment import build_job, run_experiment
from fedlit.reporting import load_results
from tests.helpers import ROOT, fast_config, only_run_dir, read_results


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
    assert set(rows[0]) == {"method.lam", "metric", "summary", "k", "n", "mean", "std", "ci_low", "ci_high", "note",
                            "seeds"}
    personal = {(r["method.lam"], r["summary"]): r for r in rows if r["metric"] == "acc_mean"}
    merged, alone = personal[("0.5", "last_round")], personal[("0.3", "last_round")]
    assert (merged["n"], merged["seeds"], alone["n"], alone["seeds"]) == ("2", "0 1", "1", "0")
    values = [100 * read_results(runs / d)["final"]["acc_mean"]["last_round"] for d in ("a", "b")]
    expected = t_interval(values)
    assert float(merged["mean"]) == pytest.approx(expected.mean, abs=0.006)
    assert float(merged["std"]) == pytest.approx(expected.std, abs=0.006)
    assert float(merged["ci_low"]) == pytest.approx(expected.ci_low, abs=0.006)
    assert (merged["note"], alone["note"]) == ("not meaningful (2 seeds)", "n/a (1 seed)")
    assert float(merged["ci_high"]) == pytest.approx(expected.ci_high, abs=0.006)  # not clipped to [0, 100]
    assert {r["k"] for r in rows if r["summary"] == "mean_last_5"} == {"2"}  # 2 rounds: the mean of the last 2
    assert {r["k"] for r in rows if r["summary"] == "last_round"} == {"1"}
    assert alone["std"] == "n/a" and float(alone["mean"]) == pytest.approx(
        100 * read_results(runs / "c")["final"]["acc_mean"]["last_round"], abs=0.006)
    assert {r["metric"] for r in rows} == {"acc_mean", "acc_global"}
    assert {r["summary"] for r in rows} == {"last_round", "mean_last_5"}


def test_text_and_markdown_name_the_groups_and_seed_counts(runs, capsys):
    assert main(["compare", str(runs)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("3 runs grouped by method.lam; mean ± sample std over distinct seeds, 95% CI from "
                           "Student's t")
    lines = text.splitlines()
    header = lines[2].split()
    assert header[:3] == ["method.lam", "seeds", "metric"]
    assert "mean of last 2 (%)" in lines[2] and "mean of last 5" not in lines[2]
    assert lines[6].count("not meaningful (2 seeds)") == 2
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


def copy_result(source, target, seed: int | None = None, acc: float | None = None, mtime: float | None = None,
                edit=None):
    """A copy of the results.json of run directory ``source`` into ``target`` (a new directory), with another seed,
    last-round personalised accuracy, modification time or any other ``edit(data)``."""
    data = read_results(source)
    if seed is not None:
        data["seed"] = seed
    if acc is not None:
        data["final"]["acc_mean"]["last_round"] = data["final"]["last_round"] = acc
    if edit is not None:
        edit(data)
    target.mkdir(parents=True)
    (target / "results.json").write_text(json.dumps(data))
    if mtime is not None:
        os.utime(target / "results.json", (mtime, mtime))
    return target


def test_a_rerun_of_a_seed_counts_once_with_the_newest_results_and_a_warning(runs, tmp_path, capsys):
    # Today's bug: a rerun of seed 0 made "3 seeds" and the CSV listed seeds 0 0 1.
    old = copy_result(runs / "a", tmp_path / "old", acc=0.10, mtime=1_000_000)
    new = copy_result(runs / "a", tmp_path / "new", acc=0.30, mtime=2_000_000)
    copy_result(runs / "b", tmp_path / "other", acc=0.50, mtime=1_500_000)
    assert main(["compare", str(tmp_path), "--format", "csv"]) == 0
    out = capsys.readouterr()
    [row] = [r for r in csv.DictReader(io.StringIO(out.out)) if (r["metric"], r["summary"]) == ("acc_mean",
                                                                                                   "last_round")]
    assert (row["n"], row["seeds"]) == ("2", "0 1")
    assert float(row["mean"]) == pytest.approx(40.0, abs=1e-9)  # (30 + 50) / 2: the newer seed-0 run
    assert out.err.splitlines() == [f"warning: seed 0 occurs 2 times in the group all runs ({old}, {new}); counting "
                                    f"it once, with the newest results.json ({new})"]


def test_precision_is_recorded_separates_groups_and_a_resume_must_keep_it(tmp_path, capsys):
    # Today's bug: results.json left trainer.* out, so bf16 and fp32 runs of one seed pooled as two seeds.
    common = ["algorithm=promptfl", "fed.rounds=2", "seed=0"]
    run_experiment(fast_config(tmp_path / "fp32", *common))
    run_experiment(fast_config(tmp_path / "bf16", *common, "trainer.precision=bf16-mixed"))
    fp32, bf16 = only_run_dir(tmp_path / "fp32"), only_run_dir(tmp_path / "bf16")
    assert read_results(fp32)["config"]["trainer"] == {"precision": "32-true", "accelerator": "cpu"}
    assert read_results(bf16)["config"]["trainer"] == {"precision": "bf16-mixed", "accelerator": "cpu"}
    legacy = copy_result(fp32, tmp_path / "legacy" / "run", edit=lambda d: d["config"].pop("trainer"))
    comparison = compare(load_results([tmp_path]))
    assert comparison.keys == ["trainer.accelerator", "trainer.precision"] and comparison.warnings == []
    personal = {r.group["trainer.precision"]: r for r in comparison.rows if r.metric == "acc_mean"}
    assert {k: r.group["trainer.accelerator"] for k, r in personal.items()} == {"32-true": "cpu", "bf16-mixed": "cpu",
                                                                                "-": "-"}
    assert {k: r.seeds for k, r in personal.items()} == {"32-true": [0], "bf16-mixed": [0], "-": [0]}
    for precision, run_dir in (("32-true", fp32), ("bf16-mixed", bf16), ("-", legacy)):
        assert personal[precision].stats["last_round"].mean == pytest.approx(
            100 * read_results(run_dir)["final"]["acc_mean"]["last_round"])
    with pytest.raises(UserError, match=r"computed with precision bf16-mixed on cpu, this run would continue with "
                                        r"precision 32-true on cpu; resume with trainer.precision=bf16-mixed"):
        run_experiment(fast_config(tmp_path / "bf16", *common, "fed.rounds=3", "run.resume=auto"))
    assert read_results(bf16)["rounds"][-1]["round"] == 2  # refused before anything was written


def test_mean_of_last_k_names_the_rounds_averaged(runs, tmp_path):
    def rounds(n: int):
        def edit(data):
            data["config"]["fed"]["rounds"] = n
            data["rounds"] = [dict(data["rounds"][-1], round=r) for r in range(1, n + 1)]
        return edit

    copy_result(runs / "a", tmp_path / "three", edit=rounds(3))
    copy_result(runs / "a", tmp_path / "seven", edit=rounds(7))
    text = render(load_results([tmp_path]))
    header, *body = text.splitlines()[2:]
    assert "mean of last k (%)" in header
    three, seven = [line for line in body if "personalised" in line]
    assert three.startswith("3 ") and "(k=3)" in three and seven.startswith("7 ") and "(k=5)" in seven
    assert [r.stats["mean_last_5"].rounds for r in compare(load_results([tmp_path])).rows] == [(3,), (3,), (5,),
                                                                                                 (5,)]


def test_results_of_a_real_architecture_without_weights_group_with_explicit_random(runs):
    config = read_results(runs / "a")["config"]
    legacy = {**config, "backbone": {**config["backbone"], "name": "ViT-B-32", "pretrained": None}}
    explicit = {**config, "backbone": {**config["backbone"], "name": "ViT-B-32", "pretrained": "random"}}
    configs = [comparable_config({"config": c, "algorithm": "promptfl"}) for c in (legacy, explicit)]
    assert differing_keys(configs) == [] and configs[0]["backbone.pretrained"] == "random"
    assert comparable_config({"config": config, "algorithm": "x"})["backbone.pretrained"] == "None"  # tiny
