"""Server-side maths on hand-made tensors: FedAvg, expert selection, plans and aggregation."""

from __future__ import annotations

import pytest
import torch

from fedlit.algorithms import ServerState, build_algorithm, fedavg
from fedlit.algorithms.pfedmoap import select_knn, select_random
from fedlit.config import load_config


def test_fedavg_weights_by_sample_count():
    a = {"ctx": torch.tensor([[1.0, 2.0]]), "g": torch.tensor([0.0])}
    b = {"ctx": torch.tensor([[3.0, 6.0]]), "g": torch.tensor([4.0])}
    out = fedavg([a, b], [1, 3])
    assert torch.equal(out["ctx"], torch.tensor([[2.5, 5.0]]))
    assert torch.equal(out["g"], torch.tensor([3.0]))
    assert out["ctx"].dtype == torch.float32


def _pool(points: dict[int, list[float]]) -> dict[int, dict]:
    return {i: {"ctx": torch.tensor(p).reshape(1, -1), "round": 1} for i, p in points.items()}


def test_knn_selection_excludes_self_and_breaks_ties_by_id():
    pool = _pool({0: [0.0, 0.0], 1: [3.0, 0.0], 2: [0.0, 1.0], 3: [1.0, 0.0], 4: [0.0, -1.0], 5: [10.0, 10.0]})
    # distances from client 0: 1 -> 3, 2 -> 1, 3 -> 1, 4 -> 1, 5 -> 14.1; ties (2, 3, 4) in id order
    assert select_knn(pool, 0, 2) == [2, 3]
    assert select_knn(pool, 0, 4) == [2, 3, 4, 1]
    assert select_knn(pool, 5, 1) == [1]
    assert select_knn(pool, 0, 9) == [2, 3, 4, 1, 5]  # fewer candidates than K: all of them


def test_random_selection_is_a_fresh_per_client_per_round_draw():
    pool = _pool({i: [float(i)] for i in range(10)})
    first = select_random(pool, 3, 4, seed=0, round_index=2)
    assert len(first) == 4 and 3 not in first and len(set(first)) == 4
    assert first == select_random(pool, 3, 4, seed=0, round_index=2)
    draws = {tuple(select_random(pool, 3, 4, seed=0, round_index=r)) for r in range(2, 12)}
    assert len(draws) > 5
    assert select_random(_pool({0: [0.0], 1: [1.0]}), 0, 4, seed=0, round_index=1) == [1]


def _cfg(*overrides):
    return load_config(None, ["data.num_clients=4", "method.num_experts=3", *overrides])


def test_pfedmoap_plan_uses_the_pool_of_the_round_start_and_keeps_the_gate_private():
    algo = build_algorithm(_cfg("algorithm=pfedmoap"))
    initial = {"prompt_learner.ctx": torch.zeros(2, 3), "gate.q_proj.weight": torch.zeros(2, 2)}
    server = ServerState(global_state={"ctx": torch.full((2, 3), 5.0)}, round=1,
                         pool={c: {"ctx": torch.full((2, 3), float(c)), "round": 1} for c in (0, 1, 2)})
    own = {"prompt_learner.ctx": torch.ones(2, 3), "gate.q_proj.weight": torch.full((2, 2), 7.0)}
    plan = algo.plan(server, 1, own, initial)
    assert torch.equal(plan.start["prompt_learner.ctx"], server.global_state["ctx"])  # starts from P_g
    assert torch.equal(plan.start["gate.q_proj.weight"], own["gate.q_proj.weight"])  # its own gate
    assert plan.expert_ids == [0, 2] and plan.expert_rounds == [1, 1]
    assert torch.equal(plan.experts, torch.stack([server.pool[0]["ctx"], server.pool[2]["ctx"]]))
    first_timer = algo.plan(server, 3, None, initial)  # no pool entry: plain CoOp this round
    assert first_timer.experts is None and first_timer.expert_ids == []
    assert torch.equal(first_timer.start["gate.q_proj.weight"], initial["gate.q_proj.weight"])


