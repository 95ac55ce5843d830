"""Robust aggregation (byzfl on the flattened prompt updates), Byzantine clients and client dropout."""

from __future__ import annotations

import dataclasses
import sys

import byzfl
import numpy as np
import pytest
import torch

from fedlit.algorithms.base import combine_prompts
from fedlit.config import AGGREGATORS, AttackConfig, RobustConfig, load_config
from fedlit.errors import UserError
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.experiment import build_job
from fedlit.federation.sampling import attacked_clients, sample_clients, surviving_clients
from fedlit.robust import aggregate, alie_z, attack_updates, pre_aggregate
from fedlit.state import ClientPlan
from tests.helpers import cache_dir, fast_config, read_results

# six honest updates near (1, 2, 3) and one outlier far away
HONEST = np.array([[1.0, 2.0, 3.0], [1.1, 2.1, 2.9], [0.9, 1.8, 3.2], [1.2, 2.2, 3.1], [0.8, 1.9, 2.8],
                   [1.0, 2.05, 3.05]])
VECTORS = np.vstack([HONEST, [[100.0, -100.0, 50.0]]])


def byzfl_reference(name: str, f: int) -> np.ndarray:
    """The value byzfl itself gives for ``name`` on VECTORS (MoNNA: NNM then Average)."""
    direct = {
        "mean": byzfl.Average(), "median": byzfl.Median(), "trimmed_mean": byzfl.TrMean(f=f), "krum": byzfl.Krum(f=f),
        "multikrum": byzfl.MultiKrum(f=f), "geometric_median": byzfl.GeometricMedian(nu=1e-6, T=10),
        "centered_clipping": byzfl.CenteredClipping(L=3, tau=0.1),
    }
    if name == "monna":
        return byzfl.Average()(byzfl.NNM(f=f)(VECTORS))
    return direct[name](VECTORS)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_each_aggregator_gives_byzfls_value_on_vectors_with_an_outlier(name):
    out = aggregate(VECTORS.copy(), RobustConfig(aggregator=name, f=1))
    np.testing.assert_allclose(out, byzfl_reference(name, 1), rtol=0, atol=1e-12)
    miss = np.linalg.norm(out - HONEST.mean(axis=0))
    if name == "monna":  # NNM mixes the outlier with its n - f = 6 nearest vectors: 1/6 of its pull on the mean
        assert miss == pytest.approx(np.linalg.norm(VECTORS.mean(axis=0) - HONEST.mean(axis=0)) / 6, rel=0.05)
    elif name not in ("mean", "centered_clipping"):  # the other robust rules stay near the honest updates
        assert miss < 0.5, out


def test_known_values_of_median_trimmed_mean_and_krum():
    np.testing.assert_allclose(aggregate(VECTORS, RobustConfig(aggregator="median")), [1.0, 2.0, 3.05])
    trimmed = np.sort(VECTORS, axis=0)[1:-1].mean(axis=0)
    np.testing.assert_allclose(aggregate(VECTORS, RobustConfig(aggregator="trimmed_mean", f=1)), trimmed)
    krum = aggregate(VECTORS, RobustConfig(aggregator="krum", f=1))
    assert any(np.array_equal(krum, row) for row in HONEST)  # Krum returns one of the honest updates
    # f is clamped to 2f < n: f = 10 on 7 vectors acts as f = 3 (byzfl would refuse it)
    np.testing.assert_allclose(aggregate(VECTORS, RobustConfig(aggregator="trimmed_mean", f=10)),
                               byzfl.TrMean(f=3)(VECTORS))


def test_pre_aggregators_are_byzfls_and_bucketing_is_seeded_without_touching_numpys_global_state():
    np.testing.assert_allclose(pre_aggregate(VECTORS, RobustConfig(pre="nnm", f=1), 0, 1), byzfl.NNM(f=1)(VECTORS))
    clipped = pre_aggregate(VECTORS, RobustConfig(pre="clipping", pre_clip=0.5), 0, 1)
    assert np.linalg.norm(clipped, axis=1).max() == pytest.approx(0.5)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    cfg = RobustConfig(pre="bucketing", bucket_size=2)
    a, b = pre_aggregate(VECTORS, cfg, 0, 1), pre_aggregate(VECTORS, cfg, 0, 1)
    assert a.shape == (4, 3) and np.array_equal(a, b)  # ceil(7 / 2) buckets, the same permutation twice
    assert not np.array_equal(a, pre_aggregate(VECTORS, cfg, 0, 2))  # another round, another permutation
    assert np.array_equal(np.random.get_state()[1], before)


