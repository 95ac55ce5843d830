"""pFedMoAP's expert attention: the gate's per-(image, class, head) weights, and their per-client average per
evaluated round in results.json (eval.diagnostics=true)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedlit.config import GateConfig, PromptConfig
from fedlit.federation.experiment import run_experiment
from fedlit.gating import AttentionGate, downsample
from fedlit.modules import PFedMoAPClient
from tests.helpers import fast_config


@pytest.mark.parametrize("top_k", [None, 2])
def test_expert_weights_are_the_softmax_of_the_scaled_head_scores(top_k):
    torch.manual_seed(0)
    gate = AttentionGate(64, d_gate=16, num_heads=2, top_k=top_k)
    image = F.normalize(torch.randn(3, 64), dim=-1)
    experts = F.normalize(torch.randn(4, 5, 64), dim=-1)
    weights = gate.expert_weights(image, experts)
    assert weights.shape == (3, 5, 2, 4)
    q = gate.q_proj(downsample(image, 16)).view(3, 2, 8)  # (B, H, d_h)
    k = gate.k_proj(downsample(experts, 16)).view(4, 5, 2, 8)  # (E, C, H, d_h)
    expected = torch.softmax(10.0 * torch.einsum("bhd,echd->bche", q, k), dim=-1)
    if top_k is not None:
        keep = expected.topk(top_k, dim=-1).indices
        expected = torch.zeros_like(expected).scatter(-1, keep, expected.gather(-1, keep))
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)
    # the fused forward mixes the values with exactly these weights
    v = gate.v_proj(downsample(experts, 16)).view(4, 5, 2, 8)
    mixed = torch.einsum("bche,echd->cbhd", expected, v).reshape(5, 3, 16)
    torch.testing.assert_close(gate(image, experts), gate.out_proj(mixed), rtol=0, atol=1e-5)


def test_module_diagnostics_average_over_classes_and_heads(tiny_backbone, classnames):
    torch.manual_seed(0)
    client = PFedMoAPClient(tiny_backbone, classnames, gate=GateConfig(d_gate=16), prompt=PromptConfig(n_ctx=4))
    x = F.normalize(torch.randn(6, 64), dim=-1)
    assert client.diagnostics(x) == {}  # no experts loaded: nothing to report
    client.load_experts(torch.randn(2, 4, 64) * 0.02)
    full = client.expert_attention(x)
    assert full.shape == (6, 3, 8, 3)
    torch.testing.assert_close(full.sum(-1), torch.ones(6, 3, 8))
    torch.testing.assert_close(client.diagnostics(x)["expert_attention"], full.mean(dim=(1, 2)))


def test_a_run_records_each_clients_mean_expert_attention_per_round(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=pfedmoap", "fed.rounds=2", "eval.diagnostics=true")
    [res] = run_experiment(cfg)
    first, second = (r["diagnostics"] for r in res["rounds"])
    assert first == {}  # round 1 trained plain CoOp: no client held experts, nothing to record
    assert len(second["expert_attention"]) == 4
    for weights in second["expert_attention"]:  # K = 2 experts after the local one, each client's weights sum to 1
        assert len(weights) == 3 and sum(weights) == pytest.approx(1.0, abs=1e-5)
    [plain] = run_experiment(fast_config(tmp_path / "off", "algorithm=pfedmoap", "fed.rounds=1"))
    assert "diagnostics" not in plain["rounds"][0]


@pytest.mark.multiprocess
def test_two_processes_record_the_same_expert_attention(tmp_path):
    from tests.helpers import FAST, cache_dir, only_run_dir, read_results, train_cli

    job = [*FAST, f"backbone.cache_dir={cache_dir()}", "algorithm=pfedmoap", "fed.rounds=2", "eval.diagnostics=true"]
    for devices in (1, 2):
        done = train_cli(*job, f"trainer.devices={devices}", f"run.out_dir={tmp_path / str(devices)}")
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (read_results(only_run_dir(tmp_path / d)) for d in ("1", "2"))
    assert [r["diagnostics"] for r in one["rounds"]] == [r["diagnostics"] for r in two["rounds"]]
    assert all(w is not None for w in two["rounds"][-1]["diagnostics"]["expert_attention"])
