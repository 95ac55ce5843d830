"""Sweep files (fast, no Slurm) and the sbatch scripts on a real one-node Slurm cluster (marked ``slurm``).

The Slurm tests install Debian's slurmctld/slurmd/slurm-client/munge when missing (root + apt-get), start a private
cluster in a temporary directory, and check: an array job over the 2-cell quickstart sweep, and a requeue of a
running job through each script (a 1-process array task, and a 2-task ``srun`` run with ``trainer.devices=2``):
``scancel --batch --signal=USR1`` -> the run checkpoints and calls ``scontrol requeue`` -> the restart resumes and
finishes every round. The daemons this module started are stopped by pid at the end.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from fedlit.config import load_config
from fedlit.sweeps import Sweep, array_range, format_value, load_sweep, main, read_sweep
from tests.slurm_cluster import SlurmCluster, slurm_unavailable

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "slurm" / "_common.sh"


def write_sweep(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Sweep files (no Slurm)
# ---------------------------------------------------------------------------------------------------------------------
def test_grid_is_the_cartesian_product_in_order_with_base_first_and_run_names(tmp_path):
    path = write_sweep(tmp_path / "abl.yaml", {
        "config": "configs/default.yaml",
        "base": ["fed.rounds=3"],
        "grid": {"seed": [0, 1], "data.partition": ["iid", "dirichlet"], "gate.top_k": [None]},
    })
    assert load_sweep(path) == [
        ["fed.rounds=3", "seed=0", "data.partition=iid", "gate.top_k=null",
         "run.name=abl-seed=0,data.partition=iid,gate.top_k=null"],
        ["fed.rounds=3", "seed=0", "data.partition=dirichlet", "gate.top_k=null",
         "run.name=abl-seed=0,data.partition=dirichlet,gate.top_k=null"],
        ["fed.rounds=3", "seed=1", "data.partition=iid", "gate.top_k=null",
         "run.name=abl-seed=1,data.partition=iid,gate.top_k=null"],
        ["fed.rounds=3", "seed=1", "data.partition=dirichlet", "gate.top_k=null",
         "run.name=abl-seed=1,data.partition=dirichlet,gate.top_k=null"],
    ]
    sweep = read_sweep(path)
    assert sweep.name == "abl" and sweep.config == "configs/default.yaml"
    assert sweep.argv(2) == ["--config", "configs/default.yaml", "fed.rounds=3", "seed=1", "data.partition=iid",
                             "gate.top_k=null", "run.name=abl-seed=1,data.partition=iid,gate.top_k=null"]


def test_cells_accept_lists_and_mappings_and_keep_their_own_run_name(tmp_path):
    path = write_sweep(tmp_path / "x.yaml", {
        "name": "methods",
        "cells": [
            ["algorithm=promptfl"],
            {"algorithm": "pfedmoap", "method.num_experts": 4, "optim.persistent_state": True},
            ["algorithm=fedprox", "run.name=prox"],
        ],
    })
    sweep = read_sweep(path)
    assert sweep.config is None
    assert sweep.cells == [
        ["algorithm=promptfl", "run.name=methods-algorithm=promptfl"],
        ["algorithm=pfedmoap", "method.num_experts=4", "optim.persistent_state=true",
         "run.name=methods-algorithm=pfedmoap,method.num_experts=4,optim.persistent_state=true"],
        ["algorithm=fedprox", "run.name=prox"],
    ]
    # no config file: typed defaults
    assert sweep.argv(0) == ["algorithm=promptfl", "run.name=methods-algorithm=promptfl"]


def test_format_value_round_trips_through_the_config_loader():
    assert [format_value(v) for v in (True, False, None, 3, 0.25, "dtd", [1, 2])] == \
        ["true", "false", "null", "3", "0.25", "dtd", "[1,2]"]
    cfg = load_config(None, [f"optim.persistent_state={format_value(True)}", f"gate.top_k={format_value(None)}",
                             f"optim.prompt_lr={format_value(0.25)}"])
    assert cfg.optim.persistent_state is True and cfg.gate.top_k is None and cfg.optim.prompt_lr == 0.25


def test_every_cell_of_the_quickstart_sweep_is_a_valid_config():
    sweep = read_sweep(ROOT / "configs" / "sweeps" / "quickstart.yaml")
    assert len(sweep.cells) == 2
    assert sweep.config == "configs/default.yaml"
    default = asdict(load_config(ROOT / sweep.config))
    for seed, cell in enumerate(sweep.cells):
        cfg = asdict(load_config(ROOT / sweep.config, cell))
        assert (cfg["seed"], cfg["run"]["name"]) == (seed, f"quickstart-seed={seed}")
        # the offline default in everything else
        assert {**cfg, "seed": default["seed"], "run": default["run"]} == default


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"sed": [0, 1]}}, "unknown config key 'sed'; did you mean seed"),
    ({"grid": {"seed": []}}, "grid.seed must be a non-empty list"),
    ({"grid": {"seed": 3}}, "grid.seed must be a non-empty list"),
    ({"grid": {"seed": [0]}, "cells": [["seed=1"]]}, "exactly one of grid"),
    ({"base": ["fed.rounds=2"]}, "exactly one of grid"),
    ({"cells": [["seed"]]}, "override 'seed' is not of the form key=value"),
    ({"cells": []}, "cells must be a non-empty list"),
    ({"cells": [["seed=1"]], "overrides": []}, "unknown sweep key(s) overrides"),
])
def test_bad_sweep_files_fail_with_one_clear_line(tmp_path, spec, message):
    path = write_sweep(tmp_path / "bad.yaml", spec)
    with pytest.raises(ValueError) as err:
        load_sweep(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="sweep file not found"):
        load_sweep(tmp_path / "missing.yaml")


def test_command_line_count_range_args_and_bad_index(tmp_path, capsys):
    path = str(write_sweep(tmp_path / "s.yaml", {"config": "c.yaml", "grid": {"seed": [0, 1, 2]}}))
    assert main(["count", path]) == 0 and capsys.readouterr().out == "3\n"
    assert main(["range", path]) == 0 and capsys.readouterr().out == "0-2\n"
    assert main(["range", path, "2"]) == 0 and capsys.readouterr().out == "0-2%2\n"
    assert main(["args", path, "1"]) == 0
    assert capsys.readouterr().out.splitlines() == ["--config", "c.yaml", "seed=1", "run.name=s-seed=1"]
    assert main(["list", path]) == 0
    assert capsys.readouterr().out.splitlines()[2] == "2: seed=2 run.name=s-seed=2"
    for argv in (["args", path, "3"], ["args", path, "-1"], ["args", path, "x"], ["range", path, "0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, argv
    assert array_range(1) == "0"
    # the installed entry point, as the sbatch script calls it
    out = subprocess.run([sys.executable, "-m", "fedlit.sweeps", "args", path, "7"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr == "error: cell index 7 out of range: this sweep has 3 cells (valid indices 0-2)\n"


def test_sweep_argv_rejects_out_of_range_indices():
    with pytest.raises(IndexError, match="out of range"):
        Sweep(name="s", config=None, cells=[["seed=0"]]).argv(1)


# ---------------------------------------------------------------------------------------------------------------------
# slurm/_common.sh without Slurm: signal forwarding and the resume rule
# ---------------------------------------------------------------------------------------------------------------------
CHILD = """
import signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
open(sys.argv[1], "w").close()
t = time.time()
while not got and time.time() - t < 20:
    time.sleep(0.02)
