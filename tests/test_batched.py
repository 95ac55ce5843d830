"""Batched local training (G clients through the text encoder together) against the sequential reference.

Clients have unequal sizes (Dirichlet split, batch 16, two epochs: 10, 8, 10 and 10 steps with ragged last
batches), so groups pad batches, clients finish at different steps and cross epoch boundaries at different steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fedlit.federation import trainer as trainer_module
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.experiment import build_job
from fedlit.federation.orchestrator import Orchestrator
from fedlit.federation.trainer import auto_group_size, client_activation_bytes, masked_sgd_step
from fedlit.gating import AttentionGate
from fedlit.state import ClientPlan, StoreEntry
from tests.helpers import fast_config

UNEQUAL = ["data.partition=dirichlet", "data.alpha=0.5", "data.min_size=2", "data.batch_size=16",
           "fed.local_epochs=2", "optim.prompt_lr=0.05", "optim.gate_lr=0.05"]
TOL = 1e-6


def make_orchestrator(tmp_path, *overrides: str) -> Orchestrator:
    return build_job(fast_config(tmp_path, *UNEQUAL, *overrides)).orchestrator(tmp_path / "run")


def round_plans(orch: Orchestrator, server, store: dict) -> dict:
    return {cid: orch.algorithm.plan(server, cid, store.get(cid), orch.initial) for cid in range(orch.num_clients)}


def assert_uploads_match(sequential: dict, grouped: dict) -> None:
    """Trained state and mean loss within 1e-6 (abs); step counts identical. Momentum buffers are sums of raw
    gradients (about 10x a gradient, entries up to ~5 here) that carry the gradients' fp32 rounding (padded and
    batched matmuls sum in another order): they are compared at 1e-5 of their own scale (seen: <= 2e-6)."""
    assert sequential.keys() == grouped.keys()
    for cid, upload in sequential.items():
        assert upload.steps == grouped[cid].steps, cid
        assert upload.loss == pytest.approx(grouped[cid].loss, abs=TOL), cid
        expected_flat, actual_flat = upload.state.flat(), grouped[cid].state.flat()
        assert expected_flat.keys() == actual_flat.keys(), cid
        for name, expected in expected_flat.items():
            actual = actual_flat[name]
            assert actual.shape == expected.shape and actual.dtype == expected.dtype, (cid, name)
            tol = 10 * TOL * max(1.0, expected.abs().max().item()) if name.startswith("optim/") else TOL
            err = (actual - expected).abs().max().item()
            assert err <= tol, (cid, name, err)


def train(orch: Orchestrator, plans: dict, r: int, group_size: int) -> dict:
    orch.trainer.client_batch = group_size
    return orch.trainer.train(copy.deepcopy(plans), r)


def compare_round(orch: Orchestrator, plans: dict, r: int) -> dict:
    """Sequential uploads of one round, after checking that G = 2 and G = all give the same."""
    sequential = train(orch, plans, r, 1)
    for group_size in (2, len(plans)):
        assert_uploads_match(sequential, train(orch, plans, r, group_size))
    return sequential


def next_round(orch: Orchestrator, server, uploads: dict) -> tuple:
    sizes = {c: orch.data.train_size(c) for c in uploads}
    return orch.algorithm.aggregate(server, uploads, sizes), {c: StoreEntry(u.state) for c, u in uploads.items()}


@pytest.mark.parametrize("algorithm, overrides", [
    ("promptfl", []),
    ("fedprox", ["method.mu=0.5"]),
    ("pfedmoap", []),
    ("pfedmoap", ["optim.persistent_state=true", "gate.top_k=1", "prompt.class_specific=true"]),
])
def test_batched_training_matches_sequential_on_unequal_clients(tmp_path, algorithm, overrides):
    orch = make_orchestrator(tmp_path, f"algorithm={algorithm}", *overrides)
    steps = [-(-orch.data.train_size(c) // 16) * 2 for c in range(orch.num_clients)]
    assert len(set(steps)) > 1  # unequal step counts: some clients finish early
    server = orch.algorithm.init_server(orch.initial)
    first = compare_round(orch, round_plans(orch, server, {}), 1)
    assert [first[c].steps for c in sorted(first)] == steps
    server, store = next_round(orch, server, first)
    plans = round_plans(orch, server, store)
    if algorithm == "pfedmoap":  # round 2 mixes K = 2 experts with a client seen for the first time (K = 0)
        assert all(p.extras["experts"].shape[0] == 2 for p in plans.values())
        plans[1] = ClientPlan(start=plans[1].start)
    second = compare_round(orch, plans, 2)
    if algorithm == "fedprox":  # the proximal term was active (its centre is the round's global prompt)
        assert torch.equal(orch.module.client_extras()["prox_center"], server.global_state["ctx"])
    # Training really moved every client, differently (so equality above is not trivial).
    for cid, upload in second.items():
        moved = upload.state.params["prompt_learner.ctx"] - plans[cid].start.params["prompt_learner.ctx"]
        assert moved.abs().max() > 1e-3
    ctx = {c: second[c].state.params["prompt_learner.ctx"] for c in second}
    assert (ctx[0] - ctx[2]).abs().max() > 1e-4
    if "optim.persistent_state=true" in overrides:
        momentum = {c: second[c].state.optim["gate.q_proj.weight"]["momentum_buffer"] for c in second}
        assert momentum[0].abs().max() > 0  # restored and updated gate momentum
        assert torch.equal(momentum[1], torch.zeros_like(momentum[1]))  # client 1 had no experts: gate unused


def test_training_leaves_plans_untouched(tmp_path):
    orch = make_orchestrator(tmp_path, "algorithm=pfedmoap", "optim.persistent_state=true")
    plans = round_plans(orch, orch.algorithm.init_server(orch.initial), {})
    for plan in plans.values():
        plan.start.optim = {"prompt_learner.ctx": {"momentum_buffer": torch.ones_like(orch.initial.params[
            "prompt_learner.ctx"])}}
    before = copy.deepcopy(plans)
    for group_size in (1, 3):
        orch.trainer.client_batch = group_size
        orch.trainer.train(plans, 1)
        for cid, plan in plans.items():
            for name, value in plan.start.flat().items():
                assert torch.equal(value, before[cid].start.flat()[name]), (cid, name)


def run_job(tmp_path, client_batch: int):
    cfg = fast_config(tmp_path, *UNEQUAL, "algorithm=pfedmoap", "fed.rounds=2", f"perf.client_batch={client_batch}")
    run_dir = tmp_path / f"g{client_batch}"
    return build_job(cfg).orchestrator(run_dir).run(), load_checkpoint(run_dir / "checkpoint.pt")


def test_full_run_with_all_clients_in_one_group_equals_sequential_run(tmp_path):
    results_seq, ckpt_seq = run_job(tmp_path, 1)
    results_bat, ckpt_bat = run_job(tmp_path, 4)
    for row_seq, row_bat in zip(results_seq["rounds"], results_bat["rounds"]):
        assert row_seq["accuracy"] == row_bat["accuracy"]
        assert row_seq["loss"] == pytest.approx(row_bat["loss"], abs=TOL)
    for cid, entry in ckpt_seq["store"].items():
        for name, value in entry["state"].items():
            assert (value - ckpt_bat["store"][cid]["state"][name]).abs().max() <= TOL, (cid, name)
    assert (ckpt_seq["server"]["global_state"]["ctx"] - ckpt_bat["server"]["global_state"]["ctx"]).abs().max() <= TOL


@pytest.mark.parametrize("momentum, weight_decay, nesterov", [(0.9, 5e-4, False), (0.9, 0.0, True), (0.0, 1e-2, False)])
def test_masked_sgd_step_is_torch_sgd_per_client_bitwise(momentum, weight_decay, nesterov):
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(3, 4, 5, generator=gen)
    restored = torch.randn(4, 5, generator=gen)  # client 2 continues from a persistent momentum buffer
    grads = torch.randn(4, 3, 4, 5, generator=gen)
    active = [[0, 1, 2], [0, 1, 2], [0, 2], [2]]  # client 1 stops after 2 steps, client 0 after 3
    lrs = [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.05, 0.0, 0.3], [0.0, 0.0, 0.25]]  # per client per step
    param, buf = start.clone(), torch.zeros(3, 4, 5)
    buf[2] = restored
    for step in range(4):
        masked_sgd_step(param, grads[step], buf, active[step], lrs[step], momentum, weight_decay, nesterov)
    for g in range(3):
        p = torch.nn.Parameter(start[g].clone())
        opt = torch.optim.SGD([p], lr=1.0, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        if g == 2 and momentum:
            opt.state[p]["momentum_buffer"] = restored.clone()
        for step in range(4):
            if g in active[step]:
                opt.param_groups[0]["lr"] = lrs[step][g]
                p.grad = grads[step, g].clone()
                opt.step()
        assert torch.equal(param[g], p.detach()), g
        expected_buf = opt.state[p].get("momentum_buffer")
        if expected_buf is None:  # no momentum: the buffer is left untouched
            expected_buf = restored if g == 2 else torch.zeros(4, 5)
        assert torch.equal(buf[g], expected_buf), g


@pytest.mark.parametrize("top_k", [None, 1])
def test_stacked_gates_equal_each_gate_alone(top_k):
    torch.manual_seed(0)
    gates = [AttentionGate(64, d_gate=16, num_heads=2, top_k=top_k) for _ in range(3)]
    weights = {n: torch.stack([dict(g.named_parameters())[n] for g in gates]) for n, _ in gates[0].named_parameters()}
    gen = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(3, 6, 64, generator=gen), dim=-1)
    experts = F.normalize(torch.randn(3, 4, 5, 64, generator=gen), dim=-1)
    with torch.no_grad():
        grouped = gates[0].group_moe_logits(image, experts, 14.0, weights)
        t_moe = gates[0].group_forward(image, experts, weights)
        for g, gate in enumerate(gates):
            torch.testing.assert_close(grouped[g], gate.moe_logits(image[g], experts[g], 14.0), rtol=0, atol=TOL)
            torch.testing.assert_close(t_moe[g], gate(image[g], experts[g]), rtol=0, atol=TOL)
    assert (grouped[0] - grouped[1]).abs().max() > 1e-3  # the gates really differ
    with pytest.raises(ValueError, match=r"image_features must be \(G, B, 64\)"):
        gates[0].group_forward(image[0], experts, weights)


def test_auto_group_size_fits_the_estimate_into_free_memory(tmp_path, monkeypatch):
    orch = make_orchestrator(tmp_path, "algorithm=pfedmoap")
    module = orch.module
    per_client = client_activation_bytes(module)
    learner, tower, classes = module.prompt_learner, module.backbone.model.transformer, module.num_classes
    tokens, shared = learner.build_embeddings().shape[-2], learner.shared_length
    assert (tokens, shared) == (1 + 4 + learner.token_suffix.shape[1], 5)  # start token + 4 context tokens shared
    suffix = tokens - shared
    assert per_client == 4 * tower.layers * (18 * tower.width * (shared + classes * suffix)
                                             + 2 * 2 * (shared**2 + classes * suffix * tokens)
                                             + 2 * classes * tokens * tower.width)
    learner.shared_length = 0  # per-class path: C sequences of L tokens
    assert client_activation_bytes(module) == 4 * classes * tower.layers * tokens * (18 * tower.width + 2 * 2 * tokens)
    assert client_activation_bytes(module) > 1.5 * per_client  # 5 of 9 positions no longer repeated per class
    learner.shared_length = shared
    monkeypatch.setattr(trainer_module, "available_memory", lambda device: 7 * per_client)
    assert auto_group_size(module, 8, 16, "cpu") == 3  # half of 7 clients' worth
    assert auto_group_size(module, 2, 16, "cpu") == 2  # capped by the number of clients
    assert auto_group_size(module, 8, 16, "cpu", extras_bytes=per_client // 16) == 1  # extras double the need
    monkeypatch.setattr(trainer_module, "available_memory", lambda device: 0)
    assert auto_group_size(module, 8, 16, "cpu") == 1  # never below one
    with pytest.raises(ValueError, match="client_batch must be >= 0"):
        type(orch.trainer)(module, orch.data, seed=0, local_epochs=1, client_batch=-1)
