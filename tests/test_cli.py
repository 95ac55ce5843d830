"""The command line: help, resolved config, and one clear line + exit code 2 on bad input (no run dir left)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlit.cli import main
from fedlit.config import load_config, valid_keys
from tests.helpers import FAST, ROOT, cache_dir, train_cli

BAD_INPUTS = [
    (["fed.roundz=3"], "unknown config key 'fed.roundz'; did you mean fed.rounds"),
    (["data.num_client=3"], "did you mean data.num_clients"),
    (["fed.rounds=many"], "fed.rounds"),
    (["prompt.class_specific=maybe"], "prompt.class_specific"),
    (["method.num_experts=9"], "method.num_experts=9 exceeds data.num_clients=4"),
    (["fed.frac=0"], "fed.frac must be in (0, 1]"),
    (["fed.frac=1.5"], "fed.frac must be in (0, 1]"),
    (["data.shots=50"], "data.shots=50 but class"),
    (["algorithm=fedsgd"], "unknown algorithm 'fedsgd'"),
    (["data.name=imagenet42"], "imagenet42"),
    (["data.name=cifar10", "data.root=/nonexistent/fedlit-data"], "/nonexistent/fedlit-data"),
    (["backbone.name=ViT-B-99", "backbone.pretrained=random"], "unknown backbone 'ViT-B-99'"),
    (["backbone.name=tiny", "backbone.pretrained=/nonexistent/w.pt"], "/nonexistent/w.pt"),
    (["backbone.name=ViT-B-16"], "backbone.name=ViT-B-16 needs backbone.pretrained: an open_clip pretrained tag"),
    (["gate.d_gate=48"], "d_gate=48"),
    (["prompt.n_ctx=0"], "prompt.n_ctx must be >= 1"),
    (["notakey"], "not of the form key=value"),
    (["algorithm=promptfl", "robust.pool_filter=2"], "robust.pool_filter=2.0 acts on pFedMoAP's expert pool"),
]


@pytest.mark.parametrize("overrides,expected", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_leaves_no_run_dir(tmp_path, capsys, overrides, expected):
    out_dir = tmp_path / "runs"
    code = main(FAST + [f"run.out_dir={out_dir}", f"backbone.cache_dir={cache_dir()}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err, err
    assert not out_dir.exists()


def test_missing_config_file_is_one_line(capsys):
    assert main(["--config", "/nonexistent/fedlit.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "error: config file not found: /nonexistent/fedlit.yaml"


def test_subprocess_exit_code_and_help():
    bad = train_cli("fed.roundz=3")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: unknown config key")
    helped = train_cli("--help")
    assert helped.returncode == 0 and "algorithm=zeroshot|coop_local|promptfl|" in helped.stdout


def test_config_files_and_overrides_merge_over_typed_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("fed:\n  rounds: 7\nprompt:\n  ctx_init: a photo of a\n")
    cfg = load_config(path, ["fed.frac=0.5", "prompt.class_specific=false", "gate.top_k=1"])
    assert (cfg.fed.rounds, cfg.fed.frac, cfg.prompt.ctx_init, cfg.gate.top_k) == (7, 0.5, "a photo of a", 1)
    assert cfg.prompt.class_specific is False and cfg.fed.local_epochs == 5
    assert "method.num_experts" in valid_keys() and "run.resume" in valid_keys()


def test_the_shipped_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.rglob("*.yaml")):
        if "sweeps" in path.parts:
            continue
        load_config(path)


def test_debug_shows_the_traceback_of_a_user_error(capsys):
    assert main(["fed.rounds=0"]) == 2
    assert capsys.readouterr().err == "error: fed.rounds must be >= 1 (got 0)\n"
    assert main(["--debug", "fed.rounds=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "ConfigError" in err
    assert err.splitlines()[-1] == "error: fed.rounds must be >= 1 (got 0)"


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "error: unrecognized arguments: --bogus (see fedlit-train --help)"),
    (["fed.rounds=2", "--config"], "error: argument --config/-c: expected one argument (see fedlit-train --help)"),
])
def test_usage_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == message


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """Replace the experiment by ``behaviour(cfg)``; returns the argv of a valid fast run under ``tmp_path``."""
    import fedlit.federation.experiment as experiment

    def install(behaviour):
        monkeypatch.setattr(experiment, "run_experiment", behaviour)
        return FAST + [f"run.out_dir={tmp_path / 'runs'}", f"backbone.cache_dir={cache_dir()}"]

    return install


@pytest.mark.parametrize("error", [ValueError("a bug"), RuntimeError("a bug"), FileNotFoundError(2, "No such file"),
                                   KeyError("a bug"), OSError(5, "Input/output error")])
def test_any_other_exception_is_a_bug_and_keeps_its_traceback(fake_run, capsys, error):
    def fail(cfg):
        raise error

    argv = fake_run(fail)
    with pytest.raises(type(error)) as raised:
        main(argv)
    assert raised.value is error and capsys.readouterr().err == ""


@pytest.mark.parametrize("code, text", [(errno.ENOSPC, "No space left on device"), (errno.EACCES, "Permission denied"),
                                        (errno.EROFS, "Read-only file system"), (errno.EDQUOT, "Disk quota exceeded")])
def test_refused_writes_are_one_line_naming_the_path(fake_run, capsys, tmp_path, code, text):
    def fail(cfg):
        raise OSError(code, text, f"{cfg.run.out_dir}/default/checkpoint.pt")

    argv = fake_run(fail)
    assert main(argv) == 2
    path = tmp_path / "runs" / "default" / "checkpoint.pt"
    assert capsys.readouterr().err == f"error: cannot write {path}: {text} (errno {code})\n"


def test_torch_save_on_a_full_disk_is_one_line_not_a_cxx_assertion(fake_run, capsys, tmp_path):
    import torch

    def save_to_full_disk(cfg):
        with open("/dev/full", "wb") as f:  # every write fails with ENOSPC
            torch.save({"ctx": torch.zeros(100_000)}, f)

    argv = fake_run(save_to_full_disk)
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"error: cannot write under run.out_dir={tmp_path / 'runs'} or "
                                       f"backbone.cache_dir={cache_dir()}: No space left on device (errno 28)\n")


def test_stopped_run_exits_3_and_says_how_to_resume(fake_run, capsys, monkeypatch):
    from fedlit.federation.signals import Preempted

    def stop(cfg):
        raise Preempted("stopped after round 2")

    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert main(fake_run(stop)) == 3
    assert capsys.readouterr().err == "fedlit: stopped after round 2; resume with run.resume=auto\n"


def test_the_signal_module_and_the_cli_import_nothing_heavy():
    code = ("import sys, fedlit.federation.signals, fedlit.cli; "
            "print(sorted(m for m in ('torch', 'lightning', 'omegaconf', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _handles_sigusr1(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGUSR1 (the SigCgt mask of /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signal.SIGUSR1 - 1) & 1)


@pytest.mark.parametrize("entry", ["experiments/train.py", "fedlit-train"])
def test_sigusr1_during_start_up_stops_at_the_first_round_boundary(tmp_path, entry):
    command = ([sys.executable, str(ROOT / entry)] if entry.endswith(".py") else
               [str(Path(sys.executable).parent / entry)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command + FAST + [f"run.out_dir={tmp_path}", f"backbone.cache_dir={cache_dir()}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    while not _handles_sigusr1(proc.pid):  # the handler goes in before torch and lightning load
        assert proc.poll() is None and time.monotonic() - start < 10, proc.communicate()
        time.sleep(0.002)
    assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert err.strip().splitlines()[-1] == "fedlit: stopped after round 1; resume with run.resume=auto"
    assert list(tmp_path.rglob("checkpoint.pt"))


def test_the_summary_line_comes_before_the_image_feature_cache(tmp_path, capsys, monkeypatch):
    # Today's bug: the line appeared only after the features were cached (8 minutes for ViT-B-16 on a CPU).
    from fedlit.federation import experiment

    original = experiment.build_client_data

    def caching(*args, **kwargs):
        print("<caching image features>")
        return original(*args, **kwargs)

    monkeypatch.setattr(experiment, "build_client_data", caching)
    out_dir = tmp_path / "runs"
    assert main(FAST + [f"run.out_dir={out_dir}", f"backbone.cache_dir={cache_dir()}", "algorithm=promptfl",
                        "fed.rounds=1", "run.quiet=false"]) == 0
    [run_dir] = (out_dir / "default").iterdir()
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"fedlit | shapes (32 classes) | 4 clients (pathological) | 1 round | promptfl | backbone "
                         f"tiny | 1 process, 32-true | {run_dir}", "<caching image features>"]
    assert lines[-1] == f"fedlit | results in {run_dir}"