def test_the_server_rule_adds_the_robust_aggregate_of_the_updates_to_the_global_prompt(tmp_path):
    cfg = fast_config(tmp_path, "robust.aggregator=median")
    current = {"ctx": torch.zeros(1, 3)}
    states = {c: {"ctx": torch.from_numpy(row).float().reshape(1, 3) + 0.5} for c, row in enumerate(VECTORS)}
    new = combine_prompts(cfg, {"ctx": current["ctx"] + 0.5}, states, {c: 1 for c in states}, 1)["ctx"]
    torch.testing.assert_close(new, torch.tensor([[1.5, 2.5, 3.55]]))


def test_attacks_replace_only_the_attacked_rows():
    ids, attacked = [0, 3, 5, 7, 9, 11, 12], {5, 12}
    flip = attack_updates(VECTORS, ids, attacked, AttackConfig(kind="sign_flip", scale=10.0), 0, 1)
    np.testing.assert_array_equal(flip[2], -10 * VECTORS[2])
    np.testing.assert_array_equal(np.delete(flip, [2, 6], axis=0), np.delete(VECTORS, [2, 6], axis=0))
    assert not attack_updates(VECTORS, ids, attacked, AttackConfig(kind="zero"), 0, 1)[[2, 6]].any()
    gauss = [attack_updates(VECTORS, ids, attacked, AttackConfig(kind="gaussian", sigma=2.0), 0, r) for r in (1, 1, 2)]
    assert np.array_equal(gauss[0], gauss[1]) and not np.array_equal(gauss[0], gauss[2])  # seeded by round
    assert not np.array_equal(gauss[0][2], gauss[0][6])  # and by client
    alie = attack_updates(VECTORS, ids, attacked, AttackConfig(kind="alie", alie_z=1.5), 0, 1)
    honest = np.delete(VECTORS, [2, 6], axis=0)
    np.testing.assert_allclose(alie[2], byzfl.ALittleIsEnough(tau=1.5)(honest))
    np.testing.assert_allclose(alie[2], honest.mean(0) + 1.5 * honest.std(0, ddof=1))
    np.testing.assert_array_equal(alie[2], alie[6])
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-4)  # Baruch et al.: s = 14, z = Φ⁻¹(36/50)
    assert alie_z(10, 2) == pytest.approx(0.2533, abs=1e-4)


def test_attacked_clients_are_chosen_once_from_the_seed():
    assert attacked_clients(0, 10, 0.2) == attacked_clients(0, 10, 0.2)
    assert [len(attacked_clients(0, 10, x)) for x in (0.0, 0.1, 0.2, 0.25, 0.5)] == [0, 1, 2, 2, 5]
    assert len({tuple(attacked_clients(seed, 10, 0.2)) for seed in range(10)}) > 1  # the seed picks them


def test_a_missing_byzfl_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "byzfl", None)
    with pytest.raises(UserError, match=r"pip install 'fedlit\[robust\]'"):
        aggregate(VECTORS, RobustConfig(aggregator="median"))


def test_label_flip_trains_the_attackers_on_flipped_labels(tmp_path):
    job = build_job(fast_config(tmp_path, "algorithm=promptfl", "attack.kind=label_flip", "attack.fraction=0.25"))
    orchestrator = job.orchestrator(tmp_path / "run")
    [attacker] = orchestrator.attacked
    trainer, plan = orchestrator.trainer, ClientPlan(start=orchestrator.initial)
    flipped = trainer._prepare(attacker, plan, 1).batches
    trainer.flipped_clients = frozenset()
    plain = trainer._prepare(attacker, plan, 1).batches
    classes = orchestrator.module.num_classes
    assert all(torch.equal(f[1], classes - 1 - p[1]) for f, p in zip(flipped, plain))
    assert all(torch.equal(f[0], p[0]) for f, p in zip(flipped, plain))


