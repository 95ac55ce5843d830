"""Sweep files: one YAML file that expands into a list of training runs ("cells"), one per Slurm array task.

A sweep file names a base config, common overrides, and either a grid (cartesian product) or an explicit list::

    name: quickstart              # optional; default: the file name without extension
    config: configs/default.yaml  # optional; relative to the directory you run from (the repository root)
    base: [fed.rounds=5]          # optional overrides shared by every cell
    grid:                         # either grid: the product of the value lists, last key varying fastest
      seed: [0, 1]
      data.partition: [pathological, dirichlet]
    # cells:                      # or cells: one override list (or mapping) per run
    #   - [algorithm=promptfl]
    #   - {algorithm: pfedmoap, method.num_experts: 4}

Each cell's overrides are ``base + cell + [run.name=<name>-<cell overrides>]`` (the run name only when the cell does
not set one), named by what the cell sets, e.g. ``table1-data.name=dtd,algorithm=promptfl,seed=1`` (see
:func:`cell_name`), so every cell writes to its own run directory and ``run.resume=auto`` finds its own checkpoint.

Command line (used by ``slurm/array.sbatch``)::

    python -m fedlit.sweeps count FILE         # number of cells
    python -m fedlit.sweeps range FILE [MAX]   # the --array spec, e.g. 0-3 (or 0-3%MAX)
    python -m fedlit.sweeps args FILE INDEX    # the arguments of experiments/train.py for cell INDEX, one a line
    python -m fedlit.sweeps list FILE          # every cell, one line each

The same commands are ``fedlit sweep count|range|args|list``; ``fedlit sweep run FILE --jobs N`` runs the cells on
this machine instead, N subprocesses at a time (:func:`run_sweep`).
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedlit.config import MAX_NAME_LENGTH, load_config, valid_keys
from fedlit.threads import THREAD_VARIABLE, threads_per_process

SWEEP_KEYS = ("name", "config", "base", "grid", "cells")


@dataclass
class Sweep:
    """An expanded sweep: the config file every cell starts from and one override list per cell."""

    name: str
    config: str | None
    cells: list[list[str]]

    def argv(self, index: int) -> list[str]:
        """The argument list of ``experiments/train.py`` for cell ``index`` (``--config FILE`` first, if any)."""
        if not 0 <= index < len(self.cells):
            raise IndexError(f"cell index {index} out of range: this sweep has {len(self.cells)} cells "
                             f"(valid indices 0-{len(self.cells) - 1})")
        return (["--config", self.config] if self.config else []) + list(self.cells[index])


def format_value(value: Any) -> str:
    """A YAML value as the right-hand side of a ``key=value`` override that parses back to the same value
    (``True -> "true"``, ``None -> "null"``, ``[1, 2] -> "[1,2]"``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        raise ValueError(f"nested mapping {value!r} cannot be an override value; use dotted keys (a.b=value)")
    return str(value)


def _check_key(key: str, where: str) -> None:
    keys = valid_keys()
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see python experiments/train.py --help"
        raise ValueError(f"{where}: unknown config key '{key}'{hint}")


def _overrides(item: Any, where: str) -> list[str]:
    """``[key=value, ...]`` from a list of ``key=value`` strings or a ``{key: value}`` mapping, keys checked."""
    if isinstance(item, dict):
        pairs = [f"{k}={format_value(v)}" for k, v in item.items()]
    elif isinstance(item, (list, tuple)):
        pairs = list(item)
    else:
        raise ValueError(f"{where} must be a list of key=value strings or a mapping (got {item!r})")
    for pair in pairs:
        if not isinstance(pair, str) or "=" not in pair:
            raise ValueError(f"{where}: override {pair!r} is not of the form key=value")
        _check_key(pair.split("=", 1)[0], where)
    return pairs


def _grid_cells(grid: Any, where: str) -> list[list[str]]:
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{where}: grid must be a non-empty mapping of key: [values]")
    axes = []
    for key, values in grid.items():
        _check_key(str(key), where)
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: grid.{key} must be a non-empty list of values (got {values!r})")
        axes.append([f"{key}={format_value(v)}" for v in values])
    return [list(combo) for combo in itertools.product(*axes)]


def cell_name(sweep: str, cell: list[str], index: int) -> str:
    """The run name of cell ``index``: ``<sweep>-<its own overrides joined by ",">`` (but the ``run.*`` ones, which
    say where and how a run writes, not what it computes) with every character a run name cannot hold (``/``,
    ``[``, spaces, ...) as ``_``; ``<sweep>-<index>`` for a cell without such overrides, and the index appended
    (the rest cut) when the name would exceed ``run.name``'s 100 characters."""
    named = [o for o in cell if not o.startswith("run.")]
    if not named:
        return f"{sweep}-{index}"
    name = re.sub(r"[^A-Za-z0-9._+=,@-]", "_", f"{sweep}-{','.join(named)}")
    if len(name) > MAX_NAME_LENGTH:
        suffix = f"-{index}"
        name = name[: MAX_NAME_LENGTH - len(suffix)] + suffix
    return name


def _named(name: str, cells: list[list[str]], base: list[str]) -> list[list[str]]:
    """``base + cell`` per cell, plus ``run.name=`` :func:`cell_name` unless it sets one; two cells that would get
    the same name both get their index appended."""
    names = [cell_name(name, cell, index) for index, cell in enumerate(cells)]
    repeated = {n for n in names if names.count(n) > 1}
    expanded = []
    for index, cell in enumerate(cells):
        overrides = base + cell
        if not any(o.startswith("run.name=") for o in overrides):
            run_name = names[index]
            if run_name in repeated:
                run_name = run_name[: MAX_NAME_LENGTH - len(f"-{index}")] + f"-{index}"
            overrides.append(f"run.name={run_name}")
        expanded.append(overrides)
    return expanded


def read_sweep(path: str | Path) -> Sweep:
    """Parse and expand the sweep file ``path``; every override key is checked against the config keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a sweep file is a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown sweep key(s) {', '.join(map(str, unknown))}; "
                         f"valid keys are {', '.join(SWEEP_KEYS)}")
    if ("grid" in spec) == ("cells" in spec):
        raise ValueError(f"{path}: give exactly one of grid (a product of value lists) or cells (a list of runs)")
    name = str(spec.get("name") or path.stem)
    config = spec.get("config")
    base = _overrides(spec.get("base") or [], f"{path}: base")
    if "grid" in spec:
        cells = _grid_cells(spec["grid"], str(path))
    else:
        if not isinstance(spec["cells"], list) or not spec["cells"]:
            raise ValueError(f"{path}: cells must be a non-empty list of override lists")
        cells = [_overrides(c, f"{path}: cells[{i}]") for i, c in enumerate(spec["cells"])]
    return Sweep(name=name, config=None if config is None else str(config), cells=_named(name, cells, base))


def load_sweep(path: str | Path) -> list[list[str]]:
    """The override list of every cell of the sweep file ``path``, in array-index order."""
    return read_sweep(path).cells


def array_range(count: int, max_parallel: int | None = None) -> str:
    """The ``sbatch --array`` spec for ``count`` tasks: ``"0-(count-1)"``, plus ``"%max_parallel"`` if given."""
    spec = f"0-{count - 1}" if count > 1 else "0"
    return f"{spec}%{max_parallel}" if max_parallel else spec


def cell_command(sweep: Sweep, index: int) -> list[str]:
    """The command line that trains cell ``index`` with this Python interpreter (``python -m fedlit train ...``)."""
    return [sys.executable, "-m", "fedlit", "train", *sweep.argv(index)]


def cell_run_name(sweep: Sweep, index: int) -> str:
    """The ``run.name`` cell ``index`` sets (its last ``run.name=`` override)."""
    return [o.split("=", 1)[1] for o in sweep.cells[index] if o.startswith("run.name=")][-1]


def cell_log(sweep: Sweep, index: int, log_dir: Path) -> Path:
    """Where :func:`run_cell` writes the output of cell ``index``: ``log_dir/<its run.name>.log``."""
    return log_dir / f"{cell_run_name(sweep, index)}.log"


def default_log_dir(sweep: Sweep) -> Path:
    """``<run.out_dir>/<sweep name>-logs``, with the ``run.out_dir`` of the sweep's first cell (its config file and
    overrides; a bad cell is reported by its own run, not here: then ``runs/``)."""
    from fedlit.errors import UserError
    from fedlit.packaged import resolve_config

    try:
        out_dir = load_config(resolve_config(sweep.config), sweep.cells[0]).run.out_dir
    except UserError:
        out_dir = "runs"
    return Path(out_dir).expanduser() / f"{sweep.name}-logs"


def run_cell(sweep: Sweep, index: int, threads: int, log_dir: Path) -> tuple[int, float]:
    """Train cell ``index`` in a subprocess with ``threads`` intra-op threads, its output in
    :func:`cell_log`; returns (exit code, seconds)."""
    env = {**os.environ, THREAD_VARIABLE: str(threads)}
    t0 = time.perf_counter()
    with cell_log(sweep, index, log_dir).open("w") as log:
        code = subprocess.run(cell_command(sweep, index), env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - t0


def run_sweep(sweep: Sweep, jobs: int, log_dir: str | Path, cores: int | None = None) -> list[int]:
    """Run every cell of ``sweep`` locally, ``jobs`` subprocesses at a time in index order, each with
    ``OMP_NUM_THREADS = cores // jobs`` (at least 1); one line per finished cell on stdout. Returns the exit code of
    every cell."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1 (got {jobs})")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = threads_per_process(jobs, cores)
    total = len(sweep.cells)
    print(f"sweep {sweep.name}: {total} cells, {jobs} at a time, {THREAD_VARIABLE}={threads}, logs in {log_dir}",
          flush=True)

    def one(index: int) -> int:
        code, seconds = run_cell(sweep, index, threads, log_dir)
        status = "ok" if code == 0 else f"exit {code}, see {cell_log(sweep, index, log_dir)}"
        print(f"cell {index + 1}/{total} ({status}, {seconds:.1f} s): {' '.join(sweep.cells[index])}", flush=True)
        return code

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, range(total)))


