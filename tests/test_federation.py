"""End-to-end federated runs on the tiny CLIP and small shapes data (in-process, one Fabric process)."""

from __future__ import annotations

import csv

import pytest
import torch

from fedlit.config import ALGORITHMS
from fedlit.federation import orchestrator as orchestrator_module
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.experiment import build_job, run_experiment
from fedlit.modules import PFedMoAPClient
from tests.helpers import fast_config, only_run_dir, read_results


def _orchestrate(cfg, run_dir, monkeypatch, visit_order):
    if visit_order == "reversed":  # each rank visits its clients backwards
        assign = orchestrator_module.assign_to_ranks
        monkeypatch.setattr(orchestrator_module, "assign_to_ranks", lambda *a: [s[::-1] for s in assign(*a)])
    results = build_job(cfg).orchestrator(run_dir).run()
    monkeypatch.undo()
    return results, load_checkpoint(run_dir / "checkpoint.pt")


@pytest.mark.parametrize("algorithm", ["pfedmoap", "promptfl"])
def test_visiting_clients_in_another_order_gives_identical_state_and_metrics(tmp_path, monkeypatch, algorithm):
    cfg = fast_config(tmp_path, f"algorithm={algorithm}", "fed.rounds=2")
    results_a, ckpt_a = _orchestrate(cfg, tmp_path / "a", monkeypatch, "sorted")
    results_b, ckpt_b = _orchestrate(cfg, tmp_path / "b", monkeypatch, "reversed")
    assert results_a["rounds"] == results_b["rounds"]
    assert torch.equal(ckpt_a["server"]["global_state"]["ctx"], ckpt_b["server"]["global_state"]["ctx"])
    for cid, entry in ckpt_a["store"].items():
        for name, value in entry["state"].items():
            assert torch.equal(value, ckpt_b["store"][cid]["state"][name]), (cid, name)


def test_each_method_runs_end_to_end_and_writes_results(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=all", "fed.rounds=2")
    results = {r["algorithm"]: r for r in run_experiment(cfg)}
    assert set(results) == set(ALGORITHMS)  # every file of fedlit/algorithms/
    assert {"zeroshot", "coop_local", "promptfl", "fedprox", "pfedmoap"} <= set(results)
    run_dir = only_run_dir(tmp_path)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "partition.json").is_file()
    for name, res in results.items():
        on_disk = read_results(run_dir / name)
        assert on_disk["final"] == res["final"]
        rows = list(csv.DictReader((run_dir / name / "metrics.csv").open()))
        expected_rounds = ["0"] if name == "zeroshot" else ["1", "2"]
        assert {r["algorithm"] for r in rows} == {name}
        assert [r["round"] for r in rows] == expected_rounds
        assert len(res["rounds"][-1]["accuracy"]) == 4
        assert all(0.0 <= a <= 1.0 for a in res["rounds"][-1]["accuracy"])
        assert res["final"]["last_round"] == pytest.approx(sum(res["rounds"][-1]["accuracy"]) / 4)
    assert results["promptfl"]["rounds"][-1]["acc_global"] is not None
    assert results["coop_local"]["rounds"][-1]["acc_global"] is None
    # FedProx with mu > 0 pulls towards the global prompt: different numbers from PromptFL after training
    assert results["fedprox"]["rounds"][-1]["loss"] != results["promptfl"]["rounds"][-1]["loss"]


def test_pfedmoap_loads_experts_from_round_two_and_beats_zero_shot(tmp_path, monkeypatch):
    loaded: list[int] = []
    original = PFedMoAPClient.configure_optimizers

    def record(self):  # configure_optimizers runs once per local training, after the plan is loaded
        loaded.append(self.num_loaded_experts)
        return original(self)

    monkeypatch.setattr(PFedMoAPClient, "configure_optimizers", record)
    # A random tiny CLIP needs class-specific context and a larger prompt lr to learn in a few steps.
    cfg = fast_config(tmp_path, "algorithm=pfedmoap", "fed.rounds=3", "fed.local_epochs=2",
                      "prompt.class_specific=true", "optim.prompt_lr=0.05")
    [res] = run_experiment(cfg)
    assert loaded == [0] * 4 + [2] * 8  # round 1: plain CoOp; rounds 2-3: K = num_experts - 1 = 2 experts
    ckpt = load_checkpoint(only_run_dir(tmp_path) / "checkpoint.pt")
    for entry in ckpt["store"].values():
        assert len(entry["extras"]["expert_keys"]) == 2 and entry["extras"]["experts"].shape[0] == 2
    zs_cfg = fast_config(tmp_path / "zs", "algorithm=zeroshot")
    [zs] = run_experiment(zs_cfg)
    assert res["final"]["last_round"] > zs["final"]["last_round"] + 0.10


