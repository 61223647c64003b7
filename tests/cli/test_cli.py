"""Tests for the datatrace command line and the digits demo it runs."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

import datatrace
from datatrace.cli.main import COMMANDS, build_parser, main


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, str]:
    out_dir = tmp_path_factory.mktemp("demo") / "out"
    code, stdout, stderr = run_main(["demo", "--out", str(out_dir), "--n-loo", "8", "--jobs", "1", "--quiet"])
    return out_dir, code, stdout, stderr


@pytest.mark.slow
def test_demo_writes_a_self_contained_report(demo_run):
    out_dir, code, _, stderr = demo_run
    assert code == 0, stderr
    text = (out_dir / "report.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text)
    assert "http://" not in text and "https://" not in text
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', text)) >= 5
    assert "nats" in text and "proponent" in text and "opponent" in text


@pytest.mark.slow
def test_demo_results_json(demo_run):
    out_dir, code, _, _ = demo_run
    assert code == 0
    results = json.loads((out_dir / "results.json").read_text())
    loo = results["loo"]
    assert isinstance(loo["mean_pearson"], float)
    assert loo["mean_pearson"] > 0.9  # exact-Hessian influence on a convex model tracks retraining closely
    assert loo["mean_spearman"] > 0.8
    assert len(loo["indices"]) == 8
    assert results["data"]["n_flipped"] == 50 and len(results["data"]["flipped_train_indices"]) == 50
    assert results["config"]["model"] == "logreg"
    assert "removed" in results["meaning"] and "nats" in results["units"]
    ex = results["explanation"]
    assert ex["misclassified"] and len(ex["proponents"]) == 5 and len(ex["opponents"]) == 5
    assert all(row["score"] > 0 for row in ex["proponents"])
    assert all(row["score"] < 0 for row in ex["opponents"])
    top = results["detection"]["top"]
    assert [t["fraction_inspected"] for t in top] == [0.05, 0.1]
    assert top[1]["found_by_self_influence"] > 3 * top[1]["expected_by_random"]
    # the other outputs, and the retraining cache that lets a rerun skip finished retrains
    assert datatrace.Scores.load(out_dir / "scores.safetensors").values.shape == (300, 1000)
    assert (out_dir / "loo.npz").exists()
    assert len(list((out_dir / "loo-cache").glob("*/loo-*.npy"))) == 8


@pytest.mark.slow
def test_demo_prints_summary_with_correlation(demo_run):
    out_dir, code, stdout, stderr = demo_run
    assert code == 0
    results = json.loads((out_dir / "results.json").read_text())
    assert f"mean Pearson correlation {results['loo']['mean_pearson']:.3f}" in stdout
    assert "in nats" in stdout and "proponent" in stdout and "opponent" in stdout
    # the size ratio says what it is and what a good value is (issue 13)
    assert "median size estimated/actual" in stdout and "mean |estimated change|" in stdout
    assert "Between 0.8 and 1.25" in stdout
    assert str(out_dir / "report.html") in stdout
    info_lines = [
        line for line in stderr.splitlines() if line.startswith("datatrace: ") and "warning" not in line
    ]
    assert info_lines == []  # --quiet: no step-by-step log lines
    assert "\r" not in stderr  # --quiet: no progress bars


@pytest.mark.slow
def test_demo_rerun_interrupted_leaves_the_earlier_outputs_whole(demo_run, tmp_path, monkeypatch):
    """Issue 12, case 18: Ctrl-C while a rerun writes its outputs leaves the earlier ones whole and consistent
    (report, JSON, scores, loo.npz) and keeps the retraining cache."""
    source, code, _, _ = demo_run
    assert code == 0
    out = tmp_path / "out"
    shutil.copytree(source, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"report.html", "results.json", "scores.safetensors", "loo.npz"} <= set(before)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("datatrace.cli.context.write_json", interrupted)
    code, _, _ = run_main(["demo", "--out", str(out), "--n-loo", "8", "--jobs", "1", "--quiet"])
    assert code == 130
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert len(list((out / "loo-cache").glob("*/loo-*.npy"))) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_version():
    code, stdout, _ = run_main(["--version"])
    assert code == 0
    assert stdout.strip() == f"datatrace {datatrace.__version__}"


build_parser()  # registers every subcommand, so that the test below covers each of them


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_each_subcommand(command: str):
    code, stdout, _ = run_main([command, "--help"])
    assert code == 0
    assert f"usage: datatrace {command}" in stdout
    for flag in ("--quiet",):
        assert flag in stdout


def test_demo_help_lists_every_flag():
    code, stdout, _ = run_main(["demo", "--help"])
    assert code == 0
    for flag in ("--model", "--out", "--n-loo", "--flip-fraction", "--seed", "--jobs", "--quiet"):
        assert flag in stdout
    assert "{logreg,mlp}" in stdout


def test_top_level_help_lists_commands():
    code, stdout, _ = run_main(["--help"])
    assert code == 0
    assert "demo" in stdout and "removed" in stdout
    assert set(COMMANDS) >= {"demo"}
    assert build_parser().prog == "datatrace"


def test_no_command_prints_help_and_fails():
    code, _, stderr = run_main([])
    assert code == 2
    assert "usage: datatrace" in stderr


def test_out_that_is_a_file_fails_cleanly(tmp_path: Path):
    existing = tmp_path / "taken.txt"
    existing.write_text("keep me")
    code, stdout, stderr = run_main(["demo", "--out", str(existing), "--quiet"])
    assert code == 2
    assert "is an existing file, not a directory" in stderr
    assert "Traceback" not in stderr
    assert stdout == ""
    assert existing.read_text() == "keep me"


def test_out_below_a_file_fails_cleanly(tmp_path: Path):
    existing = tmp_path / "taken.txt"
    existing.write_text("x")
    code, _, stderr = run_main(["demo", "--out", str(existing / "sub"), "--quiet"])
    assert code == 2
    assert "cannot be created" in stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--model", "svm"], "invalid choice: 'svm'"),
        (["demo", "--n-loo", "many"], "invalid int value: 'many'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_flags_give_argparse_errors(argv: list[str], message: str):
    code, _, stderr = run_main(argv)
    assert code == 2
    assert message in stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--n-loo", "1"], "n_loo=1 is not allowed"),
        (["--flip-fraction", "0.9"], "flip_fraction=0.9 is not allowed"),
        (["--jobs", "0"], "n_jobs=0 is not allowed"),
        (["--seed", "-1"], "seed=-1 is not allowed"),
    ],
)
def test_bad_values_fail_before_any_work(tmp_path: Path, flags: list[str], message: str):
    code, _, stderr = run_main(["demo", "--out", str(tmp_path / "o"), "--quiet", *flags])
    assert code == 2
    assert message in stderr
    assert not (tmp_path / "o").exists()