sys.exit(5 if got else 9)
"""


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_batch_shell_forwards_stop_signals_to_the_child_and_returns_its_exit_code(tmp_path, sig):
    ready = tmp_path / "ready"
    script = (f'FEDLIT_ROOT={ROOT}\nsource {COMMON}\n'
              f'fedlit_run_forwarding_signals {sys.executable} -c \'{CHILD}\' {ready}\necho "returned $?"\n')
    shell = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    shell.send_signal(getattr(signal, f"SIG{sig}"))
    out, _ = shell.communicate(timeout=30)
    assert "returned 5" in out  # the child saw SIGUSR1 and its exit code came back through the trap
    assert "stop signal: asking pid" in out


@pytest.mark.parametrize("mode, restarts, expected", [
    ("requeue", "0", ""), ("requeue", "1", "run.resume=auto"), ("always", "0", "run.resume=auto"),
    ("never", "2", ""),
])
def test_resume_override_only_after_a_restart_by_default(mode, restarts, expected):
    env = {**os.environ, "FEDLIT_RESUME": mode, "SLURM_RESTART_COUNT": restarts}
    out = subprocess.run(["bash", "-c", f"source {COMMON}; fedlit_resume_override"], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == expected


# ---------------------------------------------------------------------------------------------------------------------
# fedlit slurm without Slurm: the sbatch command built from the documented variables
# ---------------------------------------------------------------------------------------------------------------------
def test_fedlit_slurm_builds_sbatch_from_the_documented_variables(tmp_path, monkeypatch, capsys):
    from fedlit.command import main as fedlit

    for name, value in {"FEDLIT_PARTITION": "gpu", "FEDLIT_ACCOUNT": "lab", "FEDLIT_TIME": "02:00:00",
                        "FEDLIT_MEM": "16G", "FEDLIT_CPUS": "8", "FEDLIT_GPUS": "", "FEDLIT_LOG_DIR": "logs"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no checkout here: packaged names resolve to the files shipped with fedlit
    assert fedlit(["slurm", "array", "--max-parallel", "1", "sweeps/quickstart", "seed=3", "--dry-run"]) == 0
    resources = "--partition=gpu --account=lab --time=02:00:00 --mem=16G --cpus-per-task=8"
    assert capsys.readouterr().out == (f"sbatch --array=0-1%1 {resources} --output=logs/%A_%a.out {ROOT}/slurm/"
                                       f"array.sbatch {ROOT}/configs/sweeps/quickstart.yaml seed=3\n")
    assert fedlit(["slurm", "run", "--nodes", "2", "--tasks-per-node", "4", "--sbatch=--qos=high --gpus-per-node=4",
                   "paper/table1_dtd", "fed.rounds=3", "--dry-run"]) == 0
    assert capsys.readouterr().out == (f"sbatch --nodes=2 --ntasks-per-node=4 {resources} --output=logs/%x_%j.out "
                                       f"--qos=high --gpus-per-node=4 {ROOT}/slurm/multinode.sbatch "
                                       f"{ROOT}/configs/paper/table1_dtd.yaml fed.rounds=3\n")
    assert not (tmp_path / "logs").exists()  # a dry run creates nothing
    assert fedlit(["slurm", "array", "missing.yaml", "--dry-run"]) == 2
    assert capsys.readouterr().err == "error: sweep file not found: missing.yaml\n"


# ---------------------------------------------------------------------------------------------------------------------
# A real one-node Slurm cluster
# ---------------------------------------------------------------------------------------------------------------------
SMALL = ["backbone.name=tiny", "gate.d_gate=16", "data.num_clients=4", "method.num_experts=2", "data.shots=4",
         "data.train_per_class=8", "data.test_per_class=4", "algorithm=pfedmoap"]
TINY = SMALL + ["fed.rounds=2", "fed.local_epochs=1"]
# Enough rounds that a stop signal sent after the first checkpoint lands while the job is still training.
REQUEUE_ROUNDS = 30
LONG = SMALL + [f"fed.rounds={REQUEUE_ROUNDS}", "fed.local_epochs=2"]


def venv_env() -> dict[str, str]:
    """How the sbatch scripts find this interpreter: the default ``$FEDLIT_ROOT/.venv``, another venv, or PATH."""
    if Path(sys.prefix).resolve() == (ROOT / ".venv").resolve():
        return {}
    if sys.prefix != sys.base_prefix:
        return {"FEDLIT_VENV": sys.prefix}
    return {"FEDLIT_VENV": "none", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        print(f"slurm cluster up in {time.monotonic() - t0:.1f} s")
        yield slurm
    finally:
        slurm.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Run outputs, logs and the feature cache shared by the Slurm tests."""
    path = tmp_path_factory.mktemp("slurm-work")
    (path / "logs").mkdir()
    return path


