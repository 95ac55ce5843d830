"""``fedlit slurm array|run``: submit the packaged sbatch scripts with ``fedlit`` installed, no checkout needed.

The scripts (``slurm/array.sbatch``, ``slurm/multinode.sbatch`` and their ``_common.sh``) ship inside the wheel as
``fedlit/slurm/``. ``fedlit slurm`` builds the ``sbatch`` command line from the sweep (its ``--array`` range) or the
config, the cluster settings in :data:`RESOURCES` (environment variables, since ``#SBATCH`` lines are read
statically), and a log folder it creates first (Slurm fails a job whose ``--output`` folder is missing, without a
log). The job runs in the submission directory with this interpreter (``FEDLIT_PYTHON``) and finds ``_common.sh``
through ``FEDLIT_SLURM_DIR``; ``sbatch`` exports the environment to the job.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from fedlit.errors import UserError

# Environment variable -> sbatch option; unset or empty variables leave the scripts' #SBATCH defaults.
RESOURCES = {
    "FEDLIT_PARTITION": "--partition",
    "FEDLIT_ACCOUNT": "--account",
    "FEDLIT_TIME": "--time",
    "FEDLIT_MEM": "--mem",
    "FEDLIT_CPUS": "--cpus-per-task",
    "FEDLIT_GPUS": "--gpus-per-node",
}
LOG_DIR = "slurm-logs"  # default of FEDLIT_LOG_DIR, relative to the submission directory
SCRIPTS = ("array.sbatch", "multinode.sbatch", "_common.sh")


def scripts_dir() -> Path:
    """The sbatch scripts: ``fedlit/slurm`` in an installed wheel, else ``slurm/`` next to the ``fedlit`` package in
    a source checkout; UserError when neither holds them."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "slurm", package.parent / "slurm"):
        if all((candidate / name).is_file() for name in SCRIPTS):
            return candidate
    raise UserError(f"the fedlit sbatch scripts are missing from {package / 'slurm'}; reinstall fedlit")


def resource_options(env: Mapping[str, str]) -> list[str]:
    """``--partition=...`` etc. for every :data:`RESOURCES` variable set (non-empty) in ``env``, in that order."""
    return [f"{option}={env[name]}" for name, option in RESOURCES.items() if env.get(name, "").strip()]


def array_command(sweep: str, overrides: list[str], env: Mapping[str, str], max_parallel: int | None = None,
                  extra: list[str] | None = None) -> list[str]:
    """The ``sbatch`` command of one array task per cell of ``sweep`` (a file or a packaged name such as
    ``sweeps/quickstart``), with ``overrides`` appended to every cell."""
    from fedlit.packaged import resolve_config
    from fedlit.sweeps import array_range, read_sweep

    path = resolve_config(sweep) or sweep
    try:
        spec = read_sweep(path)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    log_dir = Path(env.get("FEDLIT_LOG_DIR") or LOG_DIR)
    return (["sbatch", f"--array={array_range(len(spec.cells), max_parallel)}", *resource_options(env),
             f"--output={log_dir}/%A_%a.out", *(extra or []), str(scripts_dir() / "array.sbatch"),
             str(Path(path).resolve()), *overrides])


def run_command(config: str, overrides: list[str], env: Mapping[str, str], nodes: int = 1, tasks_per_node: int = 1,
                extra: list[str] | None = None) -> list[str]:
    """The ``sbatch`` command of one run of ``config`` (a file or a packaged name) on ``nodes`` x
    ``tasks_per_node`` processes (one per device)."""
    from fedlit.packaged import resolve_config

    path = resolve_config(config) or config
    config_arg = str(Path(path).resolve()) if Path(path).is_file() else config  # fedlit train reports a missing file
    log_dir = Path(env.get("FEDLIT_LOG_DIR") or LOG_DIR)
    return (["sbatch", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", *resource_options(env),
             f"--output={log_dir}/%x_%j.out", *(extra or []), str(scripts_dir() / "multinode.sbatch"), config_arg,
             *overrides])


def job_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` plus what the job needs to run this installation: ``FEDLIT_PYTHON`` (this interpreter, unless set)
    and ``FEDLIT_SLURM_DIR`` (the scripts' folder)."""
    return {**env, "FEDLIT_PYTHON": env.get("FEDLIT_PYTHON") or sys.executable,
            "FEDLIT_SLURM_DIR": str(scripts_dir())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``fedlit slurm``."""
    kinds = parser.add_subparsers(dest="kind", required=True, parser_class=type(parser))
    array = kinds.add_parser("array", help="one array task per cell of a sweep file (slurm/array.sbatch)")
    array.add_argument("--max-parallel", type=int, default=None, help="at most this many tasks at once")
    array.add_argument("target", metavar="SWEEP", help="sweep file or packaged name (sweeps/quickstart)")
    run = kinds.add_parser("run", help="one run on nodes x tasks-per-node processes (slurm/multinode.sbatch)")
    run.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    run.add_argument("--tasks-per-node", type=int, default=1, help="processes per node, one per device (default 1)")
    run.add_argument("target", metavar="CONFIG", help="config file or packaged name (paper/table1_dtd)")
    for sub in (array, run):
        sub.add_argument("--dry-run", action="store_true", help="print the sbatch command instead of running it")
        sub.add_argument("--sbatch", default="", help="more sbatch options, one string (e.g. '--qos=high')")
        sub.add_argument("overrides", nargs="*", help="key=value overrides appended to the run(s)")


def run(args: argparse.Namespace) -> int:
    """Build the sbatch command of ``args``, create the log folder, and submit it (or print it with
    ``--dry-run``); returns sbatch's exit code."""
    env = dict(os.environ)
    extra = shlex.split(args.sbatch)
    if args.kind == "array":
        if args.max_parallel is not None and args.max_parallel < 1:
            raise UserError(f"--max-parallel must be >= 1 (got {args.max_parallel})")
        command = array_command(args.target, args.overrides, env, args.max_parallel, extra)
    else:
        if args.nodes < 1 or args.tasks_per_node < 1:
            raise UserError(f"--nodes and --tasks-per-node must be >= 1 (got {args.nodes}, {args.tasks_per_node})")
        command = run_command(args.target, args.overrides, env, args.nodes, args.tasks_per_node, extra)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    if shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH: run fedlit slurm on a Slurm login node (--dry-run prints the command)")
    Path(env.get("FEDLIT_LOG_DIR") or LOG_DIR).mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, env=job_environment(env)).returncode
