"""Evaluation at scale (#15): ``eval.clients=all|sampled|N`` evaluates a subset per round with the same numbers as
evaluating everyone, recorded as the subset's clients and their accuracies; the final round evaluates every
client (N-long lists)."""

from __future__ import annotations

import pytest

from fedlit.config import ConfigError
from fedlit.federation.evaluation import Evaluation
from fedlit.federation.experiment import run_experiment
from fedlit.federation.sampling import evaluation_subset, sample_clients
from tests.helpers import fast_config

JOB = ["algorithm=pfedmoap", "fed.frac=0.5", "fed.rounds=3"]


def accuracies(results: dict) -> list[list[float | None]]:
    return [r["accuracy"] for r in results["rounds"]]


def by_client(row: dict) -> dict[int, float | None]:
    """A round's per-client accuracies by client id: a subset round lists its ``evaluated_clients``."""
    clients = row.get("evaluated_clients", range(len(row["accuracy"])))
    return {c: a for c, a in zip(clients, row["accuracy"], strict=True) if a is not None}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    [res] = run_experiment(fast_config(tmp_path_factory.mktemp("all"), *JOB))
    return res


def test_a_seeded_subset_per_round_gives_the_full_runs_numbers_where_evaluated(tmp_path, full):
    [res] = run_experiment(fast_config(tmp_path, *JOB, "eval.clients=2"))
    for r, (row, want) in enumerate(zip(res["rounds"], accuracies(full)), start=1):
        chosen = evaluation_subset(0, r, 4, 2) if r < 3 else [0, 1, 2, 3]
        got = by_client(row)
        assert sorted(got) == chosen and [got[c] for c in chosen] == [want[c] for c in chosen]
        assert ("evaluated_clients" in row) == (r < 3) and len(row["accuracy"]) == len(chosen)
    assert len(accuracies(res)[-1]) == 4 and all(a is not None for a in accuracies(res)[-1])  # the final: everyone
    assert [r["loss"] for r in res["rounds"]] == [r["loss"] for r in full["rounds"]]
    assert [r["acc_global"] for r in res["rounds"]] == [r["acc_global"] for r in full["rounds"]]


def test_extending_a_finished_run_evaluates_its_old_final_round_as_a_straight_run_does(tmp_path):
    [straight] = run_experiment(fast_config(tmp_path / "straight", *JOB, "eval.clients=2"))
    [short] = run_experiment(fast_config(tmp_path / "ext", *JOB, "eval.clients=2", "fed.rounds=2"))
    assert "evaluated_clients" not in short["rounds"][-1]  # round 2 was final: everyone
    [extended] = run_experiment(fast_config(tmp_path / "ext", *JOB, "eval.clients=2", "run.resume=auto"))
    assert extended["rounds"] == straight["rounds"]
    assert extended["rounds"][1]["evaluated_clients"] == evaluation_subset(0, 2, 4, 2)


def test_sampled_evaluates_the_rounds_trained_clients(tmp_path, full):
    [res] = run_experiment(fast_config(tmp_path, *JOB, "eval.clients=sampled", "eval.final_all=false"))
    for r, (row, want) in enumerate(zip(res["rounds"], accuracies(full)), start=1):
        sampled = sample_clients(0, r, 4, 0.5)
        assert len(sampled) == 2 and row["evaluated_clients"] == sampled
        assert row["accuracy"] == [want[c] for c in sampled]
        assert res["rounds"][r - 1]["acc_mean"] == pytest.approx(sum(want[c] for c in sampled) / 2, abs=1e-12)


def test_eval_clients_accepts_all_sampled_or_a_positive_count(tmp_path):
    assert fast_config(tmp_path, "eval.clients=3").eval.clients == "3"
    for bad in ("0", "-2", "some"):
        with pytest.raises(ConfigError, match="eval.clients must be all, sampled or a positive number"):
            fast_config(tmp_path, f"eval.clients={bad}")


def test_a_subset_round_records_its_clients_only_every_list_aligned():
    result = Evaluation(accuracy=[0.5, None, 0.25, 1.0, None], global_accuracy=0.4, novel=[0.1, None, 0.2, 0.3, None],
                        diagnostics={"expert_attention": [[0.5, 0.5], None, [1.0, 0.0], [0.2, 0.8], None]})
    assert result.record(7) == {"round": 7, "accuracy": result.accuracy, "novel": result.novel,
                                "diagnostics": result.diagnostics}
    assert result.record(7, [3, 0, 1]) == {"round": 7, "evaluated_clients": [0, 1, 3], "accuracy": [0.5, None, 1.0],
                                           "novel": [0.1, None, 0.3],
                                           "diagnostics": {"expert_attention": [[0.5, 0.5], None, [0.2, 0.8]]}}
    assert Evaluation(accuracy=[0.5, 0.5], global_accuracy=None).record(1, [1]) == {
        "round": 1, "evaluated_clients": [1], "accuracy": [0.5]}
