"""Many clients (#15): 20,000 pFedMoAP clients of the CIFAR-100 sizes on the disk store, through the round loop's
fast path of ``benchmarks/scale.py`` (real store, pFedMoAP plan/aggregate and incremental checkpoints; local
training replaced by a random update), stay within a memory bound and checkpoint only the round's clients."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

STATE_BYTES = 4 * 2 * (16 * 512 + 66_048)  # prompt, gate and their momentum (fp32): a first participation
ENTRY_BYTES = STATE_BYTES + 4 * 9 * 16 * 512  # plus the 9 expert prompts of a client that trained before


def test_twenty_thousand_clients_stay_within_memory_and_checkpoint_only_the_cohort():
    done = subprocess.run([sys.executable, "benchmarks/scale.py", "--one", "20000", "--rounds", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                                            "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout)
    assert 280 <= row["stored_clients"] <= 300  # 3 rounds of 100: only clients that trained have an entry
    assert row["peak_rss_bytes"] - row["base_rss_bytes"] < 768 * 2**20  # the clients' share of the process
    assert row["peak_rss_bytes"] < 3 * 2**30
    # a round writes its 100 clients' shard files (one client per shard by default) and the main file
    assert 100 * STATE_BYTES < row["checkpoint_bytes"] < 120 * ENTRY_BYTES