def test_metrics_leave_the_attackers_out_and_results_name_them(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=pfedmoap", "attack.kind=sign_flip", "attack.fraction=0.25",
                      "robust.aggregator=median", "fed.rounds=2")
    res = build_job(cfg).orchestrator(tmp_path / "run").run()
    assert res["attacked_clients"] == attacked_clients(0, 4, 0.25) == [1]
    last = res["rounds"][-1]
    assert last["accuracy"][1] is None and all(a is not None for i, a in enumerate(last["accuracy"]) if i != 1)
    assert last["acc_mean"] == pytest.approx(np.mean([a for a in last["accuracy"] if a is not None]))
    assert last["clients_without_test"] == 0


def test_dropout_aggregates_the_survivors_only_and_is_seeded(tmp_path):
    assert surviving_clients(0, 3, list(range(10)), 0.5) == surviving_clients(0, 3, list(range(10)), 0.5)
    survivors = [len(surviving_clients(0, r, list(range(100)), 0.3)) for r in range(1, 6)]
    assert all(55 <= s <= 85 for s in survivors) and len(set(survivors)) > 1
    assert surviving_clients(0, 1, [0, 1, 2], 0.0) == [0, 1, 2]
    cfg = fast_config(tmp_path, "algorithm=promptfl", "fed.dropout=0.5", "fed.rounds=3", "seed=2")
    res = build_job(cfg).orchestrator(tmp_path / "run").run()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    survivors = [surviving_clients(2, r, sample_clients(2, r, 4, 1.0), 0.5) for r in (1, 2, 3)]
    assert survivors == [[1, 2, 3], [0], [0, 2, 3]]
    assert [row["clients"] for row in res["rounds"]] == [3, 1, 3]
    last = sorted(c for c, e in ckpt["store"].items() if e["last_round"] == 3)
    assert last == [0, 2, 3] and ckpt["store"][1]["last_round"] == 1
    job = build_job(cfg)
    sizes = [job.data.train_size(c) for c in last]
    expected = sum(ckpt["store"][c]["state"]["prompt_learner.ctx"].double() * n for c, n in zip(last, sizes))
    torch.testing.assert_close(ckpt["server"]["global_state"]["ctx"], (expected / sum(sizes)).float(), rtol=0,
                               atol=1e-7)


def test_a_round_where_every_client_drops_only_advances_the_round(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=pfedmoap", "fed.dropout=0.999", "fed.rounds=2")
    job = build_job(cfg)
    orchestrator = job.orchestrator(tmp_path / "run")
    res = orchestrator.run()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert [(r["clients"], r["loss"]) for r in res["rounds"]] == [(0, None), (0, None)]
    assert ckpt["server"]["round"] == 2 and ckpt["store"] == {}
    assert torch.equal(ckpt["server"]["global_state"]["ctx"], orchestrator.initial.params["prompt_learner.ctx"])


@pytest.mark.slow
def test_sign_flip_attackers_ruin_mean_and_median_and_monna_recover_most_of_it(tmp_path):
    """Offline shapes CLIP (built on first use), 10 clients (2 attackers), 3 rounds of 3 local epochs."""
    common = [f"backbone.cache_dir={cache_dir()}", "run.quiet=true", f"run.out_dir={tmp_path}", "algorithm=promptfl",
              "data.num_clients=10", "data.shots=8", "fed.local_epochs=3", "fed.rounds=3"]
    attack = ["attack.kind=sign_flip", "attack.fraction=0.2", "attack.scale=10"]
    job = build_job(load_config("configs/default.yaml", common))
    final = {}
    for name, extra in {"clean": [], "mean": attack, "median": attack + ["robust.aggregator=median"],
                        "monna": attack + ["robust.aggregator=monna", "robust.f=2"]}.items():
        cfg = load_config("configs/default.yaml", common + extra)
        final[name] = dataclasses.replace(job, cfg=cfg).orchestrator(tmp_path / name).run()["final"]["last_round"]
    # measured: clean 41.2%, mean 23.8% (below zero-shot, 35.1%), median 37.7%, monna 38.6%
    assert final["mean"] < final["clean"] - 0.12, final
    for name in ("median", "monna"):
        recovered = (final[name] - final["mean"]) / (final["clean"] - final["mean"])
        assert recovered > 0.7, (name, final)
    assert read_results(tmp_path / "mean")["attacked_clients"] == attacked_clients(0, 10, 0.2)
