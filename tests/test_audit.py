"""``fedlit audit RUN_DIR`` (#21): the membership-inference audit of a trained run end to end on the tiny backbone:
its games' sizes, its scores recomputed through the client module's own forward, the epsilon it compares to, the
audit.json it writes, and bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlit import privacy
from fedlit.audit import AUDIT_NAME, audit_run, balanced, method_folders, train_inputs
from fedlit.command import main
from fedlit.config import load_config
from fedlit.errors import UserError
from fedlit.export import load_run
from fedlit.federation.experiment import build_job, run_experiment
from fedlit.membership import auc, empirical_epsilon
from tests.helpers import cache_dir, fast_config, only_run_dir, read_results

# 4 clients of 8 classes each (pathological), 8 train shots and 4 test images per class; one client held out
HELDOUT = ["algorithm=promptfl", "eval.protocol=heldout", "fed.rounds=2"]


@pytest.fixture(scope="module")
def promptfl_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    run_experiment(fast_config(out, *HELDOUT))
    return only_run_dir(out)


def rows(result: dict) -> dict:
    return {(r["attack"], r["level"], r["model"]): r for r in result["attacks"]}


def test_audit_of_a_run_end_to_end(promptfl_run, capsys):
    assert main(["audit", str(promptfl_run)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((promptfl_run / AUDIT_NAME).read_text())
    assert result["algorithm"] == "promptfl" and result["round"] == 2 and result["confidence"] == 0.95
    assert result["accountant"]["epsilon"] is None  # no DP
    [held] = read_results(promptfl_run)["heldout_clients"]
    by = rows(result)
    # balanced per class: min(8 shots, 4 test images) = 4 of each side for each of a client's 8 classes
    assert by["loss", "sample", "personalised"]["members"] == by["loss", "sample", "personalised"]["nonmembers"] == 96
    assert by["lrt", "sample", "global"]["members"] == by["lrt", "sample", "global"]["nonmembers"] == 96
    assert by["loss", "sample", "global"]["nonmembers_from_test"] == 96  # no unused train image of those classes
    client = by["loss", "client", "global"]
    assert (client["members"], client["nonmembers"]) == (3, 1) and held == 0  # drawn from seed 0
    for row in result["attacks"]:
        assert 0.0 <= row["auc"] <= 1.0 and row["epsilon_lower_bound"] >= 0.0
    assert "fedlit audit | promptfl after round 2 | no DP (privacy.* off)" in printed
    [line] = [line for line in printed.splitlines() if line.startswith("loss threshold (samples)") and "global" in line]
    assert line.split()[3:6] == ["global", "96", "96"] and line.split()[-1] == "n/a"  # no accountant epsilon
    assert f"fedlit | wrote {promptfl_run / AUDIT_NAME}" in printed


def test_the_global_loss_attack_recomputed_through_the_modules_forward(promptfl_run):
    """The global game's losses from the client module's ``forward`` and F.cross_entropy give the audit's AUC and
    epsilon bound; the logit-scaled confidence is log(p / (1 - p)) of the softmax."""
    from fedlit.audit import audit, global_game

    orchestrator, state = load_run(promptfl_run)
    result = audit(orchestrator, state)
    plan = orchestrator.algorithm.global_plan(state.server, orchestrator.initial)
    orchestrator.trainer.load(plan)
    module, data, part = orchestrator.module.eval(), orchestrator.data, orchestrator.data.partition
    [held] = read_results(promptfl_run)["heldout_clients"]
    trained = [c for c in range(4) if c != held]
    own = np.unique(np.concatenate([part.train_indices[c] for c in trained]))
    # the held-out client's train images are unused, but of other classes: every non-member is a test image
    unused = part.train_indices[held]
    members, from_train, nonmembers = balanced(own, unused, data.train_labels.numpy(), data.test_labels.numpy(), 0)
    assert len(from_train) == 0 and len(members) == len(nonmembers) == 96
    with torch.no_grad():
        member_logits = module(data.train_features[members]).double()
        other_logits = module(data.test_features[nonmembers]).double()
    losses = torch.cat([F.cross_entropy(member_logits, data.train_labels[members], reduction="none"),
                        F.cross_entropy(other_logits, data.test_labels[nonmembers], reduction="none")]).numpy()
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
    row = rows(result)["loss", "sample", "global"]
    assert row["auc"] == pytest.approx(auc(-losses, is_member), abs=1e-12)
    assert row["epsilon_lower_bound"] == empirical_epsilon(-losses, is_member, 1e-5, 0.95, 0).epsilon
    game = global_game(orchestrator, state, plan, 0)
    assert game.loss == pytest.approx(losses, abs=1e-6)
    p = torch.softmax(member_logits, -1).gather(1, data.train_labels[members][:, None])[:, 0].numpy()
    assert game.phi[: len(members)] == pytest.approx(np.log(p / (1 - p)), abs=1e-6)


def test_the_client_scores_are_the_initial_minus_the_final_mean_loss(promptfl_run):
    """Each client's score is recomputed with the initial and the final global prompt loaded in turn through the
    module's ``forward``: the game must not score both sides with whichever model the trainer holds last."""
    from fedlit.audit import client_game
    from fedlit.state import ClientPlan

    orchestrator, state = load_run(promptfl_run)
    plan = orchestrator.algorithm.global_plan(state.server, orchestrator.initial)
    scores, members = client_game(orchestrator, state, plan)
    [held] = read_results(promptfl_run)["heldout_clients"]
    order = [c for c in range(4) if c != held] + [held]  # trained clients first, then the held-out one
    assert members.tolist() == [True, True, True, False]
    data, part, module = orchestrator.data, orchestrator.data.partition, orchestrator.module

    def mean_losses(held_plan: ClientPlan) -> np.ndarray:
        orchestrator.trainer.load(held_plan)
        module.eval()
        with torch.no_grad():
            return np.array([F.cross_entropy(module(data.train_features[part.train_indices[c]]).double(),
                                             data.train_labels[part.train_indices[c]]).item() for c in order])

    expected = mean_losses(ClientPlan(start=orchestrator.initial)) - mean_losses(plan)
    assert scores == pytest.approx(expected, abs=1e-6)
    assert np.abs(scores).min() > 0.01  # the two models differ on every client (one model twice would give 0)


