"""run.loggers: Lightning's CSV and TensorBoard loggers receive every number of each evaluated round (read back from
the files they write), without changing metrics.csv or results.json; the console and the progress bars."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedlit.config import ConfigError
from fedlit.data.features import encode_dataset
from fedlit.federation.experiment import run_experiment
from fedlit.loggers import expert_slot_means, round_scalars
from tests.helpers import fast_config, only_run_dir

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# pFedMoAP with central DP (the rows carry epsilon), the gate's expert attention recorded, evaluated in rounds 2, 3
RUN = ["algorithm=pfedmoap", "eval.diagnostics=true", "fed.eval_every=2", "privacy.clip=0.1",
       "privacy.noise_multiplier=0.5"]


def scalar_keys(entry: dict) -> list[str]:
    """The numbers of one round of results.json (what the loggers must carry)."""
    return [k for k, v in entry.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)]


def read_tensorboard(log_dir: Path) -> EventAccumulator:
    """Every scalar and histogram of the TensorBoard event files under ``log_dir``."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    """The run directory of one tiny run with run.loggers=[csv,tensorboard]."""
    out = tmp_path_factory.mktemp("logged")
    run_experiment(fast_config(out, *RUN, "run.loggers=[csv,tensorboard]"))
    return only_run_dir(out)


def test_tensorboard_scalars_equal_results_json(logged):
    results = json.loads((logged / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [2, 3] and all("epsilon" in r for r in rounds)
    events = read_tensorboard(logged / "logs" / "tensorboard" / "version_0")
    tags = set(events.Tags()["scalars"])
    for entry in rounds:
        step = entry["round"]
        for key in scalar_keys(entry):
            assert key in tags, key
            [value] = [e.value for e in events.Scalars(key) if e.step == step]
            assert value == pytest.approx(entry[key], rel=1e-6, abs=1e-7), (key, step)
        weights = np.asarray(entry["diagnostics"]["expert_attention"])  # (clients, K + 1), local expert first
        for slot, mean in enumerate(weights.mean(axis=0)):
            [value] = [e.value for e in events.Scalars(f"expert_attention/slot_{slot}") if e.step == step]
            assert value == pytest.approx(mean, rel=1e-6)
        [histogram] = [e.histogram_value for e in events.Histograms("client_accuracy") if e.step == step]
        accuracies = entry["accuracy"]
        assert histogram.num == len(accuracies) and histogram.sum == pytest.approx(sum(accuracies))
    # round 1 is not evaluated: only its loss, clients and seconds are logged
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("acc_mean")] == [2, 3]


def test_csv_logger_rows_equal_results_json(logged):
    results = json.loads((logged / "results.json").read_text())
    with (logged / "logs" / "csv" / "version_0" / "metrics.csv").open() as f:
        rows = {int(row["step"]): row for row in csv.DictReader(f)}
    assert sorted(rows) == [1, 2, 3]
    for entry in results["rounds"]:
        row = rows[entry["round"]]
        assert {k: float(row[k]) for k in scalar_keys(entry)} == {k: float(entry[k]) for k in scalar_keys(entry)}
    assert rows[1]["acc_mean"] == "" and float(rows[1]["loss"]) > 0


def test_loggers_change_neither_metrics_csv_nor_results_json(logged, tmp_path):
    run_experiment(fast_config(tmp_path, *RUN, "run.loggers=[]"))
    plain = only_run_dir(tmp_path)
    assert not (plain / "logs").exists()
    assert (plain / "results.json").read_bytes() == (logged / "results.json").read_bytes()
    header = (plain / "metrics.csv").read_text().splitlines()[0]
    assert (logged / "metrics.csv").read_text().splitlines()[0] == header
    assert "epsilon" in header.split(",")


def test_a_resumed_run_logs_into_the_next_version(logged, tmp_path):
    out = tmp_path / "resumed"
    first = fast_config(out, *RUN, "fed.rounds=2", "run.loggers=[csv]")
    run_experiment(first)
    run_experiment(fast_config(out, *RUN, "fed.rounds=3", "run.loggers=[csv]", "run.resume=auto"))
    logs = only_run_dir(out) / "logs" / "csv"
    steps = [[int(row["step"]) for row in csv.DictReader((logs / v / "metrics.csv").open())]
             for v in ("version_0", "version_1")]
    assert steps == [[1, 2], [3]]


def test_round_scalars_flatten_numbers_and_average_expert_slots():
    row = {"round": 4, "loss": None, "clients": 3, "acc_mean": 0.5, "flag": True, "name": "x",
           "domains": {"sketch": {"mean": 0.25, "std": 0.0}}}
    diagnostics = {"expert_attention": [[0.5, 0.5], None, [0.25, 0.75, 0.0]]}
    assert round_scalars(row, diagnostics) == {
        "clients": 3.0, "acc_mean": 0.5, "domains/sketch/mean": 0.25, "domains/sketch/std": 0.0,
        "expert_attention/slot_0": 0.375, "expert_attention/slot_1": 0.625, "expert_attention/slot_2": 0.0}
    assert expert_slot_means([None]) == {}


@pytest.mark.parametrize(("value", "expected"), [
    ("[csv,tensorboard,csv]", "run.loggers lists csv more than once"),
    ("[csv,mlflow]", "unknown run.loggers entry 'mlflow'; choose among csv, tensorboard, wandb"),
    ("tensorboard", "must be a list in brackets, e.g. run.loggers=[a,b] (got 'tensorboard')"),
])
def test_bad_loggers_are_one_line_config_errors(tmp_path, value, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)) as err:
        fast_config(tmp_path, f"run.loggers={value}")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_names_the_install(tmp_path):
    with pytest.raises(ConfigError, match=r"^run.loggers=wandb needs a package that is not installed: pip install "
                                          r"wandb$"):
        fast_config(tmp_path, "run.loggers=[wandb]")


def test_console_is_one_summary_line_and_quiet_keeps_the_results_path(tmp_path, capsys):
    run_experiment(fast_config(tmp_path / "loud", "algorithm=promptfl", "fed.rounds=1", "run.quiet=false"))
    out = capsys.readouterr()
    run_dir = only_run_dir(tmp_path / "loud")
    lines = out.out.splitlines()
    assert lines[0] == (f"fedlit | shapes (32 classes) | 4 clients (pathological) | 1 round | promptfl | backbone "
                        f"tiny | 1 process, 32-true | {run_dir}")
    assert lines[-1] == f"fedlit | results in {run_dir}"
    assert "fed:" not in out.out and "rounds: 1" in (run_dir / "config.yaml").read_text()  # the YAML: on disk only
    assert "\r" not in out.err + out.out  # no bars: the test's stderr is not a terminal

    run_experiment(fast_config(tmp_path / "quiet", "algorithm=promptfl", "fed.rounds=1"))  # FAST is run.quiet=true
    out = capsys.readouterr()
    assert out.out == f"fedlit | results in {only_run_dir(tmp_path / 'quiet')}\n" and "\r" not in out.err


def test_feature_bar_is_drawn_only_on_a_terminal(monkeypatch, capsys):
    from fedlit import progress
    from fedlit.backbone import load_backbone

    backbone = load_backbone("tiny")
    images = TensorDataset(torch.randn(6, 3, 32, 32), torch.zeros(6))
    plain = encode_dataset(backbone, images, batch_size=4, progress=True, desc="test features")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    drawn = encode_dataset(backbone, images, batch_size=4, progress=True, desc="test features")
    err = capsys.readouterr().err
    assert "test features:" in err and "/6 " in err and err.endswith("\r")  # drawn, then removed
    assert torch.equal(plain, drawn)
    encode_dataset(backbone, images, batch_size=4, progress=False, desc="test features")  # run.quiet or rank > 0
    assert capsys.readouterr().err == ""


@pytest.mark.multiprocess
def test_two_processes_print_only_the_results_line_and_log_once(tmp_path):
    from tests.helpers import FAST, cache_dir, only_run_dir, train_cli

    done = train_cli(*FAST, f"backbone.cache_dir={cache_dir()}", "algorithm=promptfl", "trainer.devices=2",
                     f"run.out_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert done.stdout == f"fedlit | results in {run_dir}\n"  # run.quiet: rank 0 the results path, rank 1 nothing
    logs = run_dir / "logs" / "csv"
    assert [p.name for p in logs.iterdir()] == ["version_0"]  # the default csv logger: written once, by rank 0
    rows = list(csv.DictReader((logs / "version_0" / "metrics.csv").open()))
    assert [int(row["step"]) for row in rows] == [1, 2, 3]


def test_tensorboard_carries_the_resolved_config_as_hparams(logged):
    from tensorboard.plugins.hparams import plugin_data_pb2

    from fedlit.loggers import flat_hparams

    events = read_tensorboard(logged / "logs" / "tensorboard" / "version_0")
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    logged_values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    cfg = fast_config(logged.parents[1], *RUN, "run.loggers=[csv,tensorboard]")
    expected = {**flat_hparams(asdict(cfg)), "algorithm": "pfedmoap"}
    assert set(logged_values) == set(expected) and "fed.rounds" in expected and "privacy.clip" in expected
    for key, value in expected.items():
        got = logged_values[key]
        assert (got == pytest.approx(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool)
                else got == value), (key, got, value)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["acc_mean", "acc_global", "acc_worst10", "loss"]


class RecordingWandbLogger:
    """Stands in for lightning's WandbLogger (wandb is not installed): records its arguments and what it is sent."""

    made: list[dict] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.metrics: list[tuple[int, dict]] = []
        RecordingWandbLogger.made.append(self.__dict__)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def save(self) -> None:
        pass


