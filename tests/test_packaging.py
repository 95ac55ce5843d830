"""Packaging: the listed packages cover every subpackage, configs ship as package data, and (slow) a wheel built
from the sources installs into a fresh venv and runs ``fedlit`` from outside the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import FAST, ROOT

SOURCES = ("fedlit", "configs", "slurm", "pyproject.toml", "README.md", "LICENSE")


def pyproject() -> dict:
    """The parsed ``pyproject.toml`` (tomllib: Python 3.11+)."""
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_listed_and_configs_are_package_data():
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fedlit").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    config_dirs = {p.parent for p in (ROOT / "configs").rglob("*.yaml")}
    shipped = {ROOT / "configs" / Path(*name.split(".")[2:]) for name in listed if name.startswith("fedlit.configs")}
    assert config_dirs <= shipped


def test_metadata_scripts_extras_license_and_typed_marker():
    project = pyproject()["project"]
    assert project["scripts"] == {"fedlit": "fedlit.command:main", "fedlit-train": "fedlit.cli:main"}
    extras = project["optional-dependencies"]
    assert {"plots", "tensorboard", "dev"} <= set(extras)
    assert set(extras["plots"]) <= set(extras["dev"])  # `make test` installs what tests/test_plots.py needs
    assert set(extras["digits"]) <= set(extras["dev"])  # and what tests/test_real_datasets.py needs
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (ROOT / "fedlit" / "py.typed").is_file()  # no project URLs: the project has no public address yet


def run(*args: str | Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command outside the repository with one thread and no PYTHONPATH; fail with its output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    shutil.rmtree(source / "fedlit" / "__pycache__", ignore_errors=True)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
        source, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("fedlit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fedlit/configs/paper/table1_dtd.yaml" in names and "fedlit/py.typed" in names
    assert {"fedlit/slurm/array.sbatch", "fedlit/slurm/multinode.sbatch", "fedlit/slurm/_common.sh"} <= set(names)

    # A fresh venv from this interpreter; torch and the other dependencies are not downloaded again: after the
    # wheel is installed (--no-deps), a .pth line appends this venv's site-packages (a path line in a .pth does not
    # run the .pth files there, so the editable fedlit of this checkout stays invisible).
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    python, fedlit = venv / "bin" / "python", venv / "bin" / "fedlit"
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout
    (Path(site.strip()) / "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run(python, "-c", "import fedlit; print(fedlit.__file__)", cwd=work).stdout.strip()
    assert where.startswith(str(venv)), where
    assert run(fedlit, "--version", cwd=work).stdout.strip() == "fedlit 0.1.0"
    shown = run(fedlit, "print-config", "--config", "paper/table1_dtd", cwd=work).stdout
    assert "name: RN50-quickgelu" in shown and "rounds 10" in shown
    submitted = run(fedlit, "slurm", "array", "sweeps/quickstart", "--dry-run", cwd=work).stdout.split()
    installed = Path(where).parent
    assert submitted[-2:] == [str(installed / "slurm" / "array.sbatch"),
                              str(installed / "configs" / "sweeps" / "quickstart.yaml")]
    run(fedlit, "train", *FAST, "fed.rounds=1", "run.out_dir=runs", f"backbone.cache_dir={tmp_path / 'cache'}",
        cwd=work)
    assert len(list((work / "runs" / "default").glob("*/results.json"))) == 1
