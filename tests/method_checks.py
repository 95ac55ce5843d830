"""Checks every method with a global prompt and private parts shares (the per-method test files call these)."""

from __future__ import annotations

import json

import pytest
import torch

from fedlit.algorithms.base import fedavg
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.experiment import build_job, run_experiment
from fedlit.state import PROMPT, ServerState
from tests.helpers import fast_config, only_run_dir, read_results


def assert_groups_match_single(tmp_path, algorithm: str, names: list[str]) -> None:
    """One round of every client trained one at a time and as one group of 4: same steps, losses and ``names``
    within 1e-6 (fp32 rounding of batched matmuls). The round starts from the initial global prompt + 0.01 (a
    method without a prompt: its initial global model + 0.01)."""
    orch = build_job(fast_config(tmp_path, f"algorithm={algorithm}", "optim.prompt_lr=0.05")).orchestrator(
        tmp_path / "run")
    if PROMPT in orch.initial.params:
        server = ServerState(global_state={"ctx": orch.initial.params[PROMPT] + 0.01})
    else:
        server = orch.algorithm.init_server(orch.initial)
        server.global_state = {k: v + 0.01 for k, v in server.global_state.items()}
    plans = {c: orch.algorithm.plan(server, c, None, orch.initial) for c in range(orch.num_clients)}
    results = {}
    for size in (1, 4):
        orch.trainer.client_batch = size
        results[size] = orch.trainer.train(plans, 1)
    for cid, upload in results[1].items():
        grouped = results[4][cid]
        assert upload.steps == grouped.steps and upload.loss == pytest.approx(grouped.loss, abs=1e-6)
        for name in names:
            assert torch.allclose(upload.state.params[name], grouped.state.params[name], atol=1e-6), (cid, name)


def assert_run_averages_the_prompt_and_keeps_private(tmp_path, algorithm: str, private: list[str],
                                                     has_global: bool = True) -> dict:
    """A 2-round run on the fast config: the global prompt is exactly the sample-weighted FedAvg of the last
    uploads, and each name in ``private`` differs between every pair of clients. Returns the results."""
    [res] = run_experiment(fast_config(tmp_path, f"algorithm={algorithm}", "fed.rounds=2", "optim.prompt_lr=0.05"))
    run_dir = only_run_dir(tmp_path)
    assert read_results(run_dir)["final"] == res["final"]
    last = res["rounds"][-1]
    assert len(last["accuracy"]) == 4 and all(0.0 <= a <= 1.0 for a in last["accuracy"])
    assert (last["acc_global"] is not None) == has_global
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    sizes = json.loads((run_dir / "partition.json").read_text())["train_sizes"]
    store = ckpt["store"]
    assert sorted(store) == [0, 1, 2, 3] and all(e["last_round"] == 2 for e in store.values())
    uploads = [store[c]["state"][PROMPT] for c in range(4)]
    global_ctx = ckpt["server"]["global_state"]["ctx"]
    assert torch.equal(global_ctx, fedavg([{"ctx": u} for u in uploads], sizes)["ctx"])
    direct = sum(n * u.double() for n, u in zip(sizes, uploads)) / sum(sizes)
    assert torch.allclose(global_ctx.double(), direct, atol=1e-7)
    for name in private:
        values = [store[c]["state"][name] for c in range(4)]
        assert all(not torch.equal(values[i], values[j]) for i in range(4) for j in range(i + 1, 4)), name
    return res


def assert_run_averages_the_global_model(tmp_path, algorithm: str, *overrides: str) -> dict:
    """A 2-round run on the fast config of a method whose clients' whole state is global: every global tensor is
    exactly the sample-weighted FedAvg of the last uploads, and each client's accuracy is the global model's on
    its own test split (so the sample-weighted mean of the clients' accuracies is ``acc_global``). Returns the
    results."""
    [res] = run_experiment(fast_config(tmp_path, f"algorithm={algorithm}", "fed.rounds=2", *overrides))
    run_dir = only_run_dir(tmp_path)
    assert read_results(run_dir)["final"] == res["final"]
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    partition = json.loads((run_dir / "partition.json").read_text())
    sizes = partition["train_sizes"]
    store = ckpt["store"]
    assert sorted(store) == [0, 1, 2, 3] and all(e["last_round"] == 2 for e in store.values())
    global_state = ckpt["server"]["global_state"]
    assert set(global_state) == set(store[0]["state"])  # every learnable tensor is global, no prompt
    averaged = fedavg([store[c]["state"] for c in range(4)], sizes)
    for name, value in global_state.items():
        assert torch.equal(value, averaged[name]), name
    last = res["rounds"][-1]
    tests = partition["test_sizes"]
    weighted = sum(a * n for a, n in zip(last["accuracy"], tests)) / sum(tests)
    assert last["acc_global"] == pytest.approx(weighted, abs=1e-12)
    return res
