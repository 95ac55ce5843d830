"""Server-side maths on hand-made tensors: FedAvg, expert selection, plans and aggregation."""

from __future__ import annotations

import pytest
import torch

from fedlit.algorithms import build_algorithm, fedavg
from fedlit.algorithms.pfedmoap import exact_distances, select_knn, select_knn_many, select_random
from fedlit.config import load_config
from fedlit.state import ClientState, ServerState, StoreEntry, Upload


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


def naive_knn(pool: dict[int, dict], client_id: int, k: int) -> list[int]:
    """Every other pool entry ranked by its one-at-a-time float64 distance, ties by id: the definition."""
    candidates = sorted(i for i in pool if i != client_id)
    distances = exact_distances(pool, client_id, candidates)
    return [candidates[j] for j in sorted(range(len(candidates)), key=lambda j: (distances[j], candidates[j]))[:k]]


@pytest.mark.parametrize("seed", range(4))
def test_batched_knn_equals_the_one_at_a_time_ranking_ties_included(seed):
    generator = torch.Generator().manual_seed(seed)
    centre = torch.randn(16, 64, generator=generator) * 0.02
    pool = {}
    for cid in range(0, 2600, 2):  # more rows than one float64 chunk; sparse ids
        pool[cid] = {"ctx": centre + 1e-3 * torch.randn(16, 64, generator=generator), "round": 1}
    for cid in (1, 3, 5):  # bitwise duplicates of 0, and rows a hair away from 2: ties and near ties
        pool[cid] = {"ctx": pool[0]["ctx"].clone(), "round": 2}
    pool[7] = {"ctx": pool[2]["ctx"] + 1e-9, "round": 2}
    queries = [0, 1, 2, 7, 100, 2598]
    batched = select_knn_many(pool, queries, 9)
    for cid in queries:
        assert batched[cid] == naive_knn(pool, cid, 9), cid
    assert batched[0][:3] == [1, 3, 5] and batched[1][:3] == [0, 3, 5]  # exact ties: the smaller id first
    assert select_knn_many(pool, [], 9) == {} and select_knn_many(pool, [0], 0) == {0: []}
    assert select_knn({4: {"ctx": torch.zeros(2), "round": 1}}, 4, 3) == []


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


def _state(**params) -> ClientState:
    return ClientState({k.replace("__", "."): v for k, v in params.items()})


def _upload(**params) -> Upload:
    return Upload(_state(**params), loss=0.0, steps=1)


def test_pfedmoap_plan_uses_the_pool_of_the_round_start_and_keeps_the_gate_private():
    algo = build_algorithm(_cfg("algorithm=pfedmoap"))
    initial = _state(prompt_learner__ctx=torch.zeros(2, 3), gate__q_proj__weight=torch.zeros(2, 2))
    pool = {c: {"ctx": torch.full((2, 3), float(c)), "round": 1} for c in (0, 1, 2)}
    server = ServerState(global_state={"ctx": torch.full((2, 3), 5.0)}, round=1, client_records=pool)
    own = StoreEntry(_state(prompt_learner__ctx=torch.ones(2, 3), gate__q_proj__weight=torch.full((2, 2), 7.0)))
    plan = algo.plan(server, 1, own, initial)
    assert torch.equal(plan.start.params["prompt_learner.ctx"], server.global_state["ctx"])  # starts from P_g
    assert torch.equal(plan.start.params["gate.q_proj.weight"], own.state.params["gate.q_proj.weight"])  # own gate
    assert plan.extras["expert_keys"] == [[0, 1], [2, 1]]
    assert torch.equal(plan.extras["experts"], torch.stack([pool[0]["ctx"], pool[2]["ctx"]]))
    assert algo.keep(plan) == plan.extras  # evaluated later with the experts it downloaded now
    first_timer = algo.plan(server, 3, None, initial)  # no pool entry: plain CoOp this round
    assert first_timer.extras == {}
    assert torch.equal(first_timer.start.params["gate.q_proj.weight"], initial.params["gate.q_proj.weight"])
    assert torch.equal(own.state.params["prompt_learner.ctx"], torch.ones(2, 3))  # the stored state is not modified


