"""pFedMoAP's expert poisoning (#21): Byzantine pool prompts, what honest clients download, the pool defences and the
gate cap, the harm metrics, and defaults that leave every run as it was."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import byzfl
import numpy as np
import pytest
import torch

from fedlit.algorithms import build_algorithm
from fedlit.algorithms.base import fedavg
from fedlit.algorithms.pfedmoap import defended_pool, select_knn_many
from fedlit.config import RobustConfig
from fedlit.federation.experiment import build_job
from fedlit.federation.sampling import attacked_clients
from fedlit.gating import AttentionGate, cap_weights
from fedlit.metrics import poison_metrics
from fedlit.modules.pfedmoap_linear import linear_gate_weights
from fedlit.robust import defend_pool, mislead_rows, pool_filter
from fedlit.state import PROMPT, ClientState, ServerState, Upload
from tests.helpers import FAST, ROOT, cache_dir, fast_config

CTX = (2, 3)  # n_ctx x width of the hand-made prompts below


def prompts(seed: int, n: int, spread: float = 0.01) -> list[torch.Tensor]:
    """``n`` float32 prompts ``CTX`` near 1 (a fixed stream)."""
    g = torch.Generator().manual_seed(seed)
    return [1 + spread * torch.randn(CTX, generator=g) for _ in range(n)]


def server_after_uploads(cfg, uploaded: list[torch.Tensor], start: torch.Tensor) -> tuple:
    """The pfedmoap algorithm of ``cfg`` and its server after one round in which client i uploaded ``uploaded[i]``
    from the global prompt ``start`` (equal sizes)."""
    algorithm = build_algorithm(cfg)
    server = ServerState(global_state={"ctx": start.clone()})
    uploads = {c: Upload(ClientState({PROMPT: x}), loss=0.0, steps=1) for c, x in enumerate(uploaded)}
    return algorithm, algorithm.aggregate(server, uploads, {c: 1 for c in uploads})


def test_a_sign_flipped_pool_prompt_is_what_every_honest_client_downloads(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=pfedmoap", "method.num_experts=4", "attack.kind=sign_flip",
                      "attack.fraction=0.25", "attack.target=pool")
    [attacker] = attacked_clients(0, 4, 0.25)
    start, uploaded = torch.ones(CTX), prompts(0, 4)
    algorithm, server = server_after_uploads(cfg, uploaded, start)
    crafted = (start.double() - 10 * (uploaded[attacker].double() - start.double())).float()
    assert torch.equal(server.client_records[attacker]["ctx"], crafted)  # P_g - scale (x_a - P_g)
    assert all(torch.equal(server.client_records[c]["ctx"], uploaded[c]) for c in range(4) if c != attacker)
    # target=pool: the aggregate is the FedAvg of what the clients uploaded, attacker's honest upload included
    assert torch.equal(server.global_state["ctx"], fedavg([{"x": x} for x in uploaded], [1] * 4)["x"])
    initial = ClientState({PROMPT: torch.zeros(CTX)})
    plans = algorithm.plan_round(server, {c: None for c in range(4)}, initial)
    for c in range(4):
        ids = [i for i, _ in plans[c].extras["expert_keys"]]
        assert sorted(ids) == [i for i in range(4) if i != c]  # K = 3 of 3 others: everybody downloads it
        if c != attacker:
            assert torch.equal(plans[c].extras["experts"][ids.index(attacker)], crafted)
    # target=update: the pool keeps the upload, the aggregate takes the flipped update
    _, updated = server_after_uploads(fast_config(tmp_path, "algorithm=pfedmoap", "attack.kind=sign_flip",
                                                  "attack.fraction=0.25", "attack.target=update"), uploaded, start)
    assert torch.equal(updated.client_records[attacker]["ctx"], uploaded[attacker])
    assert not torch.equal(updated.global_state["ctx"], server.global_state["ctx"])


def test_mislead_places_the_attacker_where_every_honest_client_finds_it_nearest():
    honest = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # centroid 0, every distance 1
    np.testing.assert_array_equal(mislead_rows(np.array([[10.0, 0.0]]), honest, 0.5), [[0.5, 0.0]])
    np.testing.assert_array_equal(mislead_rows(np.array([[0.0, -3.0]]), honest, 2.0), [[0.0, -2.0]])
    np.testing.assert_array_equal(mislead_rows(np.zeros((1, 2)), honest, 0.5), [[0.0, 0.0]])  # at m: stays at m
    pool = {i: {"ctx": torch.tensor(row, dtype=torch.float64).reshape(1, 2), "round": 1}
            for i, row in enumerate([*honest, *mislead_rows(np.array([[10.0, 0.0]]), honest, 0.25)])}
    # at radius 0.25 ([0.25, 0]) it is nearer to each honest prompt than any other (1.25 < sqrt 2 for [-1, 0])
    assert select_knn_many(pool, [0, 1, 2, 3], 1) == {0: [4], 1: [4], 2: [4], 3: [4]}
    # the distance filter does not see it (it is inside the honest spread): the gate cap is the defence left
    assert pool_filter(np.stack([p["ctx"].reshape(-1).numpy() for p in pool.values()]), 2.0).all()


def test_the_distance_filter_drops_exactly_the_far_pool_prompts():
    rows = np.array([[1.0, 2.0], [1.1, 2.1], [0.9, 1.9], [1.0, 2.2], [-9.0, -18.0], [1.3, 2.0], [30.0, 0.0]])
    median = np.median(rows, axis=0)  # (1.0, 2.0)
    distances = [np.hypot(*(r - median)) for r in rows]
    assert np.array_equal(np.flatnonzero(pool_filter(rows, 2.0)), [0, 1, 2, 3, 5])
    # the median distance is row 3's (0.2): rows 0 (at the median), 1, 2 (0.141) and 3 stay at tau = 1; row 5 (0.3)
    # needs tau >= 1.5, row 3 goes below tau = 1
    for tau, kept in ((1.0, [0, 1, 2, 3]), (1.5, [0, 1, 2, 3, 5]), (0.9, [0, 1, 2])):
        assert np.array_equal(np.flatnonzero(pool_filter(rows, tau)), kept)
        assert kept == [i for i, d in enumerate(distances) if d <= tau * np.median(distances)]


def test_the_filter_removes_the_crafted_prompt_from_what_honest_clients_download(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=pfedmoap", "method.num_experts=3", "attack.kind=sign_flip",
                      "attack.fraction=0.25", "robust.pool_filter=2")
    [attacker] = attacked_clients(0, 4, 0.25)
    algorithm, server = server_after_uploads(cfg, prompts(1, 4), torch.ones(CTX))
    rows = defended_pool(server.client_records, server.global_state["ctx"], cfg.robust, server.round)
    assert sorted(rows) == [c for c in range(4) if c != attacker]
    assert all(rows[c] is server.client_records[c] for c in rows)  # filtered, not changed
    plans = algorithm.plan_round(server, {c: None for c in range(4)}, ClientState({PROMPT: torch.zeros(CTX)}))
    for c in range(4):  # K = 2: each honest client gets the two other honest prompts, the attacker two of three
        ids = sorted(i for i, _ in plans[c].extras["expert_keys"])
        assert ids == [i for i in range(4) if i not in (c, attacker)] if c != attacker else len(ids) == 2
        assert attacker not in ids


def test_pool_pre_aggregators_are_byzfls_around_the_global_prompt():
    rows, centre = np.array([[1.0, 1.0], [1.2, 1.0], [1.0, 1.2], [5.0, -3.0]]), np.array([1.0, 1.0])
    keep, nnm = defend_pool(rows, centre, RobustConfig(pool_pre="nnm", f=1))
    assert keep.all()
    np.testing.assert_allclose(nnm, centre + byzfl.NNM(f=1)(rows - centre), rtol=0, atol=1e-12)
    _, clipped = defend_pool(rows, centre, RobustConfig(pool_pre="clipping", pre_clip=0.25))
    np.testing.assert_allclose(clipped[:3], rows[:3], rtol=0, atol=1e-12)  # within 0.25 of the centre: unchanged
    np.testing.assert_allclose(clipped[3], centre + 0.25 * np.array([4.0, -4.0]) / np.hypot(4.0, 4.0), atol=1e-12)
    keep, both = defend_pool(rows, centre, RobustConfig(pool_filter=2.0, pool_pre="clipping", pre_clip=0.25))
    assert keep.tolist() == [True, True, True, False] and both.shape == (3, 2)
    pool = {i: {"ctx": torch.tensor(r, dtype=torch.float32).reshape(1, 2), "round": 1} for i, r in enumerate(rows)}
    defended = defended_pool(pool, torch.tensor([[1.0, 1.0]]), RobustConfig(pool_pre="clipping", pre_clip=0.25), 7)
    assert [defended[i]["round"] for i in range(4)] == [7] * 4  # new entries: keyed by the pool's round
    torch.testing.assert_close(defended[3]["ctx"], torch.from_numpy(clipped[3]).float().reshape(1, 2))


def test_the_gate_cap_bounds_every_downloaded_experts_weight_and_gives_the_rest_to_the_local_one():
    torch.testing.assert_close(cap_weights(torch.tensor([0.1, 0.6, 0.3]), 0.25), torch.tensor([0.5, 0.25, 0.25]))
    assert torch.equal(cap_weights(torch.tensor([0.1, 0.6, 0.3]), None), torch.tensor([0.1, 0.6, 0.3]))
    torch.manual_seed(0)
    capped, free = AttentionGate(32, d_gate=16, num_heads=2, scale=10.0, cap=0.2), AttentionGate(32, 16, 2, 10.0)
    free.load_state_dict(capped.state_dict())
    images = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    experts = torch.nn.functional.normalize(torch.randn(4, 3, 32), dim=-1)
    w, w_free = capped.expert_weights(images, experts), free.expert_weights(images, experts)  # (B, C, H, E)
    assert w_free[..., 1:].max() > 0.2 and w[..., 1:].max() <= 0.2
    torch.testing.assert_close(w, cap_weights(w_free, 0.2))
    torch.testing.assert_close(w.sum(-1), torch.ones(5, 3, 2))
    # the logits mix the value projections with the capped weights
    query = images[:, ::2]
    values = capped.v_proj(experts[..., ::2]).view(4, 3, 2, 8)  # (E, C, H, d_h)
    mixed = torch.einsum("bche,echd->cbhd", w, values).reshape(3, 5, 16)
    expected = 7.0 * torch.einsum("bd,cbd->bc", query, capped.out_proj(mixed))
    torch.testing.assert_close(capped.moe_logits(images, experts, 7.0), expected, rtol=1e-5, atol=1e-5)
    whole = AttentionGate(32, 16, 2, 10.0, cap=1.0)
    whole.load_state_dict(free.state_dict())
    torch.testing.assert_close(whole.moe_logits(images, experts, 7.0), free.moe_logits(images, experts, 7.0))
    linear = linear_gate_weights(query[None], torch.randn(1, 4, 16), torch.zeros(1, 4), 4, cap=0.1)
    assert linear[..., 1:].max() <= 0.1 and torch.allclose(linear.sum(-1), torch.ones(1, 5))


def test_poison_metrics_count_the_poisoned_slots_and_their_gate_weight():
    diagnostics = {"expert_ids": [[1.0, 2.0], None, [3.0, 1.0], [0.0, 3.0]],
                   "expert_attention": [[0.5, 0.3, 0.2], None, [0.6, 0.1, 0.3], [0.4, 0.4, 0.2]]}
    out = poison_metrics(diagnostics, [0, 2, 3], {1})
    assert out == {"poison_selected": 2 / 6, "poison_reach": 2 / 3, "poison_attention": pytest.approx(0.6 / 3)}
    assert poison_metrics({}, [0], {1}) == {"poison_selected": None, "poison_reach": None, "poison_attention": None}


def test_a_run_under_mislead_reports_the_poisoned_experts_and_the_cap_bounds_them(tmp_path):
    common = ["algorithm=pfedmoap", "fed.rounds=2", "eval.diagnostics=true", "attack.kind=mislead",
              "attack.fraction=0.25"]
    job = build_job(fast_config(tmp_path, *common))
    [attacker] = attacked_clients(0, 4, 0.25)
    results = {}
    for name, extra in {"open": [], "capped": ["gate.cap=0.1"]}.items():
        cfg = fast_config(tmp_path, *common, *extra)
        results[name] = dataclasses.replace(job, cfg=cfg).orchestrator(tmp_path / name).run()
    for res in results.values():
        last = res["rounds"][-1]
        ids, weights = last["diagnostics"]["expert_ids"], last["diagnostics"]["expert_attention"]
        honest = [c for c in range(4) if c != attacker]
        slots = [(c, j) for c in honest for j, i in enumerate(ids[c]) if round(i) == attacker]
        assert last["poison_selected"] == len(slots) / sum(len(ids[c]) for c in honest) > 0
        assert last["poison_attention"] == pytest.approx(sum(weights[c][1 + j] for c, j in slots) / len(honest))
        assert last["accuracy"][attacker] is None and ids[attacker] is None
    assert max(w for c, row in enumerate(results["capped"]["rounds"][-1]["diagnostics"]["expert_attention"])
               if row is not None for w in row[1:]) <= 0.1 + 1e-6
    assert results["capped"]["rounds"][-1]["poison_attention"] < results["open"]["rounds"][-1]["poison_attention"]


@pytest.mark.slow
def test_defaults_give_main_s_results_bitwise(tmp_path):
    """The commit this work started from (main at 1113ddc), in a temporary worktree, and this checkout run the same
    attacked pFedMoAP config (sign-flip attackers, expert attention recorded): the same per-round numbers, per-client
    accuracies and expert attention; only the new ``expert_ids`` and ``poison_*`` entries are added."""
    old = "1113ddc"
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{old}^{{commit}}"]).returncode != 0:
        pytest.skip(f"this checkout has no git history with {old}")
    tree = tmp_path / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), old], check=True,
                   capture_output=True)
    args = [*FAST, f"backbone.cache_dir={cache_dir()}", "algorithm=pfedmoap", "fed.rounds=2", "eval.diagnostics=true",
            "attack.kind=sign_flip", "attack.fraction=0.25", "run.name=same"]
    found = {}
    try:
        for name, where in (("old", tree), ("new", ROOT)):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(where)}
            done = subprocess.run([sys.executable, str(where / "experiments" / "train.py"), *args,
                                   f"run.out_dir={tmp_path / name}"], cwd=where, env=env, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            [run] = (tmp_path / name / "same").iterdir()
            found[name] = json.loads((run / "results.json").read_text())["rounds"]
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    for row in found["new"]:
        row.get("diagnostics", {}).pop("expert_ids", None)
        for key in ("poison_selected", "poison_reach", "poison_attention"):
            row.pop(key, None)
    assert found["new"] == found["old"]
    assert any(row.get("diagnostics") for row in found["old"])