@contextmanager
def explained(cluster, *logs: Path):
    """On failure, print the job logs and the daemon logs (pytest shows them with the failure)."""
    try:
        yield
    except BaseException:
        for log in logs:
            print(f"==== {log} ====\n{log.read_text(errors='replace') if log.exists() else '(missing)'}")
        print(cluster.daemon_logs())
        raise


def results_of(out_dir: Path, name: str) -> tuple[Path, dict]:
    """The single run directory of ``name`` and its results.json."""
    runs = sorted(p for p in (out_dir / name).iterdir() if p.is_dir())
    assert len(runs) == 1, f"expected one run directory for {name}, found {runs}"
    return runs[0], json.loads((runs[0] / "results.json").read_text())


def accuracies(results: dict) -> list[tuple[int, list[float]]]:
    """(round, per-client test accuracies) of every evaluated round."""
    return [(r["round"], r["accuracy"]) for r in results["rounds"]]


def wait_for_file(pattern: str, root: Path, timeout: float, job_state) -> None:
    """Poll until ``root.glob(pattern)`` finds a file; fail if the job ends first or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not list(root.glob(pattern)):
        assert time.monotonic() < deadline, f"no {pattern} under {root} after {timeout:.0f} s"
        assert job_state() not in {"COMPLETED", "FAILED", "CANCELLED"}, f"job ended before writing {pattern}"
        time.sleep(0.1)


@pytest.mark.slurm
def test_array_job_runs_each_cell_of_the_quickstart_sweep(cluster, work):
    sweep = "configs/sweeps/quickstart.yaml"
    spec = subprocess.run([sys.executable, "-m", "fedlit.sweeps", "range", sweep], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert spec == "0-1"
    out = work / "array"
    extra = TINY + [f"run.out_dir={out}", f"backbone.cache_dir={work / 'cache'}"]
    t0 = time.monotonic()
    # Submitted from the repository without FEDLIT_ROOT: the script finds it through SLURM_SUBMIT_DIR.
    job = cluster.sbatch(f"--array={spec}", f"--output={work / 'logs'}/%A_%a.out", "slurm/array.sbatch", sweep,
                         *extra, cwd=ROOT, env=venv_env())
    logs = [work / "logs" / f"{job}_{i}.out" for i in range(2)]
    with explained(cluster, *logs):
        records = cluster.wait_job(job, timeout=180)
        print(f"array job (2 cells, 2 rounds each) finished in {time.monotonic() - t0:.1f} s")
        assert sorted((r["ArrayTaskId"], r["JobState"], r["ExitCode"]) for r in records) == \
            [("0", "COMPLETED", "0:0"), ("1", "COMPLETED", "0:0")]
        per_cell = []
        for i, log in enumerate(logs):
            text = log.read_text()
            cell = f"--config configs/default.yaml seed={i} run.name=quickstart-seed={i}"
            assert f"sweep {sweep} cell {i}: {cell}" in text
            assert "restart 0" in text and "run.resume=auto" not in text
            run_dir, results = results_of(out, f"quickstart-seed={i}")
            assert (results["seed"], results["algorithm"], results["world_size"]) == (i, "pfedmoap", 1)
            assert [r["round"] for r in results["rounds"]] == [1, 2]
            assert {"config.yaml", "partition.json", "metrics.csv", "checkpoint.pt"} <= \
                {p.name for p in run_dir.iterdir()}
            per_cell.append(accuracies(results))
        assert per_cell[0] != per_cell[1]  # the grid's seed reached each cell


def submit_and_requeue(cluster, out: Path, name: str, submit) -> tuple[dict, str]:
    """Submit with ``submit() -> (job id, log path, signal target)``, wait for the first checkpoint of run ``name``
    under ``out``, send SIGUSR1 to the batch shell, and wait until the requeued job has finished. Returns the run's
    results.json and the job log."""
    t0 = time.monotonic()
    job, log, target = submit()
    with explained(cluster, log):
        def state() -> str | None:
            return (cluster.jobs(job) or [{}])[0].get("JobState")

        wait_for_file(f"{name}/*/checkpoint.pt", out, timeout=120, job_state=state)
        cluster.command("scancel", "--batch", "--signal=USR1", target)
        t_signal = time.monotonic()
        cluster.wait_job(job, timeout=120, until=lambda recs: recs and int(recs[0].get("Restarts", 0)) >= 1)
        records = cluster.wait_job(job, timeout=180)
        print(f"{name}: signalled {t_signal - t0:.1f} s after submission, finished after requeue in "
              f"{time.monotonic() - t_signal:.1f} s")
        summary = [(r["JobState"], r["ExitCode"], r["Restarts"]) for r in records]
        assert summary == [("COMPLETED", "0:0", "1")], f"job {job} (state, exit code, restarts): {summary}"
        text = log.read_text()
        assert "fedlit: stopped after round" in text and "; requeued" in text, "the run did not requeue itself"
        assert "restart 1" in text and "run.resume=auto" in text
        resumed = re.findall(r"resuming after round (\d+)", text)
        assert len(resumed) == 1 and 1 <= int(resumed[0]) < REQUEUE_ROUNDS, resumed
        run_dir, results = results_of(out, name)  # one directory: the restart continued it
        rounds = list(range(1, REQUEUE_ROUNDS + 1))
        assert [r["round"] for r in results["rounds"]] == rounds
        csv_rounds = [int(row["round"]) for row in csv.DictReader((run_dir / "metrics.csv").open())]
        assert csv_rounds == rounds
    return results, text


@pytest.fixture(scope="module")
def requeued_array_task(cluster, work) -> dict:
    """A 1-cell sweep of REQUEUE_ROUNDS rounds through slurm/array.sbatch, interrupted and requeued once."""
    sweep = write_sweep(work / "long.yaml", {
        "name": "long", "config": str(ROOT / "configs" / "default.yaml"),
        "base": LONG + [f"backbone.cache_dir={work / 'cache'}"], "cells": [[f"run.out_dir={work / 'long'}"]]})

    def submit():
        job = cluster.sbatch("--array=0", f"--output={work / 'logs'}/%A_%a.out", str(ROOT / "slurm/array.sbatch"),
                             str(sweep), cwd=work, env={"FEDLIT_ROOT": str(ROOT), **venv_env()})
        return job, work / "logs" / f"{job}_0.out", f"{job}_0"

    results, _ = submit_and_requeue(cluster, work / "long", "long-0", submit)
    return results


@pytest.mark.slurm
def test_requeued_array_task_resumes_and_finishes_every_round(requeued_array_task):
    results = requeued_array_task
    assert (results["world_size"], results["seed"], results["algorithm"]) == (1, 0, "pfedmoap")
    assert [r["round"] for r in results["rounds"]] == list(range(1, REQUEUE_ROUNDS + 1))


@pytest.mark.slurm
def test_two_task_srun_run_requeues_resumes_and_matches_one_process(cluster, work, requeued_array_task):
    out = work / "srun"

    def submit():
        job = cluster.sbatch("--ntasks-per-node=2", "--cpus-per-task=1", f"--output={work / 'logs'}/srun_%j.out",
                             str(ROOT / "slurm/multinode.sbatch"), str(ROOT / "configs/default.yaml"), *LONG,
                             "trainer.accelerator=cpu", f"run.out_dir={out}", "run.name=srun",
                             f"backbone.cache_dir={work / 'cache'}", cwd=work,
                             env={"FEDLIT_ROOT": str(ROOT), **venv_env()})
        return job, work / "logs" / f"srun_{job}.out", job

    results, text = submit_and_requeue(cluster, out, "srun", submit)
    assert "1 node(s) x 2 task(s)" in text and "trainer.devices=2" in text
    assert results["world_size"] == 2
    # The same per-client accuracies, round by round, as the 1-process array task interrupted at another moment.
    reference = requeued_array_task
    assert results["partition_digest"] == reference["partition_digest"]
    assert accuracies(results) == accuracies(reference)


@pytest.mark.slurm
def test_installed_fedlit_without_a_checkout_runs_both_ways(cluster, work, tmp_path):
    """Submitted from a folder that is no checkout, with a `fedlit` launcher on PATH standing in for a pip install:
    `fedlit slurm array` with the cluster settings as variables, and plain sbatch of a copy of the scripts."""
    elsewhere, bin_dir, copies = tmp_path / "elsewhere", tmp_path / "bin", tmp_path / "scripts"
    for folder in (elsewhere, bin_dir, copies):
        folder.mkdir()
    launcher = bin_dir / "fedlit"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fedlit "$@"\n')
    launcher.chmod(0o755)
    for name in ("array.sbatch", "_common.sh"):
        (copies / name).write_text((ROOT / "slurm" / name).read_text())
    common = TINY + [f"backbone.cache_dir={work / 'cache'}"]
    for name in ("wrapped", "copied"):  # config: the packaged default, found from outside any checkout
        write_sweep(elsewhere / f"{name}.yaml", {"name": name, "config": "configs/default.yaml",
                                                 "base": common + [f"run.out_dir={elsewhere / 'runs'}"],
                                                 "cells": [["seed=1"]]})
    env = {**cluster.env, "PATH": f"{bin_dir}{os.pathsep}{cluster.env['PATH']}", "FEDLIT_PARTITION": "test",
           "FEDLIT_TIME": "10", "FEDLIT_CPUS": "1", "FEDLIT_MEM": "500M", "FEDLIT_LOG_DIR": "logs"}
    done = subprocess.run(["fedlit", "slurm", "array", "wrapped.yaml"], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    wrapped = re.fullmatch(r"Submitted batch job (\d+)\n", done.stdout).group(1)
    [record] = cluster.jobs(wrapped)
    assert (record["Partition"], record["TimeLimit"], record["NumCPUs"]) == ("test", "00:10:00", "1")
    assert record["MinMemoryNode"] == "500M"
    copied = cluster.sbatch("--array=0", "--output=logs/%A_%a.out", str(copies / "array.sbatch"), "copied.yaml",
                            cwd=elsewhere, env={"PATH": env["PATH"]})
    logs = [elsewhere / "logs" / f"{job}_0.out" for job in (wrapped, copied)]
    with explained(cluster, *logs):
        for job in (wrapped, copied):
            [finished] = cluster.wait_job(job, timeout=180)
            assert (finished["JobState"], finished["ExitCode"]) == ("COMPLETED", "0:0")
        wrapped_log, copied_log = (log.read_text() for log in logs)
        assert f"in {elsewhere}, {sys.executable} -m fedlit" in wrapped_log  # FEDLIT_PYTHON from fedlit slurm
        assert f"in {elsewhere}, fedlit" in copied_log  # the fedlit on PATH; _common.sh from the copied folder
        assert "cell 0: --config configs/default.yaml" in copied_log
        results = [results_of(elsewhere / "runs", f"{name}-seed=1")[1] for name in ("wrapped", "copied")]
        assert [(r["seed"], [x["round"] for x in r["rounds"]]) for r in results] == [(1, [1, 2])] * 2
        assert accuracies(results[0]) == accuracies(results[1])  # the same cell, either way