def test_pfedmoap_aggregation_averages_prompts_replaces_pool_and_never_touches_gates():
    algo = build_algorithm(_cfg("algorithm=pfedmoap"))
    server = ServerState(global_state={"ctx": torch.zeros(1, 2)}, round=1,
                         client_records={0: {"ctx": torch.zeros(1, 2), "round": 1}})
    uploads = {0: _upload(prompt_learner__ctx=torch.tensor([[2.0, 0.0]]), gate__w=torch.tensor([1.0])),
               2: _upload(prompt_learner__ctx=torch.tensor([[0.0, 4.0]]), gate__w=torch.tensor([3.0]))}
    new = algo.aggregate(server, uploads, {0: 3, 2: 1})
    assert torch.equal(new.global_state["ctx"], torch.tensor([[1.5, 1.0]]))
    assert set(new.global_state) == {"ctx"}
    pool = new.client_records
    assert new.round == 2 and pool[0]["round"] == 2 and torch.equal(pool[2]["ctx"], torch.tensor([[0.0, 4.0]]))
    assert torch.equal(server.client_records[0]["ctx"], torch.zeros(1, 2))  # the old pool is not modified in place
    assert new.client_records[0] is not server.client_records[0]  # a changed record is a new object
    ablation = build_algorithm(_cfg("algorithm=pfedmoap", "method.aggregate_gate=true"))
    new = ablation.aggregate(server, uploads, {0: 3, 2: 1})
    assert torch.equal(new.global_state["gate.w"], torch.tensor([1.5]))


@pytest.mark.parametrize("name", ["promptfl", "fedprox"])
def test_promptfl_starts_from_global_and_evaluates_the_global_prompt(name):
    algo = build_algorithm(_cfg(f"algorithm={name}"))
    server = ServerState(global_state={"ctx": torch.ones(1, 2)})
    initial = _state(prompt_learner__ctx=torch.zeros(1, 2))
    stored = StoreEntry(_state(prompt_learner__ctx=torch.full((1, 2), 9.0)))
    plan = algo.plan(server, 0, stored, initial)
    assert torch.equal(plan.start.params["prompt_learner.ctx"], torch.ones(1, 2))
    if name == "fedprox":  # the proximal centre is the round's global prompt
        assert torch.equal(plan.extras["prox_center"], server.global_state["ctx"])
    else:
        assert plan.extras == {}
    assert torch.equal(algo.eval_plan(server, 0, stored, initial).start.params["prompt_learner.ctx"], torch.ones(1, 2))


def test_fedprox_is_promptfl_plus_a_centre():
    cfg = _cfg("algorithm=fedprox")
    prox, promptfl = build_algorithm(cfg), build_algorithm(cfg, "promptfl")
    server = ServerState(global_state={"ctx": torch.full((1, 2), 3.0)})
    uploads = {0: _upload(prompt_learner__ctx=torch.tensor([[2.0, 0.0]])),
               1: _upload(prompt_learner__ctx=torch.tensor([[0.0, 4.0]]))}
    assert torch.equal(prox.aggregate(server, uploads, {0: 1, 1: 1}).global_state["ctx"],
                       promptfl.aggregate(server, uploads, {0: 1, 1: 1}).global_state["ctx"])
    initial = _state(prompt_learner__ctx=torch.zeros(1, 2))
    assert set(prox.plan(server, 0, None, initial).extras) == {"prox_center"}


def test_coop_local_continues_its_own_prompt_and_never_aggregates():
    algo = build_algorithm(_cfg("algorithm=coop_local"))
    server = ServerState(global_state={"ctx": torch.ones(1, 2)})
    initial = _state(prompt_learner__ctx=torch.zeros(1, 2))
    assert torch.equal(algo.plan(server, 0, None, initial).start.params["prompt_learner.ctx"], torch.zeros(1, 2))
    own = StoreEntry(_state(prompt_learner__ctx=torch.full((1, 2), 4.0)))
    assert torch.equal(algo.plan(server, 0, own, initial).start.params["prompt_learner.ctx"], torch.full((1, 2), 4.0))
    new = algo.aggregate(server, {0: Upload(own.state, 0.0, 1)}, {0: 5})
    assert torch.equal(new.global_state["ctx"], torch.ones(1, 2))
    assert algo.global_plan(server, initial) is None


def test_client_state_flattens_and_restores_optimiser_state():
    momentum = {"prompt_learner.ctx": {"momentum_buffer": torch.zeros(2)}}
    state = ClientState({"prompt_learner.ctx": torch.ones(2)}, momentum)
    flat = state.flat()
    assert set(flat) == {"prompt_learner.ctx", "optim/prompt_learner.ctx/momentum_buffer"}
    again = ClientState.from_flat(flat)
    assert again.params.keys() == state.params.keys() and again.optim.keys() == state.optim.keys()
    upload = Upload(state, loss=0.25, steps=7)
    back = Upload.from_flat(upload.flat())
    assert (back.loss, back.steps) == (0.25, 7)
