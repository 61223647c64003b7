"""The documented torchrun example (docs/examples/torchrun_digits.py) run for real: ``torchrun --standalone
--nproc-per-node 2`` (env:// rendezvous, gloo) against one plain process. Every pass over the training data is split
between the ranks and the scores equal the single process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "examples" / "torchrun_digits.py"


def _run(command: list[str], out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    done = subprocess.run(
        [*command, str(SCRIPT), "--out", str(out), "--n-train", "301", "--n-query", "7"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "run.json").read_text())


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    one = _run([sys.executable], tmp_path / "one")
    two = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
        tmp_path / "two",
    )
    assert one["world_size"] == 1 and two["world_size"] == 2
    # each training example processed once, split between the ranks (301 = 151 + 150)
    assert one["examples_per_rank"]["ekfac"] == {"0": 301}
    assert two["examples_per_rank"]["ekfac"] == {"0": 151, "1": 150}
    assert sum(two["examples_per_rank"]["projected_store"].values()) == 301
    assert min(two["examples_per_rank"]["projected_store"].values()) > 0
    a, b = (
        load_file(str(tmp_path / "one" / "scores.safetensors")),
        load_file(str(tmp_path / "two" / "scores.safetensors")),
    )
    torch.testing.assert_close(b["ekfac"], a["ekfac"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b["projected"], a["projected"], rtol=1e-4, atol=1e-6)  # float32 features
    assert torch.equal(b["top_proponents"], a["top_proponents"])