def test_an_eval_model_refuses_to_score_after_another_load(promptfl_run):
    """Two EvalModels on one trainer (the client game's old bug): the first one no longer holds its plan once the
    second loads, so scoring with it raises and using it again reloads its own plan."""
    from fedlit.federation.evaluation import EvalModel
    from fedlit.state import ClientPlan

    orchestrator, state = load_run(promptfl_run)
    initial = ClientPlan(start=orchestrator.initial)
    final = orchestrator.algorithm.global_plan(state.server, orchestrator.initial)
    first, second = EvalModel(orchestrator.trainer), EvalModel(orchestrator.trainer)
    features, labels = orchestrator.data.train_features[:8], orchestrator.data.train_labels[:8]
    first.use(initial)
    before = first.counts(features, labels)
    second.use(final)
    with pytest.raises(RuntimeError, match="no longer holds this EvalModel's plan"):
        first.counts(features, labels)
    first.use(initial)
    assert first.counts(features, labels) == before
    held = orchestrator.module.client_state()
    assert all(torch.equal(held[k], v) for k, v in orchestrator.initial.params.items())  # its own plan again


def test_a_dp_run_is_compared_to_its_accountant(tmp_path):
    run_experiment(fast_config(tmp_path, *HELDOUT, "privacy.clip=0.1", "privacy.target_epsilon=8"))
    run = only_run_dir(tmp_path)
    assert main(["audit", str(run)]) == 0
    result = json.loads((run / AUDIT_NAME).read_text())
    last = read_results(run)["rounds"][-1]
    accountant = result["accountant"]
    assert accountant["epsilon"] == last["epsilon"] and accountant["noise_multiplier"] == last["noise_multiplier"]
    # every one of the 3 training clients every round (q = 1): replacing a client's data is a Gaussian of z / 2
    z = last["noise_multiplier"]
    assert accountant["epsilon_replace_one"] == pytest.approx(privacy.epsilon(2, 1.0, z / 2, 1e-5), rel=1e-9)
    assert accountant["epsilon_replace_one"] > accountant["epsilon"]
    by = rows(result)
    assert by["loss", "client", "global"]["accountant_epsilon"] == last["epsilon"]
    assert by["loss", "sample", "global"]["accountant_epsilon"] == accountant["epsilon_replace_one"]
    assert by["loss", "sample", "personalised"]["accountant_epsilon"] == accountant["epsilon_replace_one"]


def test_a_personalised_model_is_not_covered_by_the_accountant(tmp_path):
    run_experiment(fast_config(tmp_path, "algorithm=pfedmoap", "fed.rounds=2", "privacy.clip=0.1",
                               "privacy.target_epsilon=8"))
    run = only_run_dir(tmp_path)
    assert main(["audit", str(run)]) == 0
    by = rows(json.loads((run / AUDIT_NAME).read_text()))
    assert by["loss", "sample", "personalised"]["accountant_epsilon"] is None  # private gates are not noised
    assert by["loss", "sample", "global"]["accountant_epsilon"] is not None
    assert by["loss", "client", "global"]["nonmembers"] == 0 and by["loss", "client", "global"]["auc"] is None


