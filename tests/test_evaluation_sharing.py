"""Evaluation loads a plan once for every client that shares it (#15): clients that never trained all hold the
global model, so N of them cost one load and one text-tower pass, with each client's own numbers bitwise."""

from __future__ import annotations

import torch

from fedlit.federation.checkpoint import CHECKPOINT_NAME
from fedlit.federation.evaluation import accuracy_counts, evaluate, same_value
from fedlit.federation.experiment import build_job
from tests.helpers import fast_config

JOB = ["algorithm=pfedmoap", "data.num_clients=8", "data.partition=iid", "fed.frac=0.25", "fed.rounds=2"]


def test_clients_sharing_a_plan_get_their_own_numbers_from_one_text_pass(tmp_path, monkeypatch):
    job = build_job(fast_config(tmp_path, *JOB))
    orchestrator = job.orchestrator(tmp_path / "run")
    orchestrator.run()
    state = orchestrator._restore(tmp_path / "run" / CHECKPOINT_NAME)
    trainer, algorithm, initial = orchestrator.trainer, orchestrator.algorithm, orchestrator.initial
    stored = state.store.ids()
    assert 0 < len(stored) < 8  # some clients trained, the others never did

    module = trainer.module
    passes = []
    encode = type(module).class_text_features
    monkeypatch.setattr(module, "class_text_features", lambda: passes.append(1) or encode(module))
    result = evaluate(trainer, algorithm, state.server, state.store, initial)
    assert len(passes) == len(stored) + 2  # each trained client, the never-trained ones once, the global model

    part, data = job.partition, trainer.data
    for cid in range(8):  # each client's plan loaded on its own, as evaluation did before plans were shared
        plan = algorithm.eval_plan(state.server, cid, state.store.get(cid), initial)
        index = torch.as_tensor(part.test_indices[cid], dtype=torch.long)
        correct, total = accuracy_counts(trainer, plan, data.test_inputs(index), data.test_labels[index])
        assert result.accuracy[cid] == correct / total


def test_plan_values_compare_bitwise():
    a = torch.tensor([0.0, 1.0])
    assert same_value({"x": a, "k": [[1, 2]]}, {"x": a.clone(), "k": [[1, 2]]})
    assert not same_value(a, torch.tensor([-0.0, 1.0]).double())  # another dtype
    assert not same_value({"theta": 0.0}, {"theta": -0.0})
    assert not same_value([1, 2], (1, 2))
    assert not same_value({"x": a}, {"x": a, "y": None})