def test_pfedmoap_aggregation_averages_prompts_replaces_pool_and_never_touches_gates():
    algo = build_algorithm(_cfg("algorithm=pfedmoap"))
    server = ServerState(global_state={"ctx": torch.zeros(1, 2)}, pool={0: {"ctx": torch.zeros(1, 2), "round": 1}},
                         round=1)
    uploads = {0: {"prompt_learner.ctx": torch.tensor([[2.0, 0.0]]), "gate.w": torch.tensor([1.0])},
               2: {"prompt_learner.ctx": torch.tensor([[0.0, 4.0]]), "gate.w": torch.tensor([3.0])}}
    new = algo.aggregate(server, uploads, {0: 3, 2: 1})
    assert torch.equal(new.global_state["ctx"], torch.tensor([[1.5, 1.0]]))
    assert set(new.global_state) == {"ctx"}
    assert new.round == 2 and new.pool[0]["round"] == 2 and torch.equal(new.pool[2]["ctx"], torch.tensor([[0.0, 4.0]]))
    assert torch.equal(server.pool[0]["ctx"], torch.zeros(1, 2))  # the old pool is not modified in place
    ablation = build_algorithm(_cfg("algorithm=pfedmoap", "method.aggregate_gate=true"))
    new = ablation.aggregate(server, uploads, {0: 3, 2: 1})
    assert torch.equal(new.global_state["gate.w"], torch.tensor([1.5]))


@pytest.mark.parametrize("name", ["promptfl", "fedprox"])
def test_promptfl_starts_from_global_and_evaluates_the_global_prompt(name):
    algo = build_algorithm(_cfg(f"algorithm={name}"))
    server = ServerState(global_state={"ctx": torch.ones(1, 2)})
    initial = {"prompt_learner.ctx": torch.zeros(1, 2)}
    plan = algo.plan(server, 0, {"prompt_learner.ctx": torch.full((1, 2), 9.0)}, initial)
    assert torch.equal(plan.start["prompt_learner.ctx"], torch.ones(1, 2))
    stored = {"state": {"prompt_learner.ctx": torch.full((1, 2), 9.0)}}
    assert torch.equal(algo.eval_plan(server, stored, initial).start["prompt_learner.ctx"], torch.ones(1, 2))


def test_coop_local_continues_its_own_prompt_and_never_aggregates():
    algo = build_algorithm(_cfg("algorithm=coop_local"))
    server = ServerState(global_state={"ctx": torch.ones(1, 2)})
    initial = {"prompt_learner.ctx": torch.zeros(1, 2)}
    assert torch.equal(algo.plan(server, 0, None, initial).start["prompt_learner.ctx"], torch.zeros(1, 2))
    own = {"prompt_learner.ctx": torch.full((1, 2), 4.0)}
    assert torch.equal(algo.plan(server, 0, own, initial).start["prompt_learner.ctx"], own["prompt_learner.ctx"])
    new = algo.aggregate(server, {0: own}, {0: 5})
    assert torch.equal(new.global_state["ctx"], torch.ones(1, 2))
    assert algo.global_plan(server, initial) is None


def test_expert_feature_cache_keeps_only_current_pool_prompts():
    algo = build_algorithm(_cfg("algorithm=pfedmoap"))
    algo._expert_features = {(0, 1): torch.zeros(1), (0, 2): torch.zeros(1), (1, 2): torch.zeros(1)}
    server = ServerState(global_state={"ctx": torch.zeros(1, 2)}, round=2,
                         pool={0: {"ctx": torch.zeros(1, 2), "round": 2}, 1: {"ctx": torch.ones(1, 2), "round": 2}})
    algo.plan(server, 0, None, {"prompt_learner.ctx": torch.zeros(1, 2)})
    assert set(algo._expert_features) == {(0, 2), (1, 2)}
