"""The command line: help, resolved config, and one clear line + exit code 2 on bad input (no run dir left)."""

from __future__ import annotations

import pytest

from fedlit.cli import main
from fedlit.config import load_config, valid_keys
from tests.helpers import FAST, cache_dir, train_cli

BAD_INPUTS = [
    (["fed.roundz=3"], "unknown config key 'fed.roundz'; did you mean fed.rounds"),
    (["data.num_client=3"], "did you mean data.num_clients"),
    (["fed.rounds=many"], "fed.rounds"),
    (["prompt.class_specific=maybe"], "prompt.class_specific"),
    (["method.num_experts=9"], "method.num_experts=9 exceeds data.num_clients=4"),
    (["fed.frac=0"], "fed.frac must be in (0, 1]"),
    (["fed.frac=1.5"], "fed.frac must be in (0, 1]"),
    (["data.shots=50"], "data.shots=50 but class"),
    (["algorithm=fedsgd"], "unknown algorithm 'fedsgd'"),
    (["data.name=imagenet42"], "imagenet42"),
    (["data.name=cifar10", "data.root=/nonexistent/fedlit-data"], "/nonexistent/fedlit-data"),
    (["backbone.name=ViT-B-99"], "unknown backbone 'ViT-B-99'"),
    (["backbone.name=tiny", "backbone.pretrained=/nonexistent/w.pt"], "/nonexistent/w.pt"),
    (["gate.d_gate=48"], "d_gate=48"),
    (["prompt.n_ctx=0"], "prompt.n_ctx must be >= 1"),
    (["notakey"], "not of the form key=value"),
]


@pytest.mark.parametrize("overrides,expected", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_leaves_no_run_dir(tmp_path, capsys, overrides, expected):
    out_dir = tmp_path / "runs"
    code = main(FAST + [f"run.out_dir={out_dir}", f"backbone.cache_dir={cache_dir()}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err, err
    assert not out_dir.exists()


def test_missing_config_file_is_one_line(capsys):
    assert main(["--config", "/nonexistent/fedlit.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "error: config file not found: /nonexistent/fedlit.yaml"


def test_subprocess_exit_code_and_help():
    bad = train_cli("fed.roundz=3")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: unknown config key")
    helped = train_cli("--help")
    assert helped.returncode == 0 and "algorithm=pfedmoap|promptfl" in helped.stdout


def test_config_files_and_overrides_merge_over_typed_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("fed:\n  rounds: 7\nprompt:\n  ctx_init: a photo of a\n")
    cfg = load_config(path, ["fed.frac=0.5", "prompt.class_specific=false", "gate.top_k=1"])
    assert (cfg.fed.rounds, cfg.fed.frac, cfg.prompt.ctx_init, cfg.gate.top_k) == (7, 0.5, "a photo of a", 1)
    assert cfg.prompt.class_specific is False and cfg.fed.local_epochs == 5
    assert "method.num_experts" in valid_keys() and "run.resume" in valid_keys()


def test_the_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.rglob("*.yaml")):
        if "sweeps" in path.parts:
            continue
        load_config(path)
