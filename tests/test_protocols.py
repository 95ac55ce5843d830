"""Generalisation protocols (#20): ``eval.protocol=heldout`` (seeded clients that never train: the participation
gap) and ``eval.protocol=transfer`` (the global prompt on other datasets and domains, with their class names), in
results.json, metrics.csv, ``fedlit compare`` and ``fedlit plot``; bad input is one line, exit 2."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlit.cli import main as train_main
from fedlit.command import main
from fedlit.config import DataConfig, heldout_count
from fedlit.data.features import encode_dataset
from fedlit.data.registry import build_dataset
from fedlit.federation.checkpoint import CHECKPOINT_NAME
from fedlit.federation.evaluation import accuracy_counts
from fedlit.federation.experiment import build_job
from fedlit.federation.sampling import SAMPLING_STREAM, evaluation_subset, heldout_clients, sample_clients
from fedlit.modules import CoOpClient
from fedlit.state import PROMPT
from tests.helpers import FAST, cache_dir, fast_config, only_run_dir, read_results, train_cli
from tests.test_datasets import CIFAR10_NAMES, cifar_batch, cifar_meta, make_office

HELDOUT = ["data.num_clients=5", "eval.protocol=heldout", "eval.heldout_fraction=0.4", "fed.rounds=2",
           "data.partition=iid"]
TARGETS = "eval.transfer_datasets=[cifar10,office_caltech10:amazon,shapes:0.5]"


def make_cifar10(root: Path, test_labels: list[int]) -> None:
    """CIFAR-10 python batches as the real files are: two train images per batch and ``test_labels`` test images."""
    folder = root / "cifar-10-batches-py"
    for b in range(5):
        cifar_batch(folder / f"data_batch_{b + 1}", [2 * b, 2 * b + 1], start=2 * b)
    cifar_batch(folder / "test_batch", test_labels, start=20)
    cifar_meta(folder / "batches.meta", "label_names", CIFAR10_NAMES)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A data.root with small CIFAR-10 and Office-Caltech10 files."""
    root = tmp_path_factory.mktemp("data")
    make_cifar10(root, [int(v) for v in np.random.default_rng(0).integers(0, 10, 40)])
    make_office(root)
    return root


@pytest.fixture(scope="module")
def heldout_run(tmp_path_factory):
    """A pFedMoAP run holding out 2 of 5 clients; returns (orchestrator, job, run directory)."""
    root = tmp_path_factory.mktemp("heldout")
    job = build_job(fast_config(root, "algorithm=pfedmoap", *HELDOUT))
    orchestrator = job.orchestrator(root / "run")
    orchestrator.run()
    return orchestrator, job, root / "run"


@pytest.fixture(scope="module")
def transfer_runs(tmp_path_factory, data_root):
    """PromptFL and CoOp local trained on shapes, evaluated on CIFAR-10, Office-Caltech10's amazon domain and dark
    shapes; returns {algorithm: (orchestrator, job, run directory)}."""
    root = tmp_path_factory.mktemp("transfer")
    runs = {}
    for name in ("promptfl", "coop_local"):
        job = build_job(fast_config(root, f"algorithm={name}", "fed.rounds=2", "eval.protocol=transfer", TARGETS,
                                    f"data.root={data_root}"))
        orchestrator = job.orchestrator(root / name)
        orchestrator.run()
        runs[name] = (orchestrator, job, root / name)
    return runs


def test_heldout_clients_are_seeded_and_never_sampled():
    held = heldout_clients(3, 10, 2)
    assert held == heldout_clients(3, 10, 2) and len(held) == 2 and held == sorted(held)
    assert len({tuple(heldout_clients(s, 10, 2)) for s in range(10)}) > 1  # the seed chooses them
    for r in range(1, 60):
        sampled = sample_clients(3, r, 10, 0.5, held)
        assert len(sampled) == 4 and not set(sampled) & set(held)  # floor(0.5 x 8) of the 8 others
        assert not set(evaluation_subset(3, r, 10, 3, held)) & set(held)
        # with nothing excluded the draw is the one over 0..N-1, as before held-out clients existed
        rng = np.random.default_rng([3, r, SAMPLING_STREAM])
        assert sample_clients(3, r, 10, 0.5) == sorted(int(i) for i in rng.choice(10, size=5, replace=False))
    counts = [heldout_count(n, f) for n, f in ((5, 0.4), (4, 0.2), (4, 0.1), (10, 0.25))]
    assert counts == [2, 1, 0, 3]  # round(f x N), half up


def test_heldout_clients_never_train(heldout_run):
    orchestrator, job, run_dir = heldout_run
    res = read_results(run_dir)
    held = heldout_clients(0, 5, 2)
    assert res["heldout_clients"] == held == orchestrator.heldout
    state = orchestrator._restore(run_dir / CHECKPOINT_NAME)
    assert set(state.store.ids()) == set(range(5)) - set(held)  # every other client trained (fed.frac=1)
    assert [row["clients"] for row in res["rounds"]] == [3, 3]