def test_train_inputs_of_an_augmented_run_are_the_deterministic_view(tmp_path):
    job = build_job(fast_config(tmp_path, "data.augment=true", "perf.cache_features=false"))
    index = torch.tensor([0, 5, 9])
    images = train_inputs(job.data, index)
    expected = torch.stack([job.bundle.test.transform(job.bundle.train.load_image(i)) for i in index.tolist()])
    assert torch.equal(images, expected)
    assert torch.equal(train_inputs(job.data, index), images)  # no random crop: the same every call


def test_bad_audits_are_one_line_and_write_nothing(tmp_path, promptfl_run, capsys):
    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ") and not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    assert main(["audit", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a fedlit run directory (no checkpoint.pt)" in err
    assert list((tmp_path / "empty").iterdir()) == []
    assert main(["audit", str(promptfl_run), "--confidence", "1.5"]) == 2
    assert "--confidence must be in (0, 1) (got 1.5)" in capsys.readouterr().err
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "torn" / "config.yaml").write_text((promptfl_run / "config.yaml").read_text())
    assert main(["audit", str(tmp_path / "torn")]) == 2
    assert "is not a fedlit checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "torn" / AUDIT_NAME).exists()


def test_an_all_run_is_audited_method_by_method(tmp_path):
    for name in ("promptfl", "pfedmoap"):
        (tmp_path / "all-x" / name).mkdir(parents=True)
        (tmp_path / "all-x" / name / "checkpoint.pt").write_bytes(b"")
    assert method_folders(tmp_path / "all-x") == [tmp_path / "all-x" / "pfedmoap", tmp_path / "all-x" / "promptfl"]
    assert method_folders(tmp_path / "all-x" / "promptfl") == [tmp_path / "all-x" / "promptfl"]
    with pytest.raises(UserError, match="is not a directory"):
        method_folders(tmp_path / "nowhere")


def test_non_members_are_unused_train_images_when_a_class_has_enough():
    train_labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    test_labels = np.array([0, 1, 1, 1, 2, 2])
    members = np.array([0, 1, 4, 5, 7])  # class 0: 2, class 1: 2, class 2: 1
    unused = np.array([2, 3, 6])  # class 0: 2 (enough), class 1: 1 (too few), class 2: none
    kept, from_train, from_test = balanced(members, unused, train_labels, test_labels, seed=0)
    assert from_train.tolist() == [2, 3]  # class 0 from the unused train images
    assert sorted(test_labels[from_test].tolist()) == [1, 1, 2]  # classes 1 and 2 from the test split
    assert kept.tolist() == [0, 1, 4, 5, 7]  # every class has as many non-members as members


# The offline default with one client per class (32 clients, pathological), half of them held out of training, and
# a prompt context per class: the global model improves exactly the classes of the clients that trained, so the
# client game can tell who took part.
CLIENT_LEAK = ["algorithm=promptfl", "prompt.class_specific=true", "eval.protocol=heldout", "data.num_clients=32",
               "eval.heldout_fraction=0.5"]


@pytest.mark.slow
def test_dp_with_a_small_epsilon_drives_the_audit_towards_chance_on_the_offline_default(tmp_path):
    """Without DP the client-level attack finds the clients that trained (AUC above 0.9); client-level DP at
    epsilon = 1 brings the same attack on the same federation back near 0.5, and no empirical epsilon bound exceeds
    the accountant's."""
    results = {}
    for name, extra in (("plain", []), ("dp", ["privacy.clip=0.1", "privacy.target_epsilon=1"])):
        cfg = load_config("configs/default.yaml", [f"backbone.cache_dir={cache_dir()}", "run.quiet=true",
                                                   f"run.out_dir={tmp_path / name}", *CLIENT_LEAK, *extra])
        run_experiment(cfg)
        results[name] = audit_run(only_run_dir(tmp_path / name, "quickstart"))
    plain, dp = (rows(results[name])["loss", "client", "global"] for name in ("plain", "dp"))
    assert plain["members"] == plain["nonmembers"] == dp["members"] == dp["nonmembers"] == 16
    assert plain["auc"] > 0.9
    assert abs(dp["auc"] - 0.5) < 0.15 and abs(dp["auc"] - 0.5) < abs(plain["auc"] - 0.5) / 3
    assert results["dp"]["accountant"]["epsilon"] == pytest.approx(1.0, abs=1e-3)
    for row in results["dp"]["attacks"]:
        if row["accountant_epsilon"] is not None:
            assert row["epsilon_lower_bound"] <= row["accountant_epsilon"], row
