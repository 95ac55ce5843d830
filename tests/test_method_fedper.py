"""Prompt + FedPer: global leading tokens averaged, personal tokens kept, against hand computations; end-to-end runs."""

from __future__ import annotations

import json

import pytest
import torch

from fedlit.algorithms.fedper import FedPer, merge_tokens
from fedlit.errors import UserError
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.experiment import run_experiment
from fedlit.state import PROMPT, ClientState, StoreEntry, Upload
from tests.helpers import fast_config, only_run_dir

pytestmark = pytest.mark.usefixtures("single_thread")


def ctx(*rows: float) -> torch.Tensor:
    """A context ``(n_ctx, W = 2)`` whose token t is ``(rows[t], -rows[t])``."""
    values = torch.tensor(rows, dtype=torch.float32)
    return torch.stack([values, -values], dim=-1)


def upload(context: torch.Tensor) -> Upload:
    return Upload(ClientState({PROMPT: context}), loss=0.0, steps=1)


@pytest.fixture
def fedper(tmp_path) -> FedPer:
    return FedPer(fast_config(tmp_path, "algorithm=fedper"))


def test_merge_takes_the_leading_tokens_of_the_global_context():
    merged = merge_tokens(ctx(1, 2, 3, 4), ctx(5, 6, 7, 8), 2)
    assert torch.equal(merged, ctx(1, 2, 7, 8))
    assert torch.equal(merge_tokens(ctx(1, 2, 3), ctx(5, 6, 7), 0), ctx(5, 6, 7))
    assert torch.equal(merge_tokens(ctx(1, 2, 3), ctx(5, 6, 7), 3), ctx(1, 2, 3))
    class_specific = torch.stack([ctx(1, 2, 3), ctx(4, 5, 6)])  # (C = 2, n_ctx = 3, W = 2): tokens on axis -2
    assert torch.equal(merge_tokens(class_specific, -class_specific, 1),
                       torch.stack([ctx(1, -2, -3), ctx(4, -5, -6)]))


def test_aggregate_averages_exactly_the_global_tokens(fedper):
    initial = ClientState({PROMPT: ctx(0.5, 0.25, 9, 9)})
    server = fedper.init_server(initial)
    assert fedper.num_global(4) == 2  # default: the first half of the n_ctx = 4 tokens
    uploads = {3: upload(ctx(4, 8, 100, 200)), 1: upload(ctx(0, -4, -100, 50))}
    new = fedper.aggregate(server, uploads, {1: 3, 3: 1})
    # (3 * 0 + 1 * 4) / 4 = 1 and (3 * -4 + 1 * 8) / 4 = -1; tokens 2-3 stay the initial ones, never averaged.
    assert torch.equal(new.global_state["ctx"], ctx(1, -1, 9, 9))
    assert new.round == 1 and torch.equal(server.global_state["ctx"], ctx(0.5, 0.25, 9, 9))  # old state untouched


def test_plan_and_eval_keep_the_personal_tokens(fedper):
    initial = ClientState({PROMPT: ctx(0, 0, 7, 7)})
    server = fedper.init_server(initial)
    server.global_state["ctx"] = ctx(1, -1, 7, 7)
    entry = StoreEntry(ClientState({PROMPT: ctx(5, 5, 30, 40)}), last_round=1)
    plan = fedper.plan(server, 2, entry, initial)
    assert torch.equal(plan.start.params[PROMPT], ctx(1, -1, 30, 40))
    assert torch.equal(entry.state.params[PROMPT], ctx(5, 5, 30, 40))  # the store is not modified
    assert torch.equal(fedper.eval_plan(server, 2, entry, initial).start.params[PROMPT], ctx(1, -1, 30, 40))
    # A client that never trained: the global tokens with the initial personal tokens.
    assert torch.equal(fedper.plan(server, 0, None, initial).start.params[PROMPT], ctx(1, -1, 7, 7))
    assert fedper.global_plan(server, initial) is None


def test_number_of_global_tokens_is_configurable_and_checked(tmp_path):
    odd = ClientState({PROMPT: ctx(1, 2, 3, 4, 5)})
    assert FedPer(fast_config(tmp_path, "algorithm=fedper")).num_global(5) == 2
    three = FedPer(fast_config(tmp_path, "algorithm=fedper", "method.fedper_global_tokens=3"))
    new = three.aggregate(three.init_server(odd), {0: upload(ctx(6, 6, 6, 6, 6))}, {0: 5})
    assert torch.equal(new.global_state["ctx"], ctx(6, 6, 6, 4, 5))
    too_many = FedPer(fast_config(tmp_path, "algorithm=fedper", "method.fedper_global_tokens=6"))
    with pytest.raises(UserError, match="fedper_global_tokens=6 exceeds the prompt's 5 context tokens"):
        too_many.init_server(odd)
    with pytest.raises(UserError, match="method.fedper_global_tokens"):  # refused by config validation
        fast_config(tmp_path, "algorithm=fedper", "method.fedper_global_tokens=-1")


def test_fedper_runs_end_to_end_with_private_personal_tokens(tmp_path):
    [res] = run_experiment(fast_config(tmp_path, "algorithm=fedper", "fed.rounds=2"))
    assert res["algorithm"] == "fedper" and [r["round"] for r in res["rounds"]] == [1, 2]
    assert res["rounds"][-1]["acc_global"] is None
    assert len(res["rounds"][-1]["accuracy"]) == 4 and all(0.0 <= a <= 1.0 for a in res["rounds"][-1]["accuracy"])
    run_dir = only_run_dir(tmp_path)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    store, server_ctx = ckpt["store"], ckpt["server"]["global_state"]["ctx"]
    uploads = [store[c]["state"][PROMPT] for c in sorted(store)]  # full participation: every client's last upload
    sizes = json.loads((run_dir / "partition.json").read_text())["train_sizes"]
    assert server_ctx.shape == uploads[0].shape == (4, 64)
    assert all(not torch.equal(uploads[0][2:], u[2:]) for u in uploads[1:])  # personal tokens differ per client
    # The server's global tokens are the sample-weighted FedAvg of the clients' last global tokens.
    weighted = sum(u[:2].double() * n for u, n in zip(uploads, sizes)) / sum(sizes)
    torch.testing.assert_close(server_ctx[:2], weighted.float(), rtol=0, atol=1e-7)


def test_all_tokens_global_is_promptfl(tmp_path):
    [fedper] = run_experiment(fast_config(tmp_path / "a", "algorithm=fedper", "fed.rounds=2",
                                          "method.fedper_global_tokens=4"))
    [promptfl] = run_experiment(fast_config(tmp_path / "b", "algorithm=promptfl", "fed.rounds=2"))
    assert [r["accuracy"] for r in fedper["rounds"]] == [r["accuracy"] for r in promptfl["rounds"]]
    a = load_checkpoint(only_run_dir(tmp_path / "a") / "checkpoint.pt")["server"]["global_state"]["ctx"]
    b = load_checkpoint(only_run_dir(tmp_path / "b") / "checkpoint.pt")["server"]["global_state"]["ctx"]
    assert torch.equal(a, b)
