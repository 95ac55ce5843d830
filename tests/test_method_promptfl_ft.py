"""PromptFL+FT: the fine-tuning starts from the evaluation-time global prompt, leaves the server state alone, is
deterministic per (seed, round, client) whatever the layout, and changes only the personalised evaluation."""

from __future__ import annotations

import pytest
import torch

from fedlit.algorithms.promptfl import PromptFL
from fedlit.algorithms.promptfl_ft import PromptFLFT
from fedlit.errors import UserError
from fedlit.federation.checkpoint import load_checkpoint
from fedlit.federation.evaluation import accuracy_counts
from fedlit.federation.experiment import build_job, run_experiment
from fedlit.federation.trainer import LocalTrainer
from fedlit.state import PROMPT, ClientState, ServerState, StoreEntry
from tests.helpers import fast_config, only_run_dir

pytestmark = pytest.mark.usefixtures("single_thread")

LEARNS = ["prompt.class_specific=true", "optim.prompt_lr=0.05"]  # so that a random tiny CLIP learns in a few steps


def test_finetuning_starts_from_the_evaluation_time_global_prompt(tmp_path):
    algorithm = PromptFLFT(fast_config(tmp_path, "algorithm=promptfl"))
    initial = ClientState({PROMPT: torch.zeros(4, 2)})
    server = ServerState(global_state={"ctx": torch.full((4, 2), 3.0)}, round=5)
    entry = StoreEntry(ClientState({PROMPT: torch.full((4, 2), -7.0)}), last_round=2)
    for own in (entry, None):  # a client's own last prompt is not the start: the global prompt is
        plan = algorithm.eval_plan(server, 1, own, initial)
        assert torch.equal(plan.start.params[PROMPT], torch.full((4, 2), 3.0)) and plan.extras == {}
        plan.start.params[PROMPT].add_(1.0)  # training the plan in place cannot reach the server state
        assert torch.equal(server.global_state["ctx"], torch.full((4, 2), 3.0))
    assert torch.equal(entry.state.params[PROMPT], torch.full((4, 2), -7.0))


def test_finetune_epochs_default_to_the_local_epochs_and_are_checked(tmp_path):
    assert PromptFLFT(fast_config(tmp_path, "fed.local_epochs=3")).finetune_epochs() == 3
    assert PromptFLFT(fast_config(tmp_path, "fed.local_epochs=3", "method.ft_epochs=7")).finetune_epochs() == 7
    assert PromptFLFT(fast_config(tmp_path, "method.ft_epochs=0")).finetune_epochs() == 0  # PromptFL's evaluation
    with pytest.raises(UserError, match="method.ft_epochs"):  # refused by config validation
        fast_config(tmp_path, "method.ft_epochs=-1")


def test_training_and_aggregation_are_promptfl(tmp_path):
    cfg = fast_config(tmp_path, "algorithm=promptfl")
    ft, plain = PromptFLFT(cfg), PromptFL(cfg)
    initial = ClientState({PROMPT: torch.zeros(4, 2)})
    server = ft.init_server(initial)
    assert torch.equal(ft.plan(server, 0, None, initial).start.params[PROMPT],
                       plain.plan(server, 0, None, initial).start.params[PROMPT])
    assert ft.global_plan(server, initial) is not None  # acc_global is PromptFL's global prompt


def test_finetuned_prompts_are_deterministic_per_client_and_leave_the_server_alone(tmp_path):
    """The fine-tuning by hand, from a finished run: every client's eval plan through the local trainer."""
    cfg = fast_config(tmp_path, "algorithm=promptfl", "fed.rounds=2", *LEARNS)
    job = build_job(cfg)
    algorithm = PromptFLFT(cfg)
    torch.manual_seed(cfg.seed)
    module = algorithm.build_module(job.backbone, job.bundle.classnames)
    orchestrator = job.orchestrator(tmp_path / "run", built=(algorithm, module))
    orchestrator.run()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    server = ServerState.from_dict(ckpt["server"])
    store = {int(c): StoreEntry.from_dict(e) for c, e in ckpt["store"].items()}
    before = server.global_state["ctx"].clone()
    initial = orchestrator.initial
    tuner = LocalTrainer(module, job.data, seed=cfg.seed, local_epochs=algorithm.finetune_epochs())

    def finetune(clients: list[int]) -> dict:
        plans = {c: algorithm.eval_plan(server, c, store.get(c), initial) for c in clients}
        return tuner.train(plans, server.round)

    everyone, alone = finetune([0, 1, 2, 3]), finetune([3])
    assert torch.equal(alone[3].state.params[PROMPT], everyone[3].state.params[PROMPT])  # layout-independent
    assert torch.equal(server.global_state["ctx"], before)  # the server state is untouched
    tuned = [everyone[c].state.params[PROMPT] for c in range(4)]
    assert all(not torch.equal(t, before) for t in tuned)
    assert all(not torch.equal(tuned[0], t) for t in tuned[1:])  # each client's own data
    assert all(everyone[c].steps == 2 * cfg.fed.local_epochs for c in range(4))  # 64 train images, batch 32

    def mean_accuracy(prompts: list[torch.Tensor]) -> float:
        part, data, accs = job.partition, job.data, []
        for c, prompt in enumerate(prompts):
            index = torch.as_tensor(part.test_indices[c], dtype=torch.long)
            plan = algorithm.eval_plan(server, c, None, initial)
            plan.start.params[PROMPT] = prompt
            correct, total = accuracy_counts(tuner, plan, data.test_inputs(index), data.test_labels[index])
            accs.append(correct / total)
        return sum(accs) / len(accs)

    assert mean_accuracy(tuned) > mean_accuracy([before] * 4)  # fine-tuning personalises


def test_promptfl_ft_trains_as_promptfl_and_evaluates_finetuned_prompts(tmp_path):
    [ft] = run_experiment(fast_config(tmp_path / "ft", "algorithm=promptfl_ft", "fed.rounds=2", *LEARNS))
    [plain] = run_experiment(fast_config(tmp_path / "plain", "algorithm=promptfl", "fed.rounds=2", *LEARNS))
    assert [r["loss"] for r in ft["rounds"]] == [r["loss"] for r in plain["rounds"]]
    assert [r["acc_global"] for r in ft["rounds"]] == [r["acc_global"] for r in plain["rounds"]]
    assert ft["final"]["last_round"] > plain["final"]["last_round"]
    a = load_checkpoint(only_run_dir(tmp_path / "ft") / "checkpoint.pt")["server"]["global_state"]["ctx"]
    b = load_checkpoint(only_run_dir(tmp_path / "plain") / "checkpoint.pt")["server"]["global_state"]["ctx"]
    assert torch.equal(a, b)  # the fine-tuning never reaches the server state


def test_finetuned_evaluation_does_not_depend_on_the_order_clients_are_visited(tmp_path, monkeypatch):
    from fedlit.federation import evaluation

    [straight] = run_experiment(fast_config(tmp_path / "a", "algorithm=promptfl_ft", "fed.rounds=1", *LEARNS))
    assign = evaluation.assign_to_ranks
    monkeypatch.setattr(evaluation, "assign_to_ranks", lambda *a: [s[::-1] for s in assign(*a)])
    [reversed_] = run_experiment(fast_config(tmp_path / "b", "algorithm=promptfl_ft", "fed.rounds=1", *LEARNS))
    assert straight["rounds"][-1]["accuracy"] == reversed_["rounds"][-1]["accuracy"]
