"""Malformed invocations of the command line: each one exits with code 2 and exactly one line ``error: ...`` on
stderr (no traceback), and creates nothing under ``run.out_dir`` nor anywhere else under ``tmp_path``.

The cases run in-process (``fedlit.cli.main`` returns the exit code) on the fast settings of tests/helpers.py, so
that one which wrongly passed validation would still end quickly. Cases of stage ``config`` must be refused by
``load_config`` itself (checked separately), ``args`` by the argument parser, and ``run`` by the checks that need
the backbone or the dataset, still before the run directory exists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from fedlit.cli import main
from fedlit.config import ConfigError, load_config
from tests.helpers import FAST, cache_dir

DIR = object()  # marks a folder in a case's input files
ESCAPE = "../../escape"  # $FEDLIT_FUZZ_ESCAPE: an environment variable used to leave run.out_dir
NAME_RULE = "must be a plain folder name of 1-100 characters"
RESUME_HINT = "use run.resume=auto or the path of a run directory"


class Case(NamedTuple):
    id: str
    overrides: list[str]
    expect: str  # a fragment of the error line; "{in}" stands for the case's input folder
    stage: str = "config"  # config | args | run
    files: dict | None = None  # input files (path under {in} -> text, bytes or DIR)
    config: str | None = None  # --config file under {in}
    options: list[str] | None = None  # argv after everything else


def yaml_case(id: str, text: str | bytes, expect: str) -> Case:
    """A case whose --config file holds ``text``."""
    return Case(id, [], expect, files={"c.yaml": text}, config="c.yaml")


CASES = [
    # unknown keys and malformed overrides
    Case("unknown-key", ["fed.roundz=3"], "unknown config key 'fed.roundz'; did you mean fed.rounds"),
    Case("unknown-leaf", ["optim.lr=0.1"], "unknown config key 'optim.lr'"),
    Case("unknown-deep-key", ["fed.rounds.x=3"], "unknown config key 'fed.rounds.x'"),
    Case("section-override", ["data=3"], "'data' is a section, not a value; set its keys instead, e.g. data.name="),
    Case("no-equals", ["notakey"], "override 'notakey' is not of the form key=value"),
    Case("empty-key", ["=3"], "unknown config key ''"),
    Case("unparsable-value", ["method.template={{}}"], "override 'method.template={{}}': found unhashable key"),
    # wrong types
    Case("int-word", ["fed.rounds=many"], "bad value for 'fed.rounds'"),
    Case("int-float", ["fed.rounds=1.5"], "bad value for 'fed.rounds'"),
    Case("int-null", ["fed.rounds=null"], "bad value for 'fed.rounds'"),
    Case("int-list", ["data.batch_size=[1,2]"], "bad value for 'data.batch_size'"),
    Case("int-bool", ["gate.top_k=true"], "bad value for 'gate.top_k'"),
    Case("float-word", ["optim.prompt_lr=fast"], "bad value for 'optim.prompt_lr'"),
    Case("bool-word", ["prompt.class_specific=maybe"], "'prompt.class_specific': must be true or false (got 'maybe')"),
    Case("bool-int", ["run.quiet=2"], "'run.quiet': must be true or false (got 2)"),
    Case("str-bool", ["prompt.ctx_init=false"], "'prompt.ctx_init': must be a string, not the boolean false"),
    # out of range or not finite, every section
    Case("seed-negative", ["seed=-1"], "seed must be >= 0 (got -1)"),
    Case("seed-huge", ["seed=99999999999"], "seed must be <= 4294967295"),
    Case("rounds-huge", ["fed.rounds=99999999999"], "fed.rounds must be <= 2147483647"),
    Case("n-ctx-zero", ["prompt.n_ctx=0"], "prompt.n_ctx must be >= 1 (got 0)"),
    Case("init-std-negative", ["prompt.init_std=-0.1"], "prompt.init_std must be >= 0.0 (got -0.1)"),
    Case("d-gate-zero", ["gate.d_gate=0"], "gate.d_gate must be >= 1 (got 0)"),
    Case("heads-zero", ["gate.num_heads=0"], "gate.num_heads must be >= 1 (got 0)"),
    Case("heads-negative", ["gate.num_heads=-8"], "gate.num_heads must be >= 1 (got -8)"),
    Case("heads-not-dividing", ["gate.d_gate=12"], "gate.d_gate=12 must be divisible by gate.num_heads=8"),
    Case("scale-inf", ["gate.scale=inf"], "gate.scale must be a finite number (got inf)"),
    Case("scale-nan", ["gate.scale=nan"], "gate.scale must be a finite number (got nan)"),
    Case("scale-zero", ["gate.scale=0"], "gate.scale must be > 0.0 (got 0.0)"),
    Case("top-k-zero", ["gate.top_k=0"], "gate.top_k must be >= 1 (got 0)"),
    Case("top-k-above-experts", ["gate.top_k=5"], "gate.top_k=5 exceeds method.num_experts=3"),
    Case("clients-zero", ["data.num_clients=0"], "data.num_clients must be >= 1 (got 0)"),
    Case("alpha-zero", ["data.alpha=0"], "data.alpha must be > 0.0 (got 0.0)"),
    Case("alpha-negative", ["data.alpha=-1"], "data.alpha must be > 0.0 (got -1.0)"),
    Case("domain-alpha-nan", ["data.domain_alpha=nan"], "data.domain_alpha must be a finite number (got nan)"),
    Case("shots-zero", ["data.shots=0"], "data.shots must be >= 1 (got 0)"),
    Case("min-size-zero", ["data.min_size=0"], "data.min_size must be >= 1 (got 0)"),
    Case("train-per-class-zero", ["data.train_per_class=0"], "data.train_per_class must be >= 1 (got 0)"),
    Case("test-per-class-negative", ["data.test_per_class=-1"], "data.test_per_class must be >= 1 (got -1)"),
    Case("brightness-above-one", ["data.shapes_brightness=1.5"], "data.shapes_brightness must be in (0.0, 1.0]"),
    Case("batch-size-zero", ["data.batch_size=0"], "data.batch_size must be >= 1 (got 0)"),
    Case("workers-negative", ["data.num_workers=-1"], "data.num_workers must be >= 0 (got -1)"),
    Case("rounds-zero", ["fed.rounds=0"], "fed.rounds must be >= 1 (got 0)"),
    Case("frac-zero", ["fed.frac=0"], "fed.frac must be in (0, 1] (got 0.0)"),
    Case("frac-nan", ["fed.frac=nan"], "fed.frac must be in (0, 1] (got nan)"),
    Case("epochs-zero", ["fed.local_epochs=0"], "fed.local_epochs must be >= 1 (got 0)"),
    Case("eval-every-zero", ["fed.eval_every=0"], "fed.eval_every must be >= 1 (got 0)"),
    Case("prompt-lr-negative", ["optim.prompt_lr=-0.1"], "optim.prompt_lr must be >= 0.0 (got -0.1)"),
    Case("gate-lr-inf", ["optim.gate_lr=inf"], "optim.gate_lr must be a finite number (got inf)"),
    Case("momentum-one", ["optim.momentum=1.0"], "optim.momentum must be in [0.0, 1.0) (got 1.0)"),
    Case("momentum-negative", ["optim.momentum=-0.1"], "optim.momentum must be in [0.0, 1.0) (got -0.1)"),
    Case("weight-decay-negative", ["optim.weight_decay=-1e-4"], "optim.weight_decay must be >= 0.0"),
    Case("experts-zero", ["method.num_experts=0"], "method.num_experts must be >= 1 (got 0)"),
    Case("experts-above-clients", ["method.num_experts=9"], "method.num_experts=9 exceeds data.num_clients=4"),
    Case("lam-nan", ["method.lam=nan"], "method.lam must be a finite number (got nan)"),
    Case("lam-minus-inf", ["method.lam=-inf"], "method.lam must be a finite number (got -inf)"),
    Case("mu-negative", ["algorithm=fedprox", "method.mu=-0.01"], "method.mu must be >= 0.0 (got -0.01)"),
    Case("client-batch-negative", ["perf.client_batch=-1"], "perf.client_batch must be >= 0 (got -1)"),
    Case("views-negative", ["perf.augmented_views=-2"], "perf.augmented_views must be >= 0 (got -2)"),
    Case("devices-zero", ["trainer.devices=0"], "trainer.devices must be >= 1 (got 0)"),
    Case("nodes-zero", ["trainer.num_nodes=0"], "trainer.num_nodes must be >= 1 (got 0)"),
    # choices
    Case("algorithm", ["algorithm=fedsgd"], "unknown algorithm 'fedsgd'"),
    Case("dataset", ["data.name=imagenet42"], "unknown data.name 'imagenet42'"),
    Case("partition", ["data.partition=powerlaw"], "unknown data.partition 'powerlaw'"),
    Case("domain-partition-without-domains", ["data.partition=domain"], "data.partition=domain needs a dataset with"),
    Case("class-position", ["prompt.class_position=back"], "prompt.class_position must be end, front or middle"),
    Case("selection", ["method.selection=best"], "method.selection must be knn or random (got 'best')"),
    Case("accelerator", ["trainer.accelerator=tpu"], "unknown trainer.accelerator 'tpu'"),
    Case("precision", ["trainer.precision=8-true"], "unknown trainer.precision '8-true'"),
    Case("strategy", ["trainer.strategy=fsdp"], "unknown trainer.strategy 'fsdp'"),
    Case("ctx-init-boolean-word", ["prompt.ctx_init='None'"], "prompt.ctx_init='None' looks like a boolean"),
    # zero-shot templates
    Case("template-no-slot", ["method.template=a photo of a"], "method.template must contain exactly one {}"),
    Case("template-two-slots", ["method.template=a {} and a {}."], "method.template must contain exactly one {}"),
    Case("template-named-slot", ["method.template=a {name}."], "method.template must contain exactly one {}"),
    Case("template-extra-brace", ["method.template=a {} {x}"], "method.template must contain exactly one {}"),
    Case("template-escaped-braces", ["method.template=a {{}}"], "method.template must contain exactly one {}"),
    # names
    Case("name-parent", ["run.name=../escape"], NAME_RULE),
    Case("name-dotdot", ["run.name=.."], NAME_RULE),
    Case("name-absolute", ["run.name=/tmp/escape"], NAME_RULE),
    Case("name-nested", ["run.name=a/b"], NAME_RULE),
    Case("name-hidden", ["run.name=.hidden"], NAME_RULE),
    Case("name-space", ["run.name=a b"], NAME_RULE),
    Case("name-too-long", ["run.name=" + "x" * 101], NAME_RULE),
    Case("name-from-env", ["run.name=${oc.env:FEDLIT_FUZZ_ESCAPE}"], f"run.name='{ESCAPE}' {NAME_RULE}"),
    # paths
    Case("out-dir-is-a-file", ["run.out_dir={in}/afile"], "run.out_dir='{in}/afile' exists and is not a directory",
         files={"afile": "x"}),
    Case("out-dir-under-a-file", ["run.out_dir={in}/afile/runs"], "cannot be created: {in}/afile is not a directory",
         files={"afile": "x"}),
    Case("out-dir-component-too-long", ["run.out_dir={in}/" + "d" * 300 + "/runs"], "longer than 255 bytes"),
    Case("out-dir-unknown-user", ["run.out_dir=~fedlit_no_such_user/runs"], "cannot expand '~fedlit_no_such_user'"),
    Case("cache-dir-is-a-file", ["backbone.cache_dir={in}/afile"], "backbone.cache_dir='{in}/afile' exists and is not",
         files={"afile": "x"}),
    Case("weights-file-missing", ["backbone.name=RN50", "backbone.pretrained={in}/missing.pt"],
         "backbone weights file not found: {in}/missing.pt"),
    Case("pretrained-with-built-in-backbone", ["backbone.pretrained=openai"],
         "backbone.pretrained=openai cannot be used with the built-in backbone 'tiny'"),
    Case("weights-file-missing-open-clip", ["backbone.name=RN50", "backbone.pretrained={in}/w.safetensors"],
         "backbone weights file not found"),
    Case("download-root-under-a-file", ["data.name=cifar10", "data.download=true", "data.root={in}/afile/data"],
         "data.root='{in}/afile/data' cannot be created", files={"afile": "x"}),
    # resume targets
    Case("resume-missing", ["run.resume={in}/nope"], f"run.resume='{{in}}/nope' is not an existing directory; "
         f"{RESUME_HINT}"),
    Case("resume-a-file", ["run.resume={in}/afile"], "is not an existing directory", files={"afile": "x"}),
    Case("resume-empty-dir", ["run.resume={in}/empty"], "is not a fedlit run directory (no config.yaml or checkpoint",
         files={"empty": DIR}),
    Case("resume-any-dir", ["run.resume={in}"], "is not a fedlit run directory", files={"results.json": "{}"}),
    # YAML files
    yaml_case("yaml-list", "- fed.rounds=3\n- seed=1\n", "expected a mapping of config keys at the top level"),
    yaml_case("yaml-scalar", "42\n", "expected a mapping of config keys at the top level (e.g. 'fed:' then"),
    yaml_case("yaml-section-scalar", "fed: 3\n", "'fed' is a section, not a value (got 3)"),
    yaml_case("yaml-section-list", "gate:\n  - 1\n", "'gate' is a section, not a value (got [1])"),
    yaml_case("yaml-unknown-key", "fed:\n  roundz: 3\n", "unknown config key 'fed.roundz'"),
    yaml_case("yaml-null-key", "null: 3\n", "cannot parse"),
    yaml_case("yaml-leaf-mapping", "fed:\n  rounds: {a: 1}\n", "bad value for 'fed.rounds'"),
    yaml_case("yaml-bool-int", "run:\n  quiet: 1\n", "'run.quiet': must be true or false (got 1)"),
    yaml_case("yaml-interpolation", "run:\n  name: ${nope}\n", "cannot resolve 'run.name'"),
    yaml_case("yaml-env-unset", "run:\n  name: ${oc.env:FEDLIT_FUZZ_UNSET}\n", "cannot resolve 'run.name'"),
    yaml_case("yaml-env-escape", "run:\n  name: ${oc.env:FEDLIT_FUZZ_ESCAPE}\n", f"run.name='{ESCAPE}' {NAME_RULE}"),
    yaml_case("yaml-missing-value", "fed:\n  rounds: ???\n", "'fed.rounds' is ??? (OmegaConf's missing value)"),
    Case("missing-value", ["run.name=???"], "'run.name' is ??? (OmegaConf's missing value)"),
    yaml_case("yaml-syntax", "fed: [1\n", "cannot parse {in}/c.yaml"),
    yaml_case("yaml-tab", "fed:\n\trounds: 3\n", "cannot parse {in}/c.yaml"),
    yaml_case("yaml-duplicate-key", "seed: 1\nseed: 2\n", "found duplicate key"),
    yaml_case("yaml-not-utf8", b"\xff\xfe\x00seed: 1\n", "not UTF-8 text"),
    yaml_case("yaml-nul-in-name", 'run:\n  name: "a\\0b"\n', "run.name contains a NUL character"),
    yaml_case("yaml-empty-name", 'run:\n  name: ""\n', f"run.name='' {NAME_RULE}"),
    yaml_case("yaml-empty-resume", 'run:\n  resume: ""\n', "run.resume='' is not an existing directory"),
    yaml_case("yaml-template", 'method:\n  template: "a {} of {}"\n', "method.template must contain exactly one {}"),
    Case("config-missing", [], "config file not found: {in}/missing.yaml", config="missing.yaml"),
    Case("config-is-a-directory", [], "config file is not a regular file: {in}/adir.yaml", config="adir.yaml",
         files={"adir.yaml": DIR}),
    # the argument parser
    Case("unknown-option", [], "unrecognized arguments: --bogus", stage="args", options=["--bogus"]),
    Case("option-without-value", [], "argument --config/-c: expected one argument", stage="args",
         options=["--config"]),
    # checks that need the backbone or the dataset (after validation, before the run directory)
    Case("d-gate-above-width", ["gate.d_gate=128"], "d_gate=128 must divide feature_dim=64", stage="run"),
    Case("n-ctx-above-context", ["prompt.n_ctx=80"], "prompt.n_ctx=80 leaves no room for the class name",
         stage="run"),
    Case("ctx-init-above-context", ["prompt.ctx_init=" + "a " * 76], "leaves no room for the class name",
         stage="run"),
    Case("shots-above-data", ["data.shots=50"], "data.shots=50 but class", stage="run"),
    Case("dataset-missing", ["data.name=cifar10", "data.root={in}/empty"], "{in}/empty", stage="run",
         files={"empty": DIR}),
    Case("backbone-unknown", ["backbone.name=ViT-B-99", "backbone.pretrained=random"], "unknown backbone 'ViT-B-99'",
         stage="run"),
    Case("pretrained-tag-unknown", ["backbone.name=RN50", "backbone.pretrained=notatag"],
         "unknown pretrained tag 'notatag'", stage="run"),
    Case("weights-file-not-weights", ["backbone.name=RN50", "backbone.pretrained={in}/w.pt"],
         "cannot load backbone weights {in}/w.pt", stage="run", files={"w.pt": "not a checkpoint"}),
    pytest.param(Case("gpu-absent", ["trainer.accelerator=gpu"], "no GPU is available", stage="run"),
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    pytest.param(Case("out-dir-not-writable", ["run.out_dir=/proc/self/fedlit-runs"], "is not writable"),
                 marks=pytest.mark.skipif(os.access("/proc/self", os.W_OK), reason="/proc/self is writable here")),
]


def _case(param) -> Case:
    return param.values[0] if hasattr(param, "values") else param


def _ids() -> list[str]:
    return [_case(p).id for p in CASES]


def materialise(case: Case, inputs: Path) -> tuple[list[str], list[str], str]:
    """Write the case's input files under ``inputs``; returns (argv before the fast settings, argv after them,
    the expected fragment of the error line)."""
    inputs.mkdir()
    for rel, content in (case.files or {}).items():
        path = inputs / rel
        if content is DIR:
            path.mkdir(parents=True)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    fill = lambda text: text.replace("{in}", str(inputs))  # noqa: E731
    head = ["--config", fill("{in}/" + case.config)] if case.config else []
    return head, [fill(o) for o in case.overrides] + list(case.options or []), fill(case.expect)


def tree(root: Path) -> list[str]:
    """Every path under ``root``, relative and sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def environment(monkeypatch):
    monkeypatch.setenv("FEDLIT_FUZZ_ESCAPE", ESCAPE)
    monkeypatch.delenv("FEDLIT_FUZZ_UNSET", raising=False)


@pytest.mark.parametrize("case", CASES, ids=_ids())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, environment, case):
    head, overrides, expect = materialise(case, tmp_path / "inputs")
    out_dir = tmp_path / "runs"
    before = tree(tmp_path)
    code = main(head + FAST + [f"run.out_dir={out_dir}", f"backbone.cache_dir={cache_dir()}", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert not out_dir.exists() and tree(tmp_path) == before


CONFIG_CASES = [p for p in CASES if _case(p).stage == "config"]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[_case(p).id for p in CONFIG_CASES])
def test_config_cases_fail_in_validation_itself(tmp_path, environment, case):
    head, overrides, expect = materialise(case, tmp_path / "inputs")
    config = head[head.index("--config") + 1] if "--config" in head else None
    with pytest.raises(ConfigError) as err:
        load_config(config, FAST + [f"run.out_dir={tmp_path / 'runs'}", *overrides])
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_the_table_is_large_and_covers_every_stage():
    stages = [_case(p).stage for p in CASES]
    assert len(CASES) >= 60 and {"config", "args", "run"} <= set(stages)
    assert len({_case(p).id for p in CASES}) == len(CASES)