def test_the_gap_is_the_difference_of_the_two_means(heldout_run):
    orchestrator, job, run_dir = heldout_run
    res = read_results(run_dir)
    held = res["heldout_clients"]
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    for row, line in zip(res["rounds"], rows):
        acc = row["accuracy"]
        participating = float(np.mean([acc[c] for c in range(5) if c not in held]))
        heldout = float(np.mean([acc[c] for c in held]))
        assert row["acc_mean"] == participating and row["acc_heldout"] == heldout
        assert row["participation_gap"] == participating - heldout
        assert float(line["acc_heldout"]) == heldout and float(line["participation_gap"]) == participating - heldout
    final = res["final"]
    assert final["participation_gap"]["last_round"] == res["rounds"][-1]["participation_gap"]
    # a held-out client is evaluated with the method's model for a client that never trained: the global model
    state = orchestrator._restore(run_dir / CHECKPOINT_NAME)
    plan = orchestrator.algorithm.global_plan(state.server, orchestrator.initial)
    data = orchestrator.trainer.data
    for cid in held:
        index = torch.as_tensor(job.partition.test_indices[cid], dtype=torch.long)
        correct, total = accuracy_counts(orchestrator.trainer, plan, data.test_inputs(index), data.test_labels[index])
        assert res["rounds"][-1]["accuracy"][cid] == correct / total


def direct_accuracy(job, global_prompt: torch.Tensor, cfg: DataConfig, domain: str | None = None) -> float:
    """The global prompt in a CoOp client built for ``cfg``'s dataset, on its test images (``domain``: of that
    domain only), encoded here without the feature cache."""
    bundle = build_dataset(cfg, job.backbone.preprocess)
    keep = np.arange(len(bundle.test)) if domain is None else \
        np.flatnonzero(bundle.test.domains == bundle.domain_names.index(domain))
    features = encode_dataset(job.backbone, bundle.test)[torch.as_tensor(keep)]
    module = CoOpClient(job.backbone, bundle.classnames, prompt=job.cfg.prompt, seed=job.cfg.seed)
    module.load_client_state({PROMPT: global_prompt})
    module.eval()
    with torch.no_grad():
        predicted = module(features).argmax(-1)
    return float((predicted == torch.as_tensor(bundle.test.targets[keep])).double().mean())


def test_transfer_accuracy_is_the_global_prompt_on_each_target(transfer_runs, data_root):
    orchestrator, job, run_dir = transfer_runs["promptfl"]
    res = read_results(run_dir)
    state = orchestrator._restore(run_dir / CHECKPOINT_NAME)
    prompt = state.server.global_state["ctx"]
    last = res["rounds"][-1]
    shapes = DataConfig(root=str(data_root), train_per_class=8, test_per_class=4, shapes_brightness=0.5)
    expected = {"cifar10": direct_accuracy(job, prompt, DataConfig(name="cifar10", root=str(data_root))),
                "office_caltech10:amazon": direct_accuracy(job, prompt, DataConfig(name="office_caltech10",
                                                                                   root=str(data_root)), "amazon"),
                "shapes:0.5": direct_accuracy(job, prompt, shapes)}
    assert {k: last[f"transfer/{k}"] for k in expected} == expected
    # what each target's module evaluated last is the final global prompt (not the initial one)
    assert not torch.equal(prompt, orchestrator.initial.params[PROMPT])
    assert all(torch.equal(m.trainer.module.client_state()[PROMPT], prompt) for m in orchestrator.transfer)
    assert last["acc_transfer"] == float(np.mean(list(expected.values())))
    # every test image of CIFAR-10 and of dark shapes; amazon's share of Office-Caltech10 (1 of 5 per class)
    assert [len(m.target.labels) for m in orchestrator.transfer] == [40, 10, 128]
    header = next(csv.reader((run_dir / "metrics.csv").open()))
    targets = {f"transfer/{k}" for k in expected}
    assert targets | {"acc_transfer"} <= set(header)
    assert res["final"]["transfer/cifar10"]["last_round"] == last["transfer/cifar10"]


def test_a_method_without_global_prompt_has_no_transfer_numbers(transfer_runs):
    _, _, run_dir = transfer_runs["coop_local"]
    res = read_results(run_dir)
    assert all(row["transfer/cifar10"] is None and row["acc_transfer"] is None for row in res["rounds"])
    assert not any(k.startswith("transfer") or k == "acc_transfer" for k in res["final"])
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert rows and all(r["transfer/cifar10"] == "" and r["acc_transfer"] == "" for r in rows)


