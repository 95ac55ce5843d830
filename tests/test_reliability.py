"""Run reliability (#13): divergence guard, run-directory lock, checkpoint integrity, refused resumes that write
nothing, stale temporary files."""

from __future__ import annotations

import pytest
import torch

from fedlit.errors import Diverged, UserError
from fedlit.federation.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedlit.federation.experiment import run_experiment
from fedlit.federation.trainer import LocalTrainer
from fedlit.modules import CoOpClient
from fedlit.reporting import RunLock
from tests.helpers import fast_config, only_run_dir, read_results


def poison_clients(monkeypatch, bad: set[int]) -> None:
    """Make the loss of the clients in ``bad`` NaN (identified by their partition's first train label)."""
    original = CoOpClient.loss

    def loss(self, logits, labels):
        value = original(self, logits, labels)
        return value * float("nan") if int(labels[0]) in bad else value

    monkeypatch.setattr(CoOpClient, "loss", loss)


def test_a_non_finite_update_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=3", "data.partition=iid")
    [res] = run_experiment(fast_config(tmp_path / "ok", "algorithm=promptfl", "fed.rounds=1", "data.partition=iid"))
    current = {"round": 0}
    original_train, original_loss = LocalTrainer.train, CoOpClient.loss

    def train(self, plans, round_index):
        current["round"] = round_index
        return original_train(self, plans, round_index)

    def nan_from_round_two(self, logits, labels):
        value = original_loss(self, logits, labels)
        return value * float("nan") if current["round"] >= 2 else value

    monkeypatch.setattr(LocalTrainer, "train", train)
    monkeypatch.setattr(CoOpClient, "loss", nan_from_round_two)
    with pytest.raises(Diverged, match=r"round 2: non-finite loss or parameters from client 0 .*checkpoint of round 1"):
        run_experiment(cfg)
    run_dir = only_run_dir(tmp_path)
    ckpt = load_checkpoint(run_dir / CHECKPOINT_NAME)
    assert ckpt["server"]["round"] == 1 and torch.isfinite(ckpt["server"]["global_state"]["ctx"]).all()
    assert [r["round"] for r in read_results(run_dir)["rounds"]] == [1]
    assert res["rounds"][0]["accuracy"] == read_results(run_dir)["rounds"][0]["accuracy"]  # round 1 was sound


def test_skip_client_leaves_the_diverged_clients_out(tmp_path, monkeypatch):
    cfg = fast_config(tmp_path, "algorithm=pfedmoap", "fed.rounds=2", "run.on_nonfinite=skip_client")
    poison_clients(monkeypatch, {0})  # the client owning class 0 (pathological split) diverges
    [res] = run_experiment(cfg)
    ckpt = load_checkpoint(only_run_dir(tmp_path) / CHECKPOINT_NAME)
    assert torch.isfinite(ckpt["server"]["global_state"]["ctx"]).all()
    assert all(r["clients"] < 4 for r in res["rounds"])  # some clients were skipped every round
    for entry in ckpt["store"].values():
        assert all(torch.isfinite(t).all() for t in entry["state"].values())


def test_resuming_a_live_run_is_refused_and_writes_nothing(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=1")
    run_experiment(cfg)
    run_dir = only_run_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with RunLock(run_dir), pytest.raises(UserError, match="is in use by process"):
        run_experiment(fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=2", "run.resume=auto"))
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_refused_resume_leaves_config_and_partition_untouched(tmp_path):
    run_experiment(fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=1"))
    run_dir = only_run_dir(tmp_path)
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "partition.json", CHECKPOINT_NAME)}
    with pytest.raises(UserError, match="different configuration"):
        run_experiment(fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=1", "fed.local_epochs=2",
                                   "run.resume=auto"))
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_tampered_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    run_experiment(fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=1"))
    path = only_run_dir(tmp_path) / CHECKPOINT_NAME
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # one bit inside the body (tensor bytes)
    cases = {"flipped": bytes(flipped), "truncated": data[: len(data) // 2], "empty": b"",
             "foreign": b"PK\x03\x04 not a fedlit file", "old": b"\x80\x02}q\x00."}
    messages = {"flipped": "corrupt", "truncated": "corrupt", "empty": "not a fedlit checkpoint",
                "foreign": "not a fedlit checkpoint", "old": "not a fedlit checkpoint"}
    for name, content in cases.items():
        bad = tmp_path / f"{name}.pt"
        bad.write_bytes(content)
        with pytest.raises(UserError, match=messages[name]) as err:
            load_checkpoint(bad)
        assert "\n" not in str(err.value)
    assert load_checkpoint(path)["server"]["round"] == 1


def test_stale_temporary_files_are_removed_on_resume(tmp_path):
    run_experiment(fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=1"))
    run_dir = only_run_dir(tmp_path)
    stale = run_dir / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    run_experiment(fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=2", "run.resume=auto"))
    assert not stale.exists()
    assert [r["round"] for r in read_results(run_dir)["rounds"]] == [1, 2]


def test_divergence_from_the_command_line_exits_4_with_one_line(tmp_path):
    from tests.helpers import FAST, cache_dir, train_cli

    done = train_cli(*FAST, f"backbone.cache_dir={cache_dir()}", f"run.out_dir={tmp_path}", "algorithm=promptfl",
                     "optim.prompt_lr=1e30", "fed.rounds=2")
    assert done.returncode == 4, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    assert lines[-1].startswith("error: [promptfl] round 1: non-finite loss or parameters from client")
