"""benchmarks/gpu_check.py needs no GPU: without one it says so and exits 0, and ``--cpu-smoke`` fills every row of
its one table on the CPU with tiny sizes (the numbers are not checked against timings: timings are not tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from benchmarks.gpu_check import AGREEMENT_METHODS, COLUMNS, MISSING, ROUND_TIME_METHODS, available_methods
from tests.helpers import ROOT


def table_rows(stdout: str) -> list[dict]:
    """The markdown table of the script's output as dicts keyed by its header."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(COLUMNS)
    assert set(lines[1]) <= {"|", "-"}
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(r) == len(COLUMNS) for r in rows), "a cell holds a '|'"
    return [dict(zip(COLUMNS, r)) for r in rows]


@pytest.fixture(scope="module")
def smoke() -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "gpu_check: no GPU is visible (torch.cuda.is_available() is False), nothing measured; --cpu-smoke runs the "
        "rows on the CPU with tiny sizes"]


def test_cpu_smoke_prints_one_table_with_every_row(smoke):
    have = available_methods()
    rows = table_rows(smoke.stdout)
    assert smoke.stdout.count("| check |") == 1
    expected = ([("bf16 agreement", m) for m in AGREEMENT_METHODS for _ in range(3 if m in have else 1)]
                + [(check, m) for m in ROUND_TIME_METHODS for check in ("round time", "memory per client")]
                + [("matmul peak", "-"), ("text encoder", "-"), ("text encoder", "-")])
    assert [(r["check"], r["method"]) for r in rows] == expected
    missing = sorted({m for m in AGREEMENT_METHODS + ROUND_TIME_METHODS if m not in have})
    for r in rows:
        assert (r["value"] == MISSING) == (r["method"] in missing)
    if missing:
        assert f"missing methods (not in this checkout): {', '.join(missing)}" in smoke.stdout
    else:
        assert "missing methods" not in smoke.stdout


def test_cpu_smoke_bf16_really_ran_and_stays_close_to_fp32(smoke):
    rows = [r for r in table_rows(smoke.stdout) if r["check"] == "bf16 agreement" and r["value"] != MISSING]
    assert rows, "no method of the agreement rows is in this checkout"
    for accuracy, prompt, logits in zip(rows[0::3], rows[1::3], rows[2::3]):
        assert accuracy["unit"] == "max abs diff of acc (pp)" and 0 <= float(accuracy["value"]) <= 100
        # bf16 autocast changes the trained prompt (so it ran), by far less than the prompt's own scale (0.02)
        assert prompt["setting"].startswith("global state: ") and 0 < float(prompt["value"]) < 2e-3
        scale = float(re.search(r"max abs logit ([\d.]+)", logits["setting"]).group(1))
        assert 0 < float(logits["value"]) < 0.1 * scale


def test_cpu_smoke_ratios_follow_from_the_printed_numbers(smoke):
    rows = table_rows(smoke.stdout)
    peak = float(next(r["value"] for r in rows if r["check"] == "matmul peak"))
    for r in rows:
        if r["check"] == "text encoder":
            percent = float(re.search(r"([\d.]+)% of peak", r["setting"]).group(1))
            assert percent == pytest.approx(100 * float(r["value"]) / peak, rel=0.01, abs=0.06)
        if r["check"] == "memory per client" and r["value"] != MISSING:
            peak_mib, before, group = map(float, re.search(r"\(peak (\d+) MiB - (\d+) MiB before the run\) / (\d+)",
                                                           r["setting"]).groups())
            assert float(r["value"]) == pytest.approx((peak_mib - before) / group, abs=1 / group + 1e-3)
            assert peak_mib >= before
        if r["check"] == "round time" and r["value"] != MISSING:
            assert float(r["value"]) > 0 and r["unit"] == "s/round"