def test_compare_and_plot_report_both_protocols(heldout_run, transfer_runs, tmp_path, capsys):
    dirs = [str(heldout_run[2]), *(str(r[2]) for r in transfer_runs.values())]
    assert main(["compare", *dirs, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    by = {(r["algorithm"], r["metric"], r["summary"]): r for r in rows}
    held = read_results(heldout_run[2])["final"]
    assert float(by["pfedmoap", "participation_gap", "last_round"]["mean"]) == \
        pytest.approx(100 * held["participation_gap"]["last_round"], abs=0.006)
    assert ("pfedmoap", "acc_heldout", "last_round") in by
    transfer = read_results(transfer_runs["promptfl"][2])["final"]
    assert float(by["promptfl", "transfer/office_caltech10:amazon", "last_round"]["mean"]) == \
        pytest.approx(100 * transfer["transfer/office_caltech10:amazon"]["last_round"], abs=0.006)
    assert not [k for k in by if k[0] == "coop_local" and "transfer" in k[1]]  # NA: no row
    assert main(["compare", *dirs]) == 0
    assert "participation gap" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert main(["plot", *dirs, "--out", str(tmp_path / "figs")]) == 0
    names = {Path(p).name for p in capsys.readouterr().out.split()}
    assert {"heldout.png", "heldout.pdf", "transfer.png", "transfer.pdf"} <= names


BAD = [
    (["eval.protocol=heldout", "eval.heldout_fraction=0.1"], "holds out no client"),
    (["eval.protocol=heldout", "eval.heldout_fraction=0.9"], "leaves none to train"),
    (["eval.protocol=heldout", "eval.heldout_fraction=1.5"], "eval.heldout_fraction must be in (0.0, 1.0)"),
    (["eval.protocol=heldout", "method.num_experts=4"], "method.num_experts=4 exceeds the 3 clients that train"),
    (["eval.heldout_fraction=0.5"], "eval.heldout_fraction is read by eval.protocol=heldout only"),
    (["eval.protocol=base2novel", "eval.transfer_datasets=[cifar10]"],
     "eval.transfer_datasets is read by eval.protocol=transfer only"),
    (["eval.protocol=transfer"], "eval.protocol=transfer needs eval.transfer_datasets"),
    (["eval.protocol=transfer", "eval.transfer_datasets=[imagenet]"], "unknown dataset 'imagenet'"),
    (["eval.protocol=transfer", "eval.transfer_datasets=[shapes]"], "is the training data"),
    (["eval.protocol=transfer", "eval.transfer_datasets=[shapes:1]"], "is the training data itself"),
    (["eval.protocol=transfer", "eval.transfer_datasets=[shapes:1.5]"], "a brightness in (0, 1]"),
    (["eval.protocol=transfer", "eval.transfer_datasets=[cifar10:sketch]"], "cifar10 has no domains"),
    (["eval.protocol=transfer", "eval.transfer_datasets=[office_caltech10:moon]"], "unknown domain 'moon'"),
    (["eval.protocol=transfer", "eval.transfer_datasets=[cifar10,cifar10]"], "lists cifar10 more than once"),
    (["eval.protocol=transfer", "eval.transfer_datasets=[cifar10]", "prompt.class_specific=true"],
     "prompt.class_specific=false"),
    (["eval.protocol=transfer", "eval.transfer_datasets=[cifar10]", "data.root=/nonexistent/fedlit-data"],
     "CIFAR-10 not found"),
    (["eval.protocol=heldout+transfer"], "eval.protocol must be one of standard, base2novel, heldout, transfer"),
]


@pytest.mark.parametrize("overrides,expected", BAD)
def test_bad_input_is_one_line_exit_2_before_anything_is_written(tmp_path, capsys, overrides, expected):
    out_dir = tmp_path / "runs"
    code = train_main(FAST + [f"run.out_dir={out_dir}", f"backbone.cache_dir={cache_dir()}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not out_dir.exists()


@pytest.mark.multiprocess
def test_heldout_results_do_not_depend_on_the_process_layout(tmp_path):
    """Held-out clients, their evaluation beside a per-round subset and the gap: bitwise the same on 1 and 2
    gloo processes."""
    job = FAST + [f"backbone.cache_dir={cache_dir()}", "algorithm=pfedmoap", "eval.protocol=heldout",
                  "eval.heldout_fraction=0.25", "fed.frac=0.67", "eval.clients=1", "trainer.accelerator=cpu"]
    results = []
    for devices in (1, 2):
        done = train_cli(*job, f"trainer.devices={devices}", f"run.out_dir={tmp_path / str(devices)}")
        assert done.returncode == 0, done.stderr[-3000:]
        res = read_results(only_run_dir(tmp_path / str(devices)))
        assert res.pop("world_size") == devices
        res.pop("memory_per_client_bytes")  # the process's own allocations, not a result
        results.append(res)
    assert results[0] == results[1]
    first, held = results[0]["rounds"][0], set(results[0]["heldout_clients"])
    assert len(held) == 1 and held < set(first["evaluated_clients"]) and len(first["evaluated_clients"]) == 2