def test_partial_participation_samples_the_same_clients_whatever_the_method(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=promptfl", "fed.frac=0.5", "fed.rounds=3", "data.num_clients=6",
                      "data.shots=4")
    [res] = run_experiment(cfg)
    rows = list(csv.DictReader((only_run_dir(tmp_path) / "metrics.csv").open()))
    assert [int(r["clients"]) for r in rows] == [3, 3, 3]
    assert len(res["rounds"][-1]["accuracy"]) == 6


def test_bf16_mixed_precision_keeps_fp32_master_state_and_the_fused_gate(tmp_path, monkeypatch):
    import torch.nn.functional as F

    calls = {"sdpa": 0, "bf16": 0}
    original = F.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        if q.shape[-1] == 2:  # the gate's heads (d_gate 16 / 8 heads); the text tower's heads are 32 wide
            calls["sdpa"] += 1
            calls["bf16"] += q.dtype == torch.bfloat16
        return original(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    cfg = fast_config(tmp_path, "algorithm=pfedmoap", "fed.rounds=2", "trainer.precision=bf16-mixed")
    [res] = run_experiment(cfg)
    assert calls["sdpa"] > 0 and calls["bf16"] > 0  # the gate ran through the fused kernel, in bf16
    ckpt = load_checkpoint(only_run_dir(tmp_path) / "checkpoint.pt")
    assert ckpt["server"]["global_state"]["ctx"].dtype == torch.float32
    for entry in ckpt["store"].values():
        assert all(v.dtype == torch.float32 for v in entry["state"].values())
    assert all(0.0 <= a <= 1.0 for a in res["rounds"][-1]["accuracy"])


def test_extending_a_finished_run_equals_a_straight_run_with_eval_every(tmp_path):
    common = ["algorithm=promptfl", "fed.eval_every=2", "run.name=extend"]
    straight = run_experiment(fast_config(tmp_path / "straight", *common, "fed.rounds=4"))[0]
    short = run_experiment(fast_config(tmp_path / "ext", *common, "fed.rounds=3"))[0]
    assert [r["round"] for r in short["rounds"]] == [2, 3]  # the final round is evaluated once the run is final
    extended = run_experiment(fast_config(tmp_path / "ext", *common, "fed.rounds=4", "run.resume=auto"))[0]
    assert [r["round"] for r in straight["rounds"]] == [2, 4]
    assert extended["rounds"] == straight["rounds"] and extended["final"] == straight["final"]


def test_final_summarises_every_reported_metric(tmp_path):
    [res] = run_experiment(fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=3"))
    rows, final = res["rounds"], res["final"]
    for metric in ("acc_mean", "acc_weighted", "acc_worst10", "acc_global"):
        values = [row[metric] for row in rows]
        assert final[metric] == {"last_round": values[-1], "mean_last_5": pytest.approx(sum(values) / len(values))}
    assert final["last_round"] == final["acc_mean"]["last_round"]
    [local] = run_experiment(fast_config(tmp_path / "local", "algorithm=coop_local", "fed.rounds=1"))
    assert "acc_global" not in local["final"]  # CoOp local has no global model


def test_clients_without_test_samples_are_left_out_of_averages():
    from fedlit.metrics import round_metrics

    row = round_metrics([0.5, None, 1.0, 0.0], [2, 0, 4, 2])
    assert row["acc_mean"] == 0.5 and row["clients_without_test"] == 1
    assert row["acc_weighted"] == (0.5 * 2 + 1.0 * 4) / 8
    assert row["acc_worst10"] == 0.0


def test_a_stop_signal_during_the_last_round_is_not_a_stop(tmp_path, monkeypatch):
    from fedlit.federation.signals import STOP

    monkeypatch.setattr(STOP, "signal", 10)  # as if SIGUSR1 arrived: every round boundary sees a stop request
    cfg = fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=1")
    [res] = run_experiment(cfg)  # one round: the request lands after the final round, nothing is left to resume
    assert [r["round"] for r in res["rounds"]] == [1]
    with pytest.raises(orchestrator_module.Preempted):
        run_experiment(fast_config(tmp_path / "two", "algorithm=promptfl", "fed.rounds=2"))
