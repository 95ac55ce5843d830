"""pFedMoAP with a linear-projection gate: the gate's mixture against hand computations, the client module, and an
end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedlit.config import GateConfig
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.experiment import run_experiment
from fedlit.modules.pfedmoap_linear import LinearGate, PFedMoAPLinearClient, linear_gate_weights
from tests.helpers import fast_config, only_run_dir, read_results

pytestmark = pytest.mark.usefixtures("single_thread")

# D = 4 down-sampled to d_gate = 2 keeps coordinates 0 and 2.
IMAGES = torch.tensor([[1.0, 9.0, 2.0, 9.0],
                       [0.5, 9.0, -1.0, 9.0]], dtype=torch.float64)  # (B=2, D=4)
EXPERTS = torch.tensor([[[1.0, 7.0, 0.0, 7.0], [0.0, 7.0, 1.0, 7.0]],  # expert 0 (local): classes 0, 1
                        [[2.0, 7.0, 2.0, 7.0], [-1.0, 7.0, 3.0, 7.0]]], dtype=torch.float64)  # expert 1


def gate_with(weight: list[list[float]], bias: list[float], top_k: int | None = None) -> LinearGate:
    gate = LinearGate(feature_dim=4, num_experts=len(bias), d_gate=2, top_k=top_k).double()
    with torch.no_grad():
        gate.proj.weight.copy_(torch.tensor(weight, dtype=torch.float64))
        gate.proj.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return gate


def test_zero_gate_mixes_experts_equally_exactly():
    gate = gate_with([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])
    # <P(I_b), P(T_e[c])> by hand: image 0 = (1, 2), image 1 = (0.5, -1); P(T) = (T[0], T[2]).
    dots = torch.tensor([[[1.0, 2.0], [6.0, 5.0]],       # image 0: expert 0 (c0, c1), expert 1 (c0, c1)
                         [[0.5, -1.0], [-1.0, -3.5]]], dtype=torch.float64)
    expected = 3.0 * (0.5 * dots[:, 0] + 0.5 * dots[:, 1])  # s = 3, w = softmax(0, 0) = (1/2, 1/2)
    assert torch.equal(gate.moe_logits(IMAGES, EXPERTS, 3.0), expected)
    assert torch.equal(expected, torch.tensor([[10.5, 10.5], [-0.75, -6.75]], dtype=torch.float64))


def test_linear_gate_weights_are_the_softmax_of_the_projected_image():
    weight, bias = [[1.0, -2.0], [0.5, 0.25]], [0.1, -0.3]
    gate = gate_with(weight, bias)
    logits = gate.moe_logits(IMAGES, EXPERTS, 2.0)
    for b, (q0, q2) in enumerate([(1.0, 2.0), (0.5, -1.0)]):
        scores = [w[0] * q0 + w[1] * q2 + c for w, c in zip(weight, bias)]
        z = sum(math.exp(s) for s in scores)
        w = [math.exp(s) / z for s in scores]
        for c in range(2):
            dots = [q0 * EXPERTS[e, c, 0].item() + q2 * EXPERTS[e, c, 2].item() for e in range(2)]
            hand = 2.0 * (w[0] * dots[0] + w[1] * dots[1])
            assert logits[b, c].item() == pytest.approx(hand, rel=1e-14, abs=1e-14)


def test_outputs_beyond_the_loaded_experts_are_ignored():
    narrow = gate_with([[1.0, -2.0], [0.5, 0.25]], [0.1, -0.3])
    wide = gate_with([[1.0, -2.0], [0.5, 0.25], [50.0, 50.0], [-9.0, 3.0]], [0.1, -0.3, 80.0, 80.0])
    assert torch.equal(wide.moe_logits(IMAGES, EXPERTS, 2.0), narrow.moe_logits(IMAGES, EXPERTS, 2.0))
    with pytest.raises(ValueError, match="3 experts loaded but the linear gate has 2 outputs"):
        narrow.moe_logits(IMAGES, torch.cat([EXPERTS, EXPERTS[:1]]), 2.0)


def test_top_1_keeps_the_best_expert_with_its_unrenormalised_weight():
    query = torch.tensor([[[1.0, 0.0]]])  # (G=1, B=1, d_g=2)
    weight = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]]])  # scores (1, 0, -1)
    full = linear_gate_weights(query, weight, torch.zeros(1, 3), 3)
    top1 = linear_gate_weights(query, weight, torch.zeros(1, 3), 3, top_k=1)
    z = math.e + 1.0 + 1.0 / math.e
    assert full[0, 0].tolist() == pytest.approx([math.e / z, 1.0 / z, 1.0 / (math.e * z)], rel=1e-6)
    assert top1[0, 0, 1:].tolist() == [0.0, 0.0] and top1[0, 0, 0] == full[0, 0, 0]


def test_a_group_of_gates_equals_each_gate_alone():
    gates = [gate_with([[1.0, -2.0], [0.5, 0.25]], [0.1, -0.3]), gate_with([[0.0, 3.0], [-1.0, 1.0]], [0.0, 2.0])]
    stacked = {name: torch.stack([dict(g.named_parameters())[name] for g in gates]) for name in ("proj.weight",
                                                                                                  "proj.bias")}
    images = torch.stack([IMAGES, IMAGES.flip(0)])
    experts = torch.stack([EXPERTS, EXPERTS.flip(1)])
    group = gates[0].group_moe_logits(images, experts, 2.0, stacked)
    for g, gate in enumerate(gates):
        torch.testing.assert_close(group[g], gate.moe_logits(images[g], experts[g], 2.0), rtol=0, atol=1e-13)


def test_client_logits_are_lam_local_plus_the_linear_mixture(tiny_backbone, classnames):
    torch.manual_seed(0)
    module = PFedMoAPLinearClient(tiny_backbone, classnames, gate=GateConfig(d_gate=16), lam=0.25, num_experts=4,
                                  seed=0)
    names = {n: tuple(p.shape) for n, p in module.trainable_parameters().items() if n.startswith("gate.")}
    assert names == {"gate.proj.weight": (4, 16), "gate.proj.bias": (4,)}
    feats = F.normalize(torch.randn(5, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        text = module.class_text_features()
        s = tiny_backbone.logit_scale
        local = s * feats @ text.t()
        assert torch.equal(module(feats), local)  # no experts loaded yet: local logits alone
        module.load_experts(torch.randn(2, *module.prompt_learner.ctx_shape,
                                        generator=torch.Generator().manual_seed(2)) * 0.02)
        experts = torch.cat([text.unsqueeze(0), module.expert_features])  # (E=3, C, D)
        w = torch.softmax(feats[:, ::4] @ module.gate.proj.weight[:3].t() + module.gate.proj.bias[:3], dim=-1)
        hand = torch.einsum("be,bd,ecd->bc", w, feats[:, ::4], experts[..., ::4])
        torch.testing.assert_close(module(feats), 0.25 * local + s * hand, rtol=1e-6, atol=1e-5)
    groups = module.param_groups()
    assert groups[1]["params"] == list(module.gate.parameters()) and groups[1]["schedule"] == "constant"


def test_pfedmoap_linear_runs_end_to_end_with_private_gates(tmp_path):
    [res] = run_experiment(fast_config(tmp_path, "algorithm=pfedmoap_linear", "fed.rounds=2"))
    assert res["algorithm"] == "pfedmoap_linear"
    assert read_results(only_run_dir(tmp_path))["final"] == res["final"]
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    assert len(res["rounds"][-1]["accuracy"]) == 4 and all(0.0 <= a <= 1.0 for a in res["rounds"][-1]["accuracy"])
    ckpt = load_checkpoint(only_run_dir(tmp_path) / "checkpoint.pt")
    assert set(ckpt["server"]["global_state"]) == {"ctx"}  # the gates are never aggregated
    store = ckpt["store"]
    gates = [store[c]["state"]["gate.proj.weight"] for c in sorted(store)]
    assert all(g.shape == (3, 16) for g in gates)  # method.num_experts = 3 outputs over d_gate = 16
    assert not torch.equal(gates[0], gates[1])  # each client trained its own gate
    for entry in store.values():  # round 2 downloaded K = num_experts - 1 = 2 experts, nearest first
        assert entry["extras"]["experts"].shape[0] == 2 and entry["last_round"] == 2


def test_clients_trained_in_a_group_match_clients_trained_alone(tmp_path):
    def final_state(folder: str, client_batch: int) -> dict:
        cfg = fast_config(tmp_path / folder, "algorithm=pfedmoap_linear", "fed.rounds=2",
                          f"perf.client_batch={client_batch}")
        run_experiment(cfg)
        return load_checkpoint(only_run_dir(tmp_path / folder) / "checkpoint.pt")

    alone, grouped = final_state("alone", 1), final_state("grouped", 4)
    torch.testing.assert_close(grouped["server"]["global_state"]["ctx"], alone["server"]["global_state"]["ctx"],
                               rtol=0, atol=1e-5)
    for cid, entry in alone["store"].items():
        for name in ("gate.proj.weight", "gate.proj.bias"):
            torch.testing.assert_close(grouped["store"][cid]["state"][name], entry["state"][name], rtol=0, atol=1e-5)


def test_lightning_checkpoint_restores_the_linear_gate(tmp_path, tiny_backbone, classnames):
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    client = PFedMoAPLinearClient(tiny_backbone, classnames, gate=GateConfig(d_gate=16), num_experts=4, seed=0)
    client.load_experts(torch.randn(2, *client.prompt_learner.ctx_shape, generator=torch.Generator().manual_seed(3)))
    feats = F.normalize(torch.randn(12, 64, generator=torch.Generator().manual_seed(4)), dim=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(client, DataLoader(TensorDataset(feats, torch.arange(12) % 3), batch_size=4))
        trainer.save_checkpoint(tmp_path / "client.ckpt")
        restored = PFedMoAPLinearClient.load_from_checkpoint(tmp_path / "client.ckpt", backbone=tiny_backbone,
                                                             weights_only=True)
    client.eval(), restored.eval()
    assert isinstance(restored.gate, LinearGate) and restored.gate.num_experts == 4
    assert restored.num_loaded_experts == 2
    with torch.no_grad():
        assert torch.equal(client(feats), restored(feats))
