"""Evaluation at scale (#15): ``eval.clients=all|sampled|N`` evaluates a subset per round (None elsewhere) with the
same numbers as evaluating everyone; the final round evaluates every client."""

from __future__ import annotations

import pytest

from fedlit.config import ConfigError
from fedlit.federation.experiment import run_experiment
from fedlit.federation.sampling import evaluation_subset, sample_clients
from tests.helpers import fast_config

JOB = ["algorithm=pfedmoap", "fed.frac=0.5", "fed.rounds=3"]


def accuracies(results: dict) -> list[list[float | None]]:
    return [r["accuracy"] for r in results["rounds"]]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    [res] = run_experiment(fast_config(tmp_path_factory.mktemp("all"), *JOB))
    return res


def test_a_seeded_subset_per_round_gives_the_full_runs_numbers_where_evaluated(tmp_path, full):
    [res] = run_experiment(fast_config(tmp_path, *JOB, "eval.clients=2"))
    for r, (got, want) in enumerate(zip(accuracies(res), accuracies(full)), start=1):
        chosen = evaluation_subset(0, r, 4, 2) if r < 3 else [0, 1, 2, 3]
        assert [c for c, a in enumerate(got) if a is not None] == chosen
        assert [got[c] for c in chosen] == [want[c] for c in chosen]
    assert all(a is not None for a in accuracies(res)[-1])  # the final round evaluates everyone
    assert [r["loss"] for r in res["rounds"]] == [r["loss"] for r in full["rounds"]]
    assert [r["acc_global"] for r in res["rounds"]] == [r["acc_global"] for r in full["rounds"]]


def test_extending_a_finished_run_evaluates_its_old_final_round_as_a_straight_run_does(tmp_path):
    [straight] = run_experiment(fast_config(tmp_path / "straight", *JOB, "eval.clients=2"))
    [short] = run_experiment(fast_config(tmp_path / "ext", *JOB, "eval.clients=2", "fed.rounds=2"))
    assert all(a is not None for a in accuracies(short)[-1])  # round 2 was final: everyone
    [extended] = run_experiment(fast_config(tmp_path / "ext", *JOB, "eval.clients=2", "run.resume=auto"))
    assert extended["rounds"] == straight["rounds"]
    assert [c for c, a in enumerate(accuracies(extended)[1]) if a is not None] == evaluation_subset(0, 2, 4, 2)


def test_sampled_evaluates_the_rounds_trained_clients(tmp_path, full):
    [res] = run_experiment(fast_config(tmp_path, *JOB, "eval.clients=sampled", "eval.final_all=false"))
    for r, (got, want) in enumerate(zip(accuracies(res), accuracies(full)), start=1):
        sampled = sample_clients(0, r, 4, 0.5)
        assert len(sampled) == 2
        assert [c for c, a in enumerate(got) if a is not None] == sampled
        assert [got[c] for c in sampled] == [want[c] for c in sampled]
        assert res["rounds"][r - 1]["acc_mean"] == pytest.approx(sum(want[c] for c in sampled) / 2, abs=1e-12)


def test_eval_clients_accepts_all_sampled_or_a_positive_count(tmp_path):
    assert fast_config(tmp_path, "eval.clients=3").eval.clients == "3"
    for bad in ("0", "-2", "some"):
        with pytest.raises(ConfigError, match="eval.clients must be all, sampled or a positive number"):
            fast_config(tmp_path, f"eval.clients={bad}")
