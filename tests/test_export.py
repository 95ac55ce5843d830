"""Back to Lightning (#22): ``fedlit export RUN_DIR --client i`` writes a client's personalised model as a Lightning
checkpoint of its client module that restores (with the backbone by name, or passed in) to exactly the model
fedlit evaluated; the modules record the backbone and learning rates and are constructible by backbone name
(``LightningCLI``)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from fedlit.algorithms import build_algorithm
from fedlit.command import main
from fedlit.config import ALGORITHMS, GateConfig, OptimConfig, load_config
from fedlit.errors import UserError
from fedlit.export import client_module, export_client, save_lightning_checkpoint
from fedlit.federation.experiment import build_job, run_experiment
from fedlit.modules import PFedMoAPClient
from fedlit.modules.base import PLAN_EXTRAS_KEY
from fedlit.modules.promptfolio import PromptFolioClient
from tests.helpers import fast_config, only_run_dir, read_results


@pytest.fixture(scope="module")
def moap_run(tmp_path_factory):
    """A 2-round pFedMoAP run of the fast setting (4 clients, K = 2 experts from round 2)."""
    out = tmp_path_factory.mktemp("moap")
    run_experiment(fast_config(out, "algorithm=pfedmoap", "fed.rounds=2"))
    return only_run_dir(out)


def test_exported_clients_restore_to_the_accuracy_fedlit_evaluated(moap_run, capsys):
    recorded = read_results(moap_run)["rounds"][-1]["accuracy"]
    experts = []
    for client in range(4):
        assert main(["export", str(moap_run), "--client", str(client)]) == 0
        path = moap_run / "export" / f"client-{client}.ckpt"
        restored = PFedMoAPClient.load_from_checkpoint(path, weights_only=True)  # the backbone loaded by name
        assert restored.num_loaded_experts == 2
        experts.append(restored.expert_ctx)
        done = export_client(moap_run, client, moap_run / "again.ckpt")
        assert done.accuracy == done.recorded == recorded[client]
    assert not torch.equal(experts[0], experts[1])  # personalised: each client's own downloaded experts
    out = capsys.readouterr().out
    assert "fedlit | client 3 after round 2: test accuracy" in out
    assert f"load it with fedlit.modules.pfedmoap.PFedMoAPClient.load_from_checkpoint('{path}'" in out


def test_exported_logits_equal_the_simulators_module(moap_run):
    cfg = load_config(moap_run / "config.yaml")
    job = build_job(cfg)
    features = job.data.test_inputs(torch.as_tensor(job.partition.test_indices[2], dtype=torch.long))
    done = export_client(moap_run, 2, moap_run / "c2.ckpt")
    by_name = PFedMoAPClient.load_from_checkpoint(done.path, weights_only=True).eval()
    given = PFedMoAPClient.load_from_checkpoint(done.path, backbone=job.backbone, weights_only=True).eval()
    module = client_module(moap_run, 2)[0]
    with torch.no_grad():
        assert torch.equal(by_name(features), module(features)) and torch.equal(given(features), module(features))
    hparams = given.hparams
    assert hparams["backbone"] == "tiny" and hparams["backbone_pretrained"] is None
    assert hparams["optim"]["prompt_lr"] == cfg.optim.prompt_lr and hparams["optim"]["gate_lr"] == cfg.optim.gate_lr
    assert hparams["gate"]["d_gate"] == 16 and hparams["lam"] == cfg.method.lam


def test_clients_that_never_trained_export_their_evaluated_model(tmp_path):
    run_experiment(fast_config(tmp_path, "algorithm=promptfolio", "fed.rounds=1", "fed.frac=0.25"))
    run_dir = only_run_dir(tmp_path)
    results = read_results(run_dir)
    assert sum(r["clients"] for r in results["rounds"]) == 1  # one client trained, three never did
    for client in range(4):  # P_g with the client's own (for three of them: the initial) local prompt
        done = export_client(run_dir, client)
        assert done.accuracy == done.recorded == results["rounds"][-1]["accuracy"][client]


def test_a_plans_extras_travel_in_the_checkpoint(tmp_path, moap_run, tiny_backbone, classnames):
    done = export_client(moap_run, 0, tmp_path / "c0.ckpt")
    saved = torch.load(done.path, weights_only=True)[PLAN_EXTRAS_KEY]
    restored = PFedMoAPClient.load_from_checkpoint(done.path, weights_only=True)
    assert torch.equal(saved["experts"], restored.expert_ctx) and len(saved["expert_keys"]) == 2
    folio = PromptFolioClient(tiny_backbone, classnames, theta=0.4)
    save_lightning_checkpoint(folio, tmp_path / "global.ckpt", {"theta": 0.0})  # the global model's mix
    assert PromptFolioClient.load_from_checkpoint(tmp_path / "global.ckpt", weights_only=True).theta == 0.0


def test_a_run_on_the_disk_store_exports_from_its_shards(tmp_path):
    run_experiment(fast_config(tmp_path, "algorithm=pfedmoap", "fed.rounds=2", "store.backend=disk"))
    run_dir = only_run_dir(tmp_path)
    assert any((run_dir / "store").glob("shard-*"))  # the clients live in shard files, not in checkpoint.pt
    done = export_client(run_dir, 3)
    assert done.accuracy == done.recorded == read_results(run_dir)["rounds"][-1]["accuracy"][3]
    assert PFedMoAPClient.load_from_checkpoint(done.path, weights_only=True).num_loaded_experts == 2


def test_fine_tuned_evaluation_is_exported_as_evaluated(tmp_path):
    run_experiment(fast_config(tmp_path, "algorithm=promptfl_ft", "fed.rounds=1"))
    run_dir = only_run_dir(tmp_path)
    done = export_client(run_dir, 1)
    assert done.accuracy == done.recorded == read_results(run_dir)["rounds"][-1]["accuracy"][1]


def test_bad_exports_are_one_line(tmp_path, moap_run, capsys):
    assert main(["export", str(moap_run), "--client", "4"]) == 2
    assert capsys.readouterr().err.strip().endswith("its clients are 0-3")
    for name in ("promptfl", "pfedmoap"):
        (tmp_path / "all-x" / name).mkdir(parents=True)
        (tmp_path / "all-x" / name / "checkpoint.pt").write_bytes(b"")
    listed = "holds the runs of 2 methods; export one of them: .*all-x/<method> with <method> one of pfedmoap, promptfl"
    with pytest.raises(UserError, match=listed):
        export_client(tmp_path / "all-x", 0)
    assert main(["export", str(tmp_path), "--client", "0"]) == 2
    assert "is not a fedlit run directory (no checkpoint.pt)" in capsys.readouterr().err


def test_every_method_module_takes_its_backbone_by_name(tmp_path, classnames):
    cfg = fast_config(tmp_path)
    for name in ALGORITHMS:
        module = build_algorithm(cfg, name).build_module("tiny", classnames)
        assert module.hparams["backbone"] == "tiny" and module.backbone.name == "tiny", name


def test_hyper_parameters_record_the_backbone_and_learning_rates(tmp_path, tiny_backbone, classnames):
    client = PFedMoAPClient(tiny_backbone, classnames, gate=GateConfig(d_gate=16),
                            optim=OptimConfig(prompt_lr=0.01, gate_lr=0.2))
    client.load_experts(torch.randn(2, *client.prompt_learner.ctx_shape) * 0.02)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    data = torch.utils.data.TensorDataset(F.normalize(torch.randn(6, 64), dim=-1), torch.tensor([0, 1, 2] * 2))
    trainer.fit(client, torch.utils.data.DataLoader(data, batch_size=3))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=True)["hyper_parameters"]
    assert saved["backbone"] == "tiny" and saved["backbone_pretrained"] is None
    assert (saved["optim"]["prompt_lr"], saved["optim"]["gate_lr"]) == (0.01, 0.2)
    restored = PFedMoAPClient.load_from_checkpoint(tmp_path / "c.ckpt", weights_only=True).eval()
    client.eval()
    x = F.normalize(torch.randn(5, 64), dim=-1)
    assert torch.equal(client(x), restored(x))
    assert [g["lr"] for g in restored.param_groups()] == [0.01, 0.2]


def test_lightning_cli_builds_and_fits_a_module_with_the_backbone_by_name(tmp_path, capsys):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    args = ["--model.backbone=tiny", "--model.classnames=[cat,dog,bird]", "--model.gate.d_gate=16",
            "--model.optim.gate_lr=0.05", "--trainer.max_epochs=1", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(SystemExit):
        LightningCLI(PFedMoAPClient, run=False, args=[*args, "--print_config"])
    printed = capsys.readouterr().out
    assert "backbone: tiny" in printed and "gate_lr: 0.05" in printed
    cli = LightningCLI(PFedMoAPClient, run=False, args=args, save_config_callback=None)
    assert isinstance(cli.model, PFedMoAPClient) and cli.model.backbone.name == "tiny"
    data = torch.utils.data.TensorDataset(F.normalize(torch.randn(6, 64), dim=-1), torch.tensor([0, 1, 2] * 2))
    before = cli.model.prompt_learner.ctx.detach().clone()
    cli.trainer.fit(cli.model, torch.utils.data.DataLoader(data, batch_size=3))
    assert not torch.equal(before, cli.model.prompt_learner.ctx)
    assert cli.model.optim.gate_lr == 0.05 and [g["lr"] for g in cli.model.param_groups()] == [0.002, 0.05]
