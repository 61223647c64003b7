"""The documented example docs/examples/record_and_replay.py, run for real at a small setting."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "record_and_replay.py"


def test_record_and_replay_example_runs_and_its_check_agrees(tmp_path):
    spec = importlib.util.spec_from_file_location("record_and_replay", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(
        ["--out", str(tmp_path), "--n-train", "160", "--epochs", "3", "--checkpoint-every", "4"]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == result["steps"] == 15
    assert saved["metadata"]["estimator"] == "Metagradient"
    # removing the strongest proponents raises the loss, as predicted, and by a comparable amount
    predicted, actual = result["predicted_loss_change"], result["actual_loss_change"]
    assert predicted > 0 and actual > 0
    assert 0.3 < predicted / actual < 3
    assert (tmp_path / "run" / "run.json").is_file()