def test_wandb_gets_the_config_and_a_name_group_and_tags_to_filter_by(tmp_path, monkeypatch):
    import lightning.pytorch.loggers

    from fedlit import loggers

    monkeypatch.setattr(loggers, "PACKAGES", {**loggers.PACKAGES, "wandb": ()})  # as if wandb were installed
    monkeypatch.setattr(lightning.pytorch.loggers, "WandbLogger", RecordingWandbLogger)
    monkeypatch.setattr(RecordingWandbLogger, "made", [])
    cfg = fast_config(tmp_path, "algorithm=all", "fed.rounds=1", "seed=3", "run.name=abl", "run.loggers=[wandb]")
    results = run_experiment(cfg)
    made = RecordingWandbLogger.made
    assert [m["kwargs"]["name"] for m in made] == [f"abl-{r['algorithm']}-seed3" for r in results]
    for record, result in zip(made, results):
        algorithm = result["algorithm"]
        kwargs = record["kwargs"]
        assert {k: kwargs[k] for k in ("project", "group", "tags")} == {
            "project": "fedlit", "group": f"shapes-{algorithm}", "tags": [algorithm, "shapes", "seed-3"]}
        assert kwargs["config"] == {**asdict(cfg), "algorithm": algorithm}
        assert kwargs["save_dir"] == str(only_run_dir(tmp_path, "abl") / algorithm / "logs")
        [(step, metrics)] = record["metrics"]
        assert step == result["rounds"][-1]["round"] and metrics["acc_mean"] == result["rounds"][-1]["acc_mean"]
