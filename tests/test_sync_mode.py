"""The synchronous mode (FedSGD-style lock-step rounds): one gradient gather per step, FedSGD's update, the
combination rule with DP, its epsilon against dp-accounting, and resumption at a round boundary."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch

from fedlit import privacy
from fedlit.algorithms.base import flatten
from fedlit.algorithms.promptfl import PromptFL
from fedlit.federation import orchestrator as orchestrator_module
from fedlit.federation import synchronous
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.experiment import build_job, run_experiment
from fedlit.federation.synchronous import client_steps, steps_bound
from fedlit.state import PROMPT, ServerState, SyncStep
from tests.helpers import fast_config, only_run_dir, read_results


class SyncPromptFL(PromptFL):
    """PromptFL on the synchronous mode: the global prompt is stepped with the mean gradient every step."""

    synchronous = True

    def aggregate(self, server, uploads, sizes):
        new = super(PromptFL, self).aggregate(server, uploads, sizes)
        new.global_state = {"ctx": uploads[min(uploads)].state.params[PROMPT].clone()}
        return new


def _count(monkeypatch, module, name: str) -> list[int]:
    """Wrap ``module.name`` to count its calls (the wrapped function still runs)."""
    calls: list[int] = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_round_gathers_once_per_synchronous_step_and_once_for_the_uploads(tmp_path, monkeypatch):
    cfg = fast_config(tmp_path, "algorithm=dpfpl", "fed.rounds=2", "fed.local_epochs=2", "data.batch_size=16",
                      "data.num_clients=5", "fed.frac=0.6")
    job = build_job(cfg)
    orch = job.orchestrator(tmp_path / "run")
    grads, uploads = _count(monkeypatch, synchronous, "gather_rows"), _count(monkeypatch, orchestrator_module,
                                                                             "gather_uploads")
    orch.run()
    expected = sum(max(client_steps(job.data, orch._sampled(r), 2).values()) for r in (1, 2))
    assert expected >= 8  # several steps per round: the count is not trivially one
    assert len(grads) == expected and len(uploads) == 2
    assert orch.algorithm.steps_bound == steps_bound(job.data, 2) == 2 * max(
        math.ceil(job.data.train_size(c) / 16) for c in range(5))


def test_one_step_rounds_are_fedsgd_the_mean_gradient_of_the_clients_losses(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=1", "data.batch_size=256", "optim.momentum=0",
                      "optim.weight_decay=0", "optim.prompt_lr=0.5")
    job = build_job(cfg)
    built = (SyncPromptFL(cfg), job.build("promptfl")[1])
    orch = job.orchestrator(tmp_path / "run", built=built)
    start = orch.initial.params[PROMPT].clone()
    module, data = orch.module, orch.data
    grads = []
    for cid in range(4):  # each client's gradient of its loss on all its data (one batch) at the start prompt
        module.load_client_state({PROMPT: start})
        index = torch.as_tensor(data.partition.train_indices[cid])
        module.zero_grad()
        module.loss(module(data.train_features[index]), data.train_labels[index]).backward()
        grads.append(module.prompt_learner.ctx.grad.double().clone())
    orch.run()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    expected = start.double() - 0.5 * sum(grads) / 4
    assert torch.allclose(ckpt["server"]["global_state"]["ctx"].double(), expected, atol=1e-6)
    assert not torch.allclose(start.double(), expected, atol=1e-3)  # the step moved the prompt
    for entry in ckpt["store"].values():  # every client holds the one global prompt
        assert torch.equal(entry["state"][PROMPT], ckpt["server"]["global_state"]["ctx"])


def _grads(n: int, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {c: {"ctx": torch.randn(4, 8, generator=g) * 0.3 * (c + 1)} for c in range(n)}


def test_combined_gradient_is_the_mean_or_the_noised_mean_of_the_clipped_gradients(tmp_path):
    grads = _grads(3)
    step = SyncStep(round=2, step=5, clients=(0, 1, 2))
    plain = SyncPromptFL(fast_config(tmp_path))
    mean = plain.combine_gradients(grads, step)["ctx"]
    assert torch.allclose(mean.double(), sum(g["ctx"].double() for g in grads.values()) / 3, atol=1e-7)
    for local in (False, True):
        algorithm = SyncPromptFL(fast_config(tmp_path, "privacy.clip=0.5", "privacy.noise_multiplier=1.5",
                                             f"privacy.local={str(local).lower()}"))
        algorithm.bind_steps(7)
        rows = np.stack([flatten(grads[c]) for c in range(3)])
        clipped = rows * np.minimum(1.0, 0.5 / np.linalg.norm(rows, axis=1, keepdims=True))
        if local:
            noise = sum(privacy.local_noise(32, 0.75, 0, 2, c, step=5) for c in range(3))
        else:
            noise = np.random.default_rng([0, 2, 5, privacy.STEP_NOISE_STREAM]).normal(0.0, 0.75, 32)
        expected = (clipped.sum(axis=0) + noise) / 3
        combined = algorithm.combine_gradients(grads, step)["ctx"]
        np.testing.assert_allclose(combined.double().numpy().reshape(-1), expected, atol=1e-7)
        other = algorithm.combine_gradients(grads, SyncStep(round=2, step=6, clients=(0, 1, 2)))["ctx"]
        assert not torch.allclose(other, combined, atol=1e-3)  # a fresh draw every step


@pytest.mark.parametrize("local", [False, True])
def test_reported_epsilon_is_dp_accountings_composition_of_every_noised_step(tmp_path, local):
    cfg = fast_config(tmp_path, "algorithm=dpfpl", "data.num_clients=4", "fed.frac=0.5", "privacy.clip=1",
                      "privacy.noise_multiplier=2.5", f"privacy.local={str(local).lower()}")
    algorithm = SyncPromptFL(cfg)
    algorithm.bind_steps(6)
    report = algorithm.report(ServerState(global_state={}, round=3))
    accountant = dp_accounting.rdp.RdpAccountant()
    if local:  # the server sees each client's own noised gradients: a Gaussian of z / 2 per step, no sampling
        accountant.compose(dp_accounting.GaussianDpEvent(2.5 / 2), 3 * 6)
    else:  # per round: 6 Gaussian steps on the same Poisson-sampled clients (q = 2 / 4)
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            0.5, dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.5), 6)), 3)
    assert report["noise_multiplier"] == 2.5
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert algorithm.report(ServerState(global_state={}, round=0))["epsilon"] == 0.0


def test_target_epsilon_spreads_over_every_step_of_the_planned_rounds(tmp_path):
    cfg = fast_config(tmp_path, "fed.rounds=4", "privacy.clip=1", "privacy.target_epsilon=3")
    algorithm = SyncPromptFL(cfg)
    algorithm.bind_steps(9)
    z = algorithm.report(ServerState(global_state={}, round=4))["noise_multiplier"]
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z), 4 * 9)  # q = 1: every client in every step
    assert accountant.get_epsilon(1e-5) == pytest.approx(3.0, abs=1e-4)
    assert z == pytest.approx(privacy.noise_multiplier(cfg) * 3.0)


def test_a_dpfpl_run_reports_the_epsilon_of_its_steps_and_resumes_bitwise(tmp_path):
    common = ["algorithm=dpfpl", "fed.rounds=2", "privacy.clip=0.5", "privacy.noise_multiplier=1.2",
              "data.num_clients=5", "fed.frac=0.6"]
    [straight] = run_experiment(fast_config(tmp_path / "a", *common))
    run_experiment(fast_config(tmp_path / "b", *common, "fed.rounds=1"))
    [resumed] = run_experiment(fast_config(tmp_path / "b", *common, "run.resume=auto"))
    assert read_results(only_run_dir(tmp_path / "a")) == read_results(only_run_dir(tmp_path / "b"))
    assert resumed["rounds"] == straight["rounds"]
    job = build_job(fast_config(tmp_path / "a", *common))
    steps = steps_bound(job.data, 1)
    for row in straight["rounds"]:
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(dp_accounting.PoissonSampledDpEvent(
            3 / 5, dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.2), steps)), row["round"])
        assert row["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    a = load_checkpoint(only_run_dir(tmp_path / "a") / "checkpoint.pt")
    b = load_checkpoint(only_run_dir(tmp_path / "b") / "checkpoint.pt")
    assert torch.equal(a["server"]["global_state"]["ctx"], b["server"]["global_state"]["ctx"])
    for cid, entry in a["store"].items():
        for name, value in entry["state"].items():
            assert torch.equal(value, b["store"][cid]["state"][name]), (cid, name)


def test_clients_whose_batches_are_used_up_sit_out_the_remaining_steps(tmp_path, monkeypatch):
    cfg = fast_config(tmp_path, "algorithm=dpfpl", "data.num_clients=5", "data.batch_size=16", "fed.local_epochs=2")
    orch = build_job(cfg).orchestrator(tmp_path / "run")
    steps = client_steps(orch.data, list(range(5)), 2)
    assert steps == {0: 6, 1: 6, 2: 6, 3: 6, 4: 8}  # 48 or 64 samples per client: 3 or 4 batches of 16
    seen: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
    original = orch.algorithm.combine_gradients

    def record(grads, step):
        seen.append((step.step, step.clients, tuple(sorted(grads))))
        return original(grads, step)

    monkeypatch.setattr(orch.algorithm, "combine_gradients", record)
    server = orch.algorithm.init_server(orch.initial)
    plans = {c: orch.algorithm.plan(server, c, None, orch.initial) for c in range(5)}
    uploads = synchronous.train_synchronous(orch.trainer, orch.algorithm, plans, list(range(5)), 1)
    assert [s for s, _, _ in seen] == list(range(8))
    assert all(clients == grads == ((0, 1, 2, 3, 4) if t < 6 else (4,)) for t, clients, grads in seen)
    assert {c: u.steps for c, u in uploads.items()} == steps
    final = uploads[0].state.params[PROMPT]
    assert all(torch.equal(u.state.params[PROMPT], final) for u in uploads.values())  # one global prompt