USAGE = """usage: python -m fedlit.sweeps count FILE | range FILE [MAX_PARALLEL] | args FILE INDEX | list FILE
  count  number of cells (array tasks) in the sweep
  range  the sbatch --array spec: sbatch --array=$(python -m fedlit.sweeps range FILE) slurm/array.sbatch FILE
  args   the arguments of experiments/train.py for cell INDEX, one per line
  list   every cell's overrides, one cell per line"""


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 with a one-line message on bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    expected = {"count": (1, 1), "range": (1, 2), "args": (2, 2), "list": (1, 1)}
    if command not in expected or not expected[command][0] <= len(rest) <= expected[command][1]:
        print(f"error: bad arguments {' '.join(argv)!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        sweep = read_sweep(rest[0])
        if command == "count":
            print(len(sweep.cells))
        elif command == "range":
            limit = None
            if len(rest) > 1:
                if not rest[1].isdigit() or int(rest[1]) < 1:
                    raise ValueError(f"MAX_PARALLEL must be a positive integer (got {rest[1]!r})")
                limit = int(rest[1])
            print(array_range(len(sweep.cells), limit))
        elif command == "args":
            if not rest[1].lstrip("-").isdigit():
                raise ValueError(f"INDEX must be an integer (got {rest[1]!r})")
            print("\n".join(sweep.argv(int(rest[1]))))
        else:
            for index, cell in enumerate(sweep.cells):
                print(f"{index}: {' '.join(cell)}")
    except (ValueError, FileNotFoundError, IndexError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
