"""The ``fedlit`` command end to end: --version, print-config (summary line, inert-method warnings), train (also
``python -m fedlit``), packaged configs, sweep count/list/run, and the thread default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlit import __version__
from fedlit.command import main
from fedlit.config import load_config
from fedlit.packaged import packaged_configs, resolve_config
from fedlit.summary import estimated_client_steps, experts_per_round, inert_warnings
from fedlit.threads import threads_per_process
from tests.helpers import FAST, ROOT, cache_dir, only_run_dir, read_results


def fedlit(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m fedlit ARGS`` in a subprocess (one thread), output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fedlit", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def fast(tmp_path: Path, *extra: str) -> list[str]:
    """The fast overrides writing under ``tmp_path``."""
    return FAST + [f"run.out_dir={tmp_path}", f"backbone.cache_dir={cache_dir()}", *extra]


def test_version():
    done = fedlit("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"fedlit {__version__}"


def test_print_config_prints_yaml_and_the_summary_line(tmp_path, capsys):
    assert main(["print-config", *fast(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "num_experts: 3" in out and "rounds: 3" in out
    # 32 classes x 8 shots over 4 clients = 64 images, 2 batches of 32; 3 rounds x 4 clients x 1 epoch x 2 batches
    assert out.strip().splitlines()[-1] == ("fedlit | clients per round 4 of 4 | K experts 0 (round 1) to 2 "
                                            "(method.num_experts=3 counts the local one) | rounds 3 | "
                                            "estimated client-steps ~24")
    assert err == ""


def test_expert_count_follows_the_sampled_clients(tmp_path):
    cfg = load_config(None, fast(tmp_path, "fed.frac=0.5", "fed.rounds=4"))
    counts = experts_per_round(cfg)
    assert counts[0] == 0 and len(counts) == 4 and max(counts) <= 2
    assert estimated_client_steps(cfg) == 4 * 2 * 1 * 2
    nobody = load_config(None, fast(tmp_path, "fed.dropout=0.99", "fed.rounds=4"))
    assert experts_per_round(nobody) == [0, 0, 0, 0]  # seeded dropout: (almost) no client ever uploads


@pytest.mark.parametrize("overrides,expected", [
    (["algorithm=pfedmoap", "method.num_experts=1"], "K = 0 experts in every round (method.num_experts=1"),
    (["algorithm=pfedmoap_linear", "fed.frac=0.25", "fed.rounds=2"], "1 client(s) per round over 2 round(s)"),
    (["algorithm=fedprox", "method.mu=0"], "fedprox: method.mu=0 removes the proximal term"),
])
def test_inert_methods_warn_without_failing(tmp_path, capsys, overrides, expected):
    assert main(["print-config", *fast(tmp_path, *overrides)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and expected in err, err


def test_working_methods_do_not_warn(tmp_path):
    for overrides in (["algorithm=pfedmoap"], ["algorithm=fedprox"], ["algorithm=all"], ["algorithm=promptfl",
                                                                                         "method.num_experts=1"]):
        assert inert_warnings(load_config(None, fast(tmp_path, *overrides))) == []


def test_train_subcommand_runs_warns_and_stores_the_resolved_config(tmp_path):
    done = fedlit("train", *fast(tmp_path, "fed.rounds=1", "method.num_experts=1", "method.lam=0.25"))
    assert done.returncode == 0, done.stderr
    assert "warning: pfedmoap: K = 0 experts in every round" in done.stderr
    results = read_results(only_run_dir(tmp_path))
    assert results["config"]["method"]["lam"] == 0.25 and results["config"]["seed"] == 0
    assert "run" not in results["config"] and "store" not in results["config"]
    assert results["config"]["trainer"] == {"precision": "32-true", "accelerator": "cpu"}  # only what changes numbers


def test_train_keeps_its_exit_codes_and_help(tmp_path):
    bad = fedlit("train", *fast(tmp_path, "fed.roundz=1"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: unknown config key 'fed.roundz'; did you mean fed.rounds")
    helped = fedlit("train", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: fedlit train")
    assert main(["train", "--config", "/nonexistent/x.yaml"]) == 2


def test_usage_errors_are_one_line(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: argument command: invalid choice: 'frobnicate'")


def test_packaged_configs_resolve_from_any_directory(tmp_path, monkeypatch, capsys):
    expected = ROOT / "configs" / "paper" / "table1_dtd.yaml"
    for name in ("paper/table1_dtd", "paper/table1_dtd.yaml", "configs/paper/table1_dtd.yaml"):
        monkeypatch.chdir(tmp_path)
        assert Path(resolve_config(name)).resolve() == expected
    assert resolve_config("nowhere/none") == "nowhere/none"  # left as given: loading reports the missing file
    assert {"default", "paper/table1_dtd", "sweeps/table1"} <= set(packaged_configs())
    assert main(["print-config", "--config", "paper/table1_dtd", f"run.out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "name: RN50-quickgelu" in out and "clients per round 10 of 10" in out


def test_sweep_count_and_list(capsys):
    assert main(["sweep", "count", "sweeps/table1"]) == 0
    assert capsys.readouterr().out.strip() == "135"
    assert main(["sweep", "list", "configs/sweeps/quickstart.yaml"]) == 0
    cells = ["0: seed=0 run.name=quickstart-seed=0", "1: seed=1 run.name=quickstart-seed=1"]
    assert capsys.readouterr().out.splitlines() == cells
    assert main(["sweep", "count", "/nonexistent/sweep.yaml"]) == 2


def test_sweep_run_trains_the_cells_n_at_a_time(tmp_path):
    sweep = tmp_path / "two.yaml"
    out = tmp_path / "runs"
    sweep.write_text(json.dumps({"name": "two", "base": fast(out, "fed.rounds=1", "algorithm=promptfl"),
                                 "grid": {"seed": [0, 1]}}))
    done = fedlit("sweep", "run", str(sweep), "--jobs", "2", "--log-dir", str(tmp_path / "logs"))
    assert done.returncode == 0, done.stdout + done.stderr
    threads = threads_per_process(2)
    assert f"sweep two: 2 cells, 2 at a time, OMP_NUM_THREADS={threads}" in done.stdout
    assert sorted(line.split(" (")[0] for line in done.stdout.splitlines()[1:]) == ["cell 1/2", "cell 2/2"]
    seeds = sorted(read_results(only_run_dir(out, f"two-seed={i}"))["seed"] for i in (0, 1))
    assert seeds == [0, 1]
    assert (tmp_path / "logs" / "two-seed=0.log").is_file()


def test_sweep_run_reports_failing_cells(tmp_path):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(json.dumps({"base": fast(tmp_path / "runs"), "cells": [["fed.rounds=0"]]}))
    done = fedlit("sweep", "run", str(sweep), "--log-dir", str(tmp_path / "logs"))
    assert done.returncode == 2
    assert done.stderr.strip() == "error: 1 of 1 cells failed: 0"
    assert "fed.rounds must be >= 1" in (tmp_path / "logs" / "bad-fed.rounds=0.log").read_text()


def test_threads_per_process_divides_the_cores():
    assert [threads_per_process(n, cores=16) for n in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    assert threads_per_process(1) == len(os.sched_getaffinity(0))
