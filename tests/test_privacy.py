"""Client-level differential privacy: clipping, seeded Gaussian noise, dp-accounting's epsilon, and runs with DP on
that stay bitwise identical across process counts and resumption."""

from __future__ import annotations

import csv
import sys

import dp_accounting
import numpy as np
import pytest
import torch

from fedlit import privacy
from fedlit.algorithms.base import combine_prompts, received_states
from fedlit.config import ConfigError
from fedlit.errors import UserError
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.experiment import build_job, run_experiment
from tests.helpers import FAST, cache_dir, fast_config, only_run_dir, read_results, train_cli

SHAPE = (4, 512)  # an offline-sized context: 2,048 coordinates


def updates(n: int, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """``n`` client contexts around 0 with L2 norms from about 0.02 to 2."""
    g = torch.Generator().manual_seed(seed)
    return {c: {"ctx": torch.randn(SHAPE, generator=g) * (0.0005 * 2 ** (c % 8))} for c in range(n)}


def test_every_clipped_update_is_within_the_bound_and_small_ones_are_untouched():
    rows = np.stack([v["ctx"].double().reshape(-1).numpy() for v in updates(16).values()])
    clipped = privacy.clip_rows(rows, 0.1)
    norms = np.linalg.norm(rows, axis=1)
    assert norms.min() < 0.1 < norms.max()
    assert np.all(np.linalg.norm(clipped, axis=1) <= 0.1 * (1 + 1e-12))
    np.testing.assert_array_equal(clipped[norms <= 0.1], rows[norms <= 0.1])
    np.testing.assert_allclose(clipped[norms > 0.1] / rows[norms > 0.1],
                               np.broadcast_to((0.1 / norms[norms > 0.1])[:, None], clipped[norms > 0.1].shape))


def test_local_dp_clips_every_upload_the_server_receives(tmp_path):
    cfg = fast_config(tmp_path, "privacy.clip=0.1", "privacy.local=true")  # z = 0: clipping only
    current = {"ctx": torch.zeros(SHAPE)}
    received = received_states(cfg, current, updates(16), 1)
    norms = [float(torch.linalg.vector_norm(r["ctx"].double())) for r in received.values()]
    assert max(norms) <= 0.1 + 1e-6 and min(norms) < 0.05


@pytest.mark.parametrize("local", [False, True])
def test_the_noise_std_is_z_times_clip(tmp_path, local):
    z, clip, n = 1.3, 0.2, 5
    cfg = fast_config(tmp_path, f"privacy.clip={clip}", f"privacy.noise_multiplier={z}", f"privacy.local={local}")
    current = {"ctx": torch.zeros(SHAPE, dtype=torch.float64)}
    zero = {c: {"ctx": torch.zeros(SHAPE, dtype=torch.float64)} for c in range(n)}
    draws = []
    for r in range(1, 21):  # 20 rounds x 2,048 coordinates
        if local:
            draws += [s["ctx"] for s in received_states(cfg, current, zero, r).values()]
        else:
            draws.append(combine_prompts(cfg, current, zero, {c: 1 for c in zero}, r)["ctx"] * n)  # the noised sum
    std = float(torch.stack(draws).std())
    assert std == pytest.approx(z * clip, rel=0.05)
    again = combine_prompts(cfg, current, zero, {c: 1 for c in zero}, 3)["ctx"]
    assert torch.equal(again, combine_prompts(cfg, current, zero, {c: 1 for c in zero}, 3)["ctx"])  # seeded


def test_central_dp_adds_the_noised_mean_of_the_clipped_updates(tmp_path):
    cfg = fast_config(tmp_path, "privacy.clip=0.1", "privacy.noise_multiplier=0.5", "seed=7")
    current = {"ctx": torch.full(SHAPE, 0.25)}
    states = {c: {"ctx": current["ctx"] + u["ctx"]} for c, u in updates(6).items()}
    new = combine_prompts(cfg, current, states, {c: 10 * (c + 1) for c in states}, 4)["ctx"]
    deltas = np.stack([(s["ctx"].double() - current["ctx"].double()).reshape(-1).numpy() for s in states.values()])
    noise = np.random.default_rng([7, 4, privacy.CENTRAL_NOISE_STREAM]).normal(0, 0.05, deltas.shape[1])
    expected = 0.25 + (privacy.clip_rows(deltas, 0.1).sum(0) + noise) / 6  # unweighted: the sizes do not count
    np.testing.assert_allclose(new.double().reshape(-1).numpy(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("frac, rounds, z", [(1.0, 5, 1.1), (0.5, 10, 0.8), (0.25, 3, 2.0)])
def test_epsilon_is_dp_accountings_rdp_of_a_sampled_gaussian_per_round(tmp_path, frac, rounds, z):
    cfg = fast_config(tmp_path, "data.num_clients=8", f"fed.frac={frac}", "privacy.clip=1",
                      f"privacy.noise_multiplier={z}", "privacy.delta=1e-6")
    accountant = dp_accounting.rdp.RdpAccountant()
    # m = floor(frac * 8) of 8 clients per round: sampling probability frac
    accountant.compose(dp_accounting.PoissonSampledDpEvent(frac, dp_accounting.GaussianDpEvent(z)), rounds)
    assert privacy.privacy_report(cfg, rounds) == {"epsilon": accountant.get_epsilon(1e-6), "noise_multiplier": z}
    assert privacy.privacy_report(cfg, 0)["epsilon"] == 0.0


def test_target_epsilon_picks_the_noise_that_spends_it_over_the_planned_rounds(tmp_path):
    for target in (1.0, 8.0, 50.0):
        cfg = fast_config(tmp_path, "fed.rounds=5", "privacy.clip=0.1", f"privacy.target_epsilon={target}")
        report = privacy.privacy_report(cfg, 5)
        assert report["epsilon"] == pytest.approx(target, rel=1e-3) and report["epsilon"] <= target * (1 + 1e-6)
    # 5 rounds, every client every round: z of about 9 for epsilon 1 and 0.35 for epsilon 50 (delta 1e-5)
    assert privacy.noise_multiplier(fast_config(tmp_path, "fed.rounds=5", "privacy.clip=0.1",
                                                "privacy.target_epsilon=1")) == pytest.approx(9.05, abs=0.05)


def test_local_dp_epsilon_composes_a_gaussian_of_half_the_noise_every_round(tmp_path):
    cfg = fast_config(tmp_path, "fed.frac=0.5", "privacy.clip=1", "privacy.noise_multiplier=4", "privacy.local=true")
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(2.0), 3)
    assert privacy.privacy_report(cfg, 3)["epsilon"] == accountant.get_epsilon(1e-5)


def test_privacy_keys_are_checked_together(tmp_path):
    for overrides, words in [(["privacy.noise_multiplier=1"], "need privacy.clip"),
                             (["privacy.local=true"], "need privacy.clip"),
                             (["privacy.clip=0.1", "robust.aggregator=median"], "central DP"),
                             (["privacy.clip=0", "privacy.noise_multiplier=1"], "privacy.clip must be > 0"),
                             (["privacy.delta=1"], "privacy.delta must be in (0.0, 1.0)")]:
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            fast_config(tmp_path, *overrides)
    assert fast_config(tmp_path, "privacy.clip=0.1", "privacy.local=true", "robust.aggregator=median")


def test_a_missing_dp_accounting_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(UserError, match=r"pip install 'fedlit\[privacy\]'"):
        privacy.epsilon(3, 1.0, 1.0, 1e-5)


def test_metrics_report_epsilon_after_every_round_and_resume_is_exact(tmp_path):
    common = ["algorithm=pfedmoap", "privacy.clip=0.05", "privacy.noise_multiplier=0.7", "fed.frac=0.5",
              "run.name=dp"]
    straight = run_experiment(fast_config(tmp_path / "straight", *common, "fed.rounds=3"))[0]
    run_experiment(fast_config(tmp_path / "ext", *common, "fed.rounds=2"))
    extended = run_experiment(fast_config(tmp_path / "ext", *common, "fed.rounds=3", "run.resume=auto"))[0]
    assert extended["rounds"] == straight["rounds"] and extended["final"] == straight["final"]
    run_dir = only_run_dir(tmp_path / "straight", "dp")
    a = load_checkpoint(run_dir / "checkpoint.pt")["server"]["global_state"]["ctx"]
    b = load_checkpoint(only_run_dir(tmp_path / "ext", "dp") / "checkpoint.pt")["server"]["global_state"]["ctx"]
    assert torch.equal(a, b)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    expected = [privacy.epsilon(r, 0.5, 0.7, 1e-5) for r in (1, 2, 3)]
    assert [float(row["epsilon"]) for row in rows] == pytest.approx(expected, rel=1e-12)
    assert [r["epsilon"] for r in straight["rounds"]] == expected and expected[0] < expected[1] < expected[2]
    # the noise changes the global prompt: a run without it ends elsewhere
    plain = build_job(fast_config(tmp_path / "plain", "algorithm=pfedmoap", "fed.frac=0.5", "fed.rounds=3"))
    plain.orchestrator(tmp_path / "plain" / "run").run()
    plain_ctx = load_checkpoint(tmp_path / "plain" / "run" / "checkpoint.pt")["server"]["global_state"]["ctx"]
    assert not torch.equal(a, plain_ctx)


@pytest.mark.multiprocess
def test_one_and_two_processes_identical_with_dp_attackers_and_dropout(tmp_path):
    job = FAST + [f"backbone.cache_dir={cache_dir()}", "algorithm=pfedmoap", "data.num_clients=5", "fed.frac=0.8",
                  "fed.rounds=3", "privacy.clip=0.05", "privacy.target_epsilon=20", "attack.kind=sign_flip",
                  "attack.fraction=0.2", "fed.dropout=0.2"]
    for devices in (1, 2):
        done = train_cli(*job, f"trainer.devices={devices}", f"run.out_dir={tmp_path / str(devices)}",
                         "trainer.accelerator=cpu")
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (only_run_dir(tmp_path / d) for d in ("1", "2"))
    res1, res2 = read_results(one), read_results(two)
    assert (res1["world_size"], res2["world_size"]) == (1, 2)
    assert res1["rounds"] == res2["rounds"] and res1["attacked_clients"] == res2["attacked_clients"] == [1]
    assert res1["rounds"][-1]["epsilon"] == pytest.approx(20, rel=1e-3)
    ck1, ck2 = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(two / "checkpoint.pt")
    assert torch.equal(ck1["server"]["global_state"]["ctx"], ck2["server"]["global_state"]["ctx"])
    for cid, entry in ck1["server"]["client_records"].items():
        assert torch.equal(entry["ctx"], ck2["server"]["client_records"][cid]["ctx"])
