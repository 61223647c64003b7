"""``--verify N`` on every command, its cost line, its resumable cache, and outputs that appear together."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from datatrace.cli.files import OUTPUT_NAMES, publish
from datatrace.cli.main import main
from datatrace.verification.verify import VERDICTS

torch.set_num_threads(1)
FAST = ["--quiet", "--threads", "1"]

SMALL = """
import os
import numpy as np
from sklearn.linear_model import LogisticRegression

rng = np.random.default_rng(0)
X = rng.normal(size=(60, 3))
y = (X[:, 0] - X[:, 1] + 0.5 * rng.normal(size=60) > 0).astype(int)
Xq = rng.normal(size=(12, 3))
yq = (Xq[:, 0] - Xq[:, 1] > 0).astype(int)
CALLS = [0]

def train():
    return X, y

def query():
    return Xq, yq

def validation():
    return Xq, yq

def estimator():
    return LogisticRegression(tol=1e-10, max_iter=10_000).fit(X, y)

def train_fn(subset):
    CALLS[0] += 1
    log = os.environ.get("DT_TEST_CALLS")
    if log:
        with open(log, "a") as handle:
            handle.write("call\\n")
    if CALLS[0] == int(os.environ.get("DT_TEST_INTERRUPT_AT", "0")):
        raise KeyboardInterrupt
    Xs, ys = subset
    return LogisticRegression(tol=1e-10, max_iter=10_000).fit(Xs, ys)
