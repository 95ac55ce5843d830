"""The Lightning face of the client modules: the README's library example runs as written; checkpoints leave the
backbone out, keep hyper-parameters and expert prompts, and restore identical logits."""

from __future__ import annotations

import re

import lightning as L
import torch
import torch.nn.functional as F

from fedlit.config import GateConfig, PromptConfig
from fedlit.modules import CoOpClient, PFedMoAPClient
from tests.helpers import ROOT


def readme_library_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Library") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_library_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_library_example(), "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (12, 3)
    assert (tmp_path / "client.ckpt").stat().st_size < 100_000  # kilobytes: no backbone inside
    assert namespace["restored"].num_loaded_experts == 2


def test_state_dict_holds_the_client_only_and_loads_strictly(tiny_backbone, classnames):
    torch.manual_seed(0)
    client = PFedMoAPClient(tiny_backbone, classnames, gate=GateConfig(d_gate=16), prompt=PromptConfig(n_ctx=4))
    client.load_experts(torch.randn(3, 4, 64) * 0.02)
    state = client.state_dict()
    assert not any(k.startswith("backbone.") for k in state)
    assert state["expert_ctx"].shape == (3, 4, 64)
    assert set(state) == {"expert_ctx", "prompt_learner.ctx"} | {f"gate.{n}" for n, _ in client.gate.named_parameters()}
    torch.manual_seed(1)  # another gate, another prompt, no experts: all replaced by the load
    other = PFedMoAPClient(tiny_backbone, classnames, gate=GateConfig(d_gate=16), prompt=PromptConfig(n_ctx=4),
                           seed=5)
    other.load_state_dict(state, strict=True)
    x = F.normalize(torch.randn(6, 64), dim=-1)
    client.eval(), other.eval()
    assert other.num_loaded_experts == 3
    assert torch.equal(client(x), other(x))


def test_hyper_parameters_name_the_backbone_and_restore_the_module(tmp_path, tiny_backbone, classnames):
    client = CoOpClient(tiny_backbone, classnames, prompt=PromptConfig(n_ctx=3, class_specific=True), prox_mu=0.2,
                        seed=7)
    assert client.hparams["backbone"] == "tiny"  # its name only: the frozen weights are never saved
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    data = torch.utils.data.TensorDataset(F.normalize(torch.randn(6, 64), dim=-1), torch.tensor([0, 1, 2] * 2))
    trainer.fit(client, torch.utils.data.DataLoader(data, batch_size=3))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    restored = CoOpClient.load_from_checkpoint(tmp_path / "c.ckpt", backbone=tiny_backbone, weights_only=True)
    assert restored.prox_mu == 0.2 and restored.prompt_learner.ctx.shape == (3, 3, 64)
    assert torch.equal(restored.prompt_learner.ctx, client.prompt_learner.ctx)


def test_expert_features_are_encoded_once_per_pool_entry(tiny_backbone, classnames, monkeypatch):
    torch.manual_seed(0)
    client = PFedMoAPClient(tiny_backbone, classnames, gate=GateConfig(d_gate=16), prompt=PromptConfig(n_ctx=4))
    experts = torch.randn(3, 4, 64) * 0.02
    calls = []
    original = PFedMoAPClient.expert_text_features

    def counting(self, ctx):
        calls.append(ctx.shape[0])
        return original(self, ctx)

    monkeypatch.setattr(PFedMoAPClient, "expert_text_features", counting)
    client.set_extras({"experts": experts[:2], "expert_keys": [[0, 1], [1, 1]]})
    first = client.expert_features.clone()
    client.set_extras({"experts": experts[1:], "expert_keys": [[1, 1], [2, 1]]})  # pool id 1 again: cached
    assert calls == [1, 1, 1]
    assert torch.equal(client.expert_features[0], first[1])
    client.set_extras({"experts": experts[:1], "expert_keys": [[0, 2]]})  # client 0 uploaded again in round 2
    assert len(calls) == 4 and sorted(client._feature_cache) == [0, 1, 2] and client._feature_cache[0][0] == 2
    client.set_extras({"experts": experts[:1], "expert_keys": [[0, 1]]})  # an old download, evaluated later
    assert len(calls) == 5 and client._feature_cache[0][0] == 2  # recomputed, the newer entry kept
    client.set_extras({})
    assert client.num_loaded_experts == 0
