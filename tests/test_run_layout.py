"""Run layout and defaults a new user meets (#22): single-method and ``algorithm=all`` runs in folders of their own,
sweep cells named by their overrides with their logs under ``run.out_dir``, no lock file left behind, the help of
``fedlit`` and ``fedlit train``, Ctrl-C as one line and exit code 130, a resumable shapes-clip pretraining, and the
note about fewer threads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fedlit import pretrain
from fedlit.cli import parse_args
from fedlit.command import main
from fedlit.config import ALGORITHMS, load_config
from fedlit.federation.experiment import make_fabric, run_experiment
from fedlit.io import FileLock
from fedlit.pretrain import ShapesClipRecipe, build_shapes_clip, partial_path, shapes_clip_path, train_shapes_clip
from fedlit.reporting import RunLock
from fedlit.sweeps import cell_name, default_log_dir, read_sweep
from fedlit.threads import reduced_threads_note
from tests.helpers import FAST, ROOT, cache_dir, fast_config, read_results


def test_single_method_runs_never_share_a_folder_or_a_resume_with_other_methods(tmp_path):
    run_experiment(fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=1"))
    run_experiment(fast_config(tmp_path, "algorithm=coop_local", "fed.rounds=1"))
    folders = sorted(p.name for p in (tmp_path / "default").iterdir())
    assert [f.split("-")[0] for f in folders] == ["coop_local", "promptfl"]
    # resume=auto continues the newest run of *its* method: promptfl's, although coop_local's is newer
    run_experiment(fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=2", "run.resume=auto"))
    promptfl = next(p for p in (tmp_path / "default").iterdir() if p.name.startswith("promptfl-"))
    assert [r["round"] for r in read_results(promptfl)["rounds"]] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == folders  # no new folder


def test_a_finished_run_leaves_no_lock_file(tmp_path):
    run_experiment(fast_config(tmp_path, "algorithm=zeroshot"))
    assert not list(tmp_path.rglob(".lock"))


def test_the_lock_is_refused_while_held_and_gone_after(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().startswith(f"process {os.getpid()} on ")
        other = FileLock(tmp_path / ".lock")
        assert not other.acquire(blocking=False)
    assert not (tmp_path / ".lock").exists()
    assert other.acquire(blocking=False)  # free again (a new file)
    other.release()
    assert not (tmp_path / ".lock").exists()


def test_sweep_cells_are_named_by_their_overrides_and_log_under_the_out_dir(tmp_path):
    sweep = tmp_path / "abl.yaml"
    sweep.write_text(json.dumps({"base": ["fed.rounds=1", f"run.out_dir={tmp_path / 'out'}"],
                                 "grid": {"algorithm": ["promptfl", "pfedmoap"], "seed": [0, 1]}}))
    spec = read_sweep(sweep)
    names = [cell[-1] for cell in spec.cells]
    assert names == ["run.name=abl-algorithm=promptfl,seed=0", "run.name=abl-algorithm=promptfl,seed=1",
                     "run.name=abl-algorithm=pfedmoap,seed=0", "run.name=abl-algorithm=pfedmoap,seed=1"]
    for cell in spec.cells:  # every name is a valid run.name
        assert load_config(None, FAST + cell).run.name == cell[-1].split("=", 1)[1]
    assert default_log_dir(spec) == tmp_path / "out" / "abl-logs"
    assert cell_name("s", ["run.loggers=[csv,tensorboard]", "data.root=/data/x", "prompt.ctx_init=a photo"], 3) == \
        "s-data.root=_data_x,prompt.ctx_init=a_photo"  # run.* keys say where a run writes, not what it is
    assert cell_name("s", [], 3) == "s-3" and cell_name("s", ["run.out_dir=/x"], 4) == "s-4"
    long = cell_name("s", ["method.template=" + "x" * 120], 7)
    assert len(long) == 100 and long.endswith("-7")
    twice = tmp_path / "twice.yaml"
    twice.write_text(json.dumps({"cells": [["seed=1"], ["seed=1"]]}))
    assert [c[-1] for c in read_sweep(twice).cells] == ["run.name=twice-seed=1-0", "run.name=twice-seed=1-1"]


def test_train_help_lists_every_algorithm():
    parser_help = subprocess.run([sys.executable, "-m", "fedlit", "train", "--help"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=120)
    assert parser_help.returncode == 0
    listed = next(line for line in parser_help.stdout.splitlines() if line.strip().startswith("algorithm="))
    assert listed.split()[0] == "algorithm=" + "|".join(ALGORITHMS) + "|all"
    assert len(ALGORITHMS) >= 11
    assert parse_args(["algorithm=fedotp"]).overrides == ["algorithm=fedotp"]


def test_bare_fedlit_prints_the_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fedlit") and all(c in out for c in ("train", "compare", "plot", "export", "sweep"))


def _start(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "fedlit", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_ctrl_c_during_training_is_one_line_and_exit_130(tmp_path):
    proc = _start(["train", *FAST, f"backbone.cache_dir={cache_dir()}", f"run.out_dir={tmp_path}",
                   "run.quiet=false", "fed.rounds=50", "algorithm=promptfl"])
    for line in proc.stdout:  # wait until it trains
        if "round   2/50" in line:  # round 1 is checkpointed
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["fedlit: interrupted (Ctrl-C); resume with run.resume=auto"]
    run_dir = next((tmp_path / "default").iterdir())
    assert not (run_dir / ".lock").exists() and (run_dir / "checkpoint.pt").is_file()


def test_ctrl_c_in_another_subcommand_is_one_line(tmp_path, monkeypatch, capsys):
    from fedlit import compare

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "run", interrupt)
    assert main(["compare", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "fedlit: interrupted (Ctrl-C)\n"


TINY_RECIPE = ShapesClipRecipe(embed_dim=16, patch_size=8, vision_width=32, vision_layers=1, vision_head_width=16,
                               text_width=32, text_heads=2, text_layers=1, steps=7, batch_size=8, warmup_steps=2)


def test_an_interrupted_pretraining_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    reference = train_shapes_clip(TINY_RECIPE, progress=False).state_dict()
    real_render, calls = pretrain.render_shapes, []

    def interrupted_at_step_6(labels, generator):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_render(labels, generator)

    monkeypatch.setattr(pretrain, "CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(pretrain, "render_shapes", interrupted_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        build_shapes_clip(tmp_path, TINY_RECIPE, progress=False)
    saved = torch.load(partial_path(tmp_path, TINY_RECIPE), weights_only=True)
    assert saved["step"] == 4  # the last save before step 6 (steps 2 and 4 were saved)
    assert not shapes_clip_path(tmp_path, TINY_RECIPE).exists() and not list(tmp_path.glob("*.lock"))
    monkeypatch.setattr(pretrain, "render_shapes", real_render)
    path = build_shapes_clip(tmp_path, TINY_RECIPE, progress=False)
    weights = torch.load(path, weights_only=True)["state_dict"]
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no partial state, no lock left


def test_a_note_says_when_the_threads_per_process_were_reduced(tmp_path, monkeypatch, capsys):
    assert reduced_threads_note(8, 8, 1) is None and reduced_threads_note(9, 8, 1) is None
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("fedlit.threads.available_cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        make_fabric(fast_config(tmp_path, "trainer.accelerator=cpu", "run.quiet=false"))
        assert torch.get_num_threads() == 2
        assert capsys.readouterr().err == ("note: 2 threads per process instead of torch's 4 (2 cores for 1 "
                                           "process); set OMP_NUM_THREADS to choose\n")
        make_fabric(fast_config(tmp_path, "trainer.accelerator=cpu", "run.quiet=false"))  # 2 -> 2: nothing to say
        assert capsys.readouterr().err == ""
    finally:
        torch.set_num_threads(before)


def test_the_run_lock_of_a_sigkilled_run_is_free_at_once(tmp_path):
    code = ("import sys, time; from fedlit.reporting import RunLock; "
            f"held = RunLock({str(tmp_path)!r}).__enter__(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match="is in use by process"):
        RunLock(tmp_path).__enter__()
    proc.kill()
    proc.wait()
    start = time.monotonic()
    with RunLock(tmp_path):  # the kernel dropped the lock; the file stayed, the new holder takes it over
        assert time.monotonic() - start < 5
    assert not (tmp_path / ".lock").exists()
