"""The offline default on the pretrained shapes CLIP: the sanity gate and the papers' ordering under label skew.

Builds (or reuses) the cached shapes-clip backbone: about 2 minutes the first time on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from fedlit.config import ALGORITHMS, load_config
from fedlit.federation.experiment import build_job, run_experiment
from fedlit.sanity import check_zero_shot, zero_shot_accuracy
from tests.helpers import cache_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes_job():
    cfg = load_config("configs/default.yaml", [f"backbone.cache_dir={cache_dir()}", "run.quiet=true"])
    job = build_job(cfg)
    return cfg, (job.backbone, job.bundle, job.partition, job.data)


def test_sanity_gate_passes_aligned_names_and_stops_permuted_ones(shapes_job):
    _, (backbone, bundle, _, data) = shapes_job
    aligned = zero_shot_accuracy(backbone, bundle.classnames, data.test_features, data.test_labels)
    check_zero_shot(aligned, bundle.num_classes, bundle.name)  # well above chance: no error
    permuted = [bundle.classnames[i] for i in torch.randperm(bundle.num_classes,
                                                             generator=torch.Generator().manual_seed(0))]
    shifted = zero_shot_accuracy(backbone, permuted, data.test_features, data.test_labels)
    assert aligned > 0.25 and shifted < aligned / 3
    with pytest.raises(ValueError, match="chance level for 32 classes: class names are probably misaligned"):
        check_zero_shot(shifted, bundle.num_classes, bundle.name)


def test_quickstart_shows_the_papers_ordering(tmp_path):
    cfg = load_config("configs/default.yaml", [f"backbone.cache_dir={cache_dir()}", "run.quiet=true",
                                               f"run.out_dir={tmp_path}", "algorithm=all"])
    final = {r["algorithm"]: r["final"]["last_round"] for r in run_experiment(cfg)}
    assert final["zeroshot"] < final["promptfl"] < final["pfedmoap"], final
    assert set(final) == set(ALGORITHMS)  # every method runs end to end on the offline default
    assert all(final[m] > final["zeroshot"] for m in final if m != "zeroshot"), final
    # the personalised methods beat the one global prompt on this label-skewed split
    assert all(final[m] > final["promptfl"] + 0.05 for m in ("promptfl_ft", "promptfolio", "fedper",
                                                              "pfedmoap_linear", "coop_local")), final


def test_base_to_novel_on_the_offline_default(tmp_path):
    cfg = load_config("configs/default.yaml", [f"backbone.cache_dir={cache_dir()}", "run.quiet=true",
                                               f"run.out_dir={tmp_path}", "algorithm=pfedmoap", "fed.rounds=3",
                                               "eval.protocol=base2novel"])
    [res] = run_experiment(cfg)
    last = res["rounds"][-1]
    # trained on the 16 base classes: base accuracy far above the untrained novel classes, which the pretrained
    # text tower still recognises well above chance (1/16) through the prompt learned on the base classes
    assert last["acc_mean"] > last["acc_novel_mean"] + 0.2
    assert last["acc_novel_mean"] > 2 / 16
    assert last["hm_of_means"] == pytest.approx(
        2 * last["acc_mean"] * last["acc_novel_mean"] / (last["acc_mean"] + last["acc_novel_mean"]))