"""


def run_main(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def small_spec(tmp_path: Path) -> Path:
    path = tmp_path / "small.py"
    path.write_text(SMALL)
    return path


COMMANDS = {
    "explain": ["explain"],
    "debug": ["debug", "--remove-k", "0"],
    "value": ["value"],
    "audit": ["audit", "--memorisation", "--false-positive-rate", "0.2"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_verify_gives_a_verdict_in_json_and_report(small_spec, tmp_path, command):
    out = tmp_path / "out"
    code, stdout, stderr = run_main([*COMMANDS[command], small_spec, "--out", out, "--verify", "5", *FAST])
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    v = results["verification"]
    assert v["status"] == "verified" and v["verdict"] in VERDICTS
    assert v["method"] == "leave-one-out"  # sklearn refits are deterministic: no retraining noise
    assert v["n_retrains"] == 5 + 3 and v["agreement"]["mean_pearson"] > 0.9
    assert v["one_training_seconds"] > 0 and v["predicted_models"] == 8
    text = (out / "report.html").read_text()
    assert "How accurate is this? Checked by retraining" in text and v["verdict"].upper() in text
    assert text.count("data:image/png;base64,") >= 2  # the scatter beside the command's own figures
    assert (
        "Verifying by retraining: one training run" in stdout and "Accuracy, checked by retraining" in stdout
    )
    if command == "audit":
        confirmation = results["memorisation"]["confirmation"]
        assert confirmation["status"] == "verified" and confirmation["n_checked"] >= 1
        assert 0 <= confirmation["n_confirmed"] <= confirmation["n_checked"]
        assert "Memorisation confirmed by retraining?" in text


def test_verify_without_train_fn_says_not_verified(tmp_path):
    spec = tmp_path / "no_train_fn.py"
    spec.write_text(SMALL + "\ndel train_fn\n")
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["value", spec, "--out", out, "--verify", "5", *FAST])
    assert code == 0, stderr
    v = json.loads((out / "results.json").read_text())["verification"]
    assert v["status"] == "not verified" and v["verdict"] is None and "train_fn(subset)" in v["reason"]
    assert "Not verified:" in (out / "report.html").read_text()
    assert "NOT VERIFIED" in stdout and not (out / "verify-cache").exists()


def test_without_verify_nothing_is_retrained(small_spec, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = run_main(["explain", small_spec, "--out", out, *FAST])
    assert code == 0, stderr
    assert json.loads((out / "results.json").read_text())["verification"] is None
    assert not (out / "verify-cache").exists()


@pytest.mark.parametrize("n", ["2", "-1"])
def test_verify_usage_error(small_spec, tmp_path, n):
    code, _, stderr = run_main(["explain", small_spec, "--out", tmp_path / "o", "--verify", n, *FAST])
    assert code == 2 and f"--verify {n}" in stderr and "Fix:" in stderr


def test_interrupted_verification_keeps_finished_retrains_and_resumes(small_spec, tmp_path, monkeypatch):
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    monkeypatch.setenv("DT_TEST_CALLS", str(calls))
    # call 1 is the timing run; calls 2-4 finish (two probe bases and a probe retrain), call 5 is Ctrl-C
    monkeypatch.setenv("DT_TEST_INTERRUPT_AT", "5")
    code, _, stderr = run_main(["explain", small_spec, "--out", out, "--verify", "6", *FAST])
    assert code == 130, stderr
    v = json.loads((out / "results.json").read_text())["verification"]
    assert v["status"] == "interrupted" and v["verdict"] is None
    assert v["n_retrains_finished"] == 3 and "Rerun the same command to resume" in v["reason"]
    assert "interrupted (Ctrl-C) after 3 finished" in (out / "report.html").read_text()
    # the rerun trains only what is missing: one timing run plus (6 + 3) - 3 retrains
    monkeypatch.delenv("DT_TEST_INTERRUPT_AT")
    calls.write_text("")
    code, _, stderr = run_main(["explain", small_spec, "--out", out, "--verify", "6", *FAST])
    assert code == 0, stderr
    v = json.loads((out / "results.json").read_text())["verification"]
    assert v["status"] == "verified" and v["cached_before"] == 3 and v["predicted_models"] == 6
    assert len(calls.read_text().split()) == 1 + 6


def test_ctrl_c_while_confirming_memorisation_stops_all_retraining(small_spec, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("DT_TEST_INTERRUPT_AT", "3")  # the base model and one retrain finish, then Ctrl-C
    argv = [
        "audit",
        small_spec,
        "--out",
        out,
        "--memorisation",
        "--false-positive-rate",
        "0.2",
        "--verify",
        "5",
    ]
    code, _, stderr = run_main([*argv, *FAST])
    assert code == 130, stderr
    results = json.loads((out / "results.json").read_text())
    confirmation = results["memorisation"]["confirmation"]
    assert confirmation["status"] == "interrupted" and confirmation["n_retrains_finished"] == 2
    assert results["verification"]["status"] == "interrupted"
    assert results["verification"]["reason"].startswith("not started")
    assert len(list((out / "verify-cache").iterdir())) == 1  # the scores' verification never started


# --------------------------------------------------------------------------------------------------------------
# Outputs appear together (issue 12, case 18)
# --------------------------------------------------------------------------------------------------------------
def test_interrupted_rerun_leaves_the_earlier_outputs_whole(small_spec, tmp_path, monkeypatch):
    out = tmp_path / "out"
    code, _, stderr = run_main(["debug", small_spec, "--out", out, "--remove-k", "0", *FAST])
    assert code == 0, stderr
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert set(before) == {"report.html", "results.json", "per_example.csv"}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Ctrl-C while the rerun writes its outputs: after its table, before its results.json
    monkeypatch.setattr("datatrace.cli.context.write_json", interrupted)
    code, _, _ = run_main(["debug", small_spec, "--out", out, "--remove-k", "0", "--seed", "3", *FAST])
    assert code == 130
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # the earlier report, JSON and CSV, untouched and consistent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "small.py"]  # no staging folder left


def test_a_new_run_drops_stale_outputs_and_keeps_caches(small_spec, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = run_main(["value", small_spec, "--out", out, "--verify", "4", *FAST])
    assert code == 0, stderr
    (out / "notes.txt").write_text("mine")
    code, _, stderr = run_main(["explain", small_spec, "--out", out, *FAST])
    assert code == 0, stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["notes.txt", "report.html", "results.json", "verify-cache"]  # values.csv was value's
    assert (out / "notes.txt").read_text() == "mine" and any((out / "verify-cache").rglob("*.npy"))


def test_publish_swaps_everything_in_together(tmp_path):
    out = tmp_path / "out"
    (out / "verify-cache" / "run").mkdir(parents=True)
    (out / "verify-cache" / "run" / "loo-1.npy").write_bytes(b"kept")
    (out / "report.html").write_text("old report")
    (out / "values.csv").write_text("stale")
    os.chmod(out, 0o755)
    publish(out, {"report.html": lambda p: p.write_text("new"), "results.json": lambda p: p.write_text("{}")})
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "results.json", "verify-cache"]
    assert (out / "report.html").read_text() == "new"
    assert (out / "verify-cache" / "run" / "loo-1.npy").read_bytes() == b"kept"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not the owner-only mode of a temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    def broken(path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish(out, {"report.html": lambda p: p.write_text("newer"), "results.json": broken})
    assert (out / "report.html").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [
        "out"
    ]


def test_publish_into_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "values.csv").write_text("stale")
    publish(Path("."), {"report.html": lambda p: p.write_text("new")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert "report.html" in OUTPUT_NAMES
