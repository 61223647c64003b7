"""The fault suite: every file datatrace writes outside the gradient store, damaged on disk, must give a named
error or a safe recompute, never a raw trace, a silent wrong answer, or a read, write or delete outside its folder.

Damages (``DAMAGES``): truncate to half, flip four bytes in the middle (XOR 0xFF), delete, replace with a link to a
file outside the folder, empty. Files: the Scores pair (values + JSON), the retrain cache (manifest, a result),
``verify``'s caches, and the CLI's outputs (results.json, report.html, the Scores pair, loo.npz, its loo cache).
The gradient store has its own fault tests in tests/projection/.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import datatrace
from datatrace import Scores
from datatrace.cli.main import main
from datatrace.errors import RetrainCacheError, ScoresFileError
from datatrace.verification import fit_full_batch, verify
from datatrace.verification.retrain import leave_one_out
from datatrace.verification.retrain_cache import JOB_FILE, MANIFEST, RetrainCache

DAMAGES = ["truncate", "flip", "delete", "symlink", "empty"]
N, D, N_QUERY = 10, 3, 4


def damage(path: Path, kind: str, outside: Path) -> None:
    """Damage ``path`` in place; ``symlink`` replaces it with a link to ``outside`` (a file outside the folder)."""
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "flip":
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 4]) + data[mid + 4 :])
    elif kind == "delete":
        path.unlink()
    elif kind == "symlink":
        path.unlink()
        path.symlink_to(outside)
    elif kind == "empty":
        path.write_bytes(b"")
    else:  # pragma: no cover
        raise AssertionError(kind)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (not following links) with its bytes: to prove nothing there changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the one under test, holding files the damage links to; nothing may touch them."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


# -- the Scores pair ----------------------------------------------------------------------------------------------
def _pair(folder: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    return Scores(torch.randn(3, 5, generator=g, dtype=torch.float64), metadata={"seed": seed}).save(
        folder / "scores.safetensors"
    )


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("which", ["values", "json"])
def test_scores_pair(tmp_path, outside, which, kind):
    path = _pair(tmp_path / "run", seed=0)
    _pair(outside, seed=1)  # a valid pair of other scores: links point at its files
    target = path if which == "values" else path.with_name(path.name + ".json")
    before = snapshot(outside)
    damage(target, kind, outside / target.name)
    error = FileNotFoundError if kind == "delete" else ScoresFileError
    with pytest.raises(error) as info:
        Scores.load(path)
    message = str(info.value)
    assert target.name in message and "Fix:" in message
    assert snapshot(outside) == before


# -- the retrain cache --------------------------------------------------------------------------------------------
@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, D))
    y = X @ rng.normal(size=D) + 0.3 * rng.normal(size=N)
    return X, y, rng.normal(size=(N_QUERY, D))


class Ridge:
    """train_fn: ridge regression; counts its calls (n_jobs=1 runs in this process)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, train):
        self.calls += 1
        X, y = train
        return np.linalg.solve(X.T @ X + 0.5 * np.eye(X.shape[1]), X.T @ y)


class Predict:
    def __init__(self, X_query):
        self.X_query = X_query

    def __call__(self, w):
        return self.X_query @ w


def _loo(problem, cache: Path, train_fn=None):
    X, y, X_query = problem
    return leave_one_out(train_fn or Ridge(), (X, y), Predict(X_query), cache_dir=cache, progress=False)


def _result_file(cache: Path) -> Path:
    return sorted(cache.glob("loo-*.npy"))[3]


@pytest.mark.parametrize("kind", DAMAGES)
def test_retrain_cache_result_is_retrained(problem, tmp_path, outside, caplog, kind):
    cache = tmp_path / "cache"
    fresh = _loo(problem, cache)
    target = _result_file(cache)
    (outside / target.name).write_bytes(
        target.read_bytes()
    )  # a perfect copy: even so, a link is not followed
    before = snapshot(outside)
    damage(target, kind, outside / target.name)
    rerun = Ridge()
    with caplog.at_level(logging.WARNING, logger="datatrace.verification"):
        result = _loo(problem, cache, rerun)
    assert rerun.calls == 1  # only the damaged retrain
    if kind != "delete":
        assert target.name in caplog.text and "retrained" in caplog.text
    np.testing.assert_array_equal(result.changes, fresh.changes)
    assert stat.S_ISREG(os.lstat(target).st_mode)  # the link was replaced, not written through
    assert snapshot(outside) == before
    assert _loo(problem, cache, Ridge()).changes.shape == fresh.changes.shape  # and the cache is whole again


@pytest.mark.parametrize("kind", DAMAGES)
def test_retrain_cache_manifest_is_refused(problem, tmp_path, outside, kind):
    cache = tmp_path / "cache"
    _loo(problem, cache)
    (outside / MANIFEST).write_bytes((cache / MANIFEST).read_bytes())
    before = snapshot(outside)
    damage(cache / MANIFEST, kind, outside / MANIFEST)
    inside = snapshot(cache)
    with pytest.raises(RetrainCacheError, match=r"cache_dir=.*manifest\.json.*Fix: use a new cache_dir"):
        _loo(problem, cache)
    assert snapshot(outside) == before and snapshot(cache) == inside  # nothing read-and-acted-on or deleted


def _edit_manifest(cache: Path, edit) -> None:
    manifest = json.loads((cache / MANIFEST).read_text())
    (cache / MANIFEST).write_text(json.dumps(edit(manifest)))


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: [m], id="a-list"),
        pytest.param(lambda m: {**m, "n_query": "4"}, id="n_query-string"),
        pytest.param(lambda m: {**m, "n_query": True}, id="n_query-bool"),
        pytest.param(lambda m: {**m, "n_query": -1}, id="n_query-negative"),
        pytest.param(lambda m: {**m, "results": ["loo-0.npy"]}, id="results-list"),
        pytest.param(lambda m: {**m, "results": {"../../outside/x": "0" * 64}}, id="results-path-key"),
        pytest.param(lambda m: {**m, "results": {"/etc/passwd": "0" * 64}}, id="results-absolute-key"),
        pytest.param(lambda m: {**m, "results": {"base": 7}}, id="results-digest-int"),
        pytest.param(lambda m: {**m, "../escape": "x"}, id="unknown-path-key"),
        pytest.param(lambda m: {**m, "n_train": str(m["n_train"])}, id="n_train-string"),
        pytest.param(lambda m: {**m, "seed_passed": 0}, id="seed_passed-int"),
        pytest.param(lambda m: {k: v for k, v in m.items() if k != "train_sha256"}, id="missing-key"),
    ],
)
def test_retrain_cache_tampered_manifest(problem, tmp_path, edit):
    cache = tmp_path / "cache"
    _loo(problem, cache)
    _edit_manifest(cache, edit)
    inside = snapshot(cache)
    with pytest.raises(ValueError, match=r"cache_dir=.*manifest\.json.*Fix: use a new cache_dir"):
        _loo(problem, cache)
    assert snapshot(cache) == inside


def _npy(array, allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(_npy(np.zeros(N_QUERY, dtype=np.float32)), id="float32"),
        pytest.param(_npy(np.zeros(N_QUERY, dtype=np.complex128)), id="complex"),
        pytest.param(_npy(np.array(["1.0"] * N_QUERY)), id="strings"),
        pytest.param(_npy(np.zeros((N_QUERY, 1))), id="2-D"),
        pytest.param(_npy(np.zeros(N_QUERY + 1)), id="longer"),
        pytest.param(_npy(np.full(N_QUERY, np.nan)), id="nan"),
        pytest.param(_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), id="pickle"),
        pytest.param(b"\x93NUMPY", id="header-only"),
    ],
)
def test_retrain_cache_result_with_a_matching_digest_is_still_checked(problem, tmp_path, caplog, content):
    """A result whose digest was updated with it (a consistent tamper) must still be a finite float64 vector."""
    cache = tmp_path / "cache"
    fresh = _loo(problem, cache)
    target = _result_file(cache)
    target.write_bytes(content)
    key = target.name[: -len(".npy")]
    _edit_manifest(
        cache, lambda m: {**m, "results": {**m["results"], key: hashlib.sha256(content).hexdigest()}}
    )
    rerun = Ridge()
    with caplog.at_level(logging.WARNING, logger="datatrace.verification"):
        result = _loo(problem, cache, rerun)
    assert rerun.calls == 1 and target.name in caplog.text
    np.testing.assert_array_equal(result.changes, fresh.changes)


def test_retrain_cache_folder_under_a_result_name_is_refused(problem, tmp_path):
    cache = tmp_path / "cache"
    _loo(problem, cache)
    target = _result_file(cache)
    target.unlink()
    target.mkdir()
    with pytest.raises(RetrainCacheError, match=re.escape(target.name) + r".*not a plain file.*Fix:"):
        _loo(problem, cache)
    assert target.is_dir()  # refused, not deleted


@pytest.mark.parametrize(
    ("name", "is_job"),
    [
        ("base.npy", True),
        ("loo-000003.npy", True),
        ("subset-00001-seed-0.npy", True),
        ("base.npy\n", False),  # "$" would accept a trailing newline
        ("loo-\u0663.npy", False),  # an Arabic-Indic digit: "\d" would accept it
        ("../base.npy", False),
        ("loo-3.npy.tmp", False),
        (".loo-3.npy.x1y2.tmp", False),  # atomic_write's temporary
        ("loo-.npy", False),
        ("LOO-3.npy", False),
    ],
)
def test_job_file_rule(name, is_job):
    assert bool(JOB_FILE.fullmatch(name)) is is_job


def test_leftovers_without_manifest(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".loo-3.npy.x1y2.tmp").write_bytes(b"half")  # a killed run's temporary is not a result
    (cache / "notes.txt").write_text("mine")
    RetrainCache(cache, {"kind": "leave_one_out"})
    assert (cache / "notes.txt").read_text() == "mine" and (cache / ".loo-3.npy.x1y2.tmp").exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "loo-3.npy").write_bytes(_npy(np.zeros(2)))
    with pytest.raises(RetrainCacheError, match=r"loo-3\.npy.*no manifest\.json.*Fix: use a new cache_dir"):
        RetrainCache(other, {"kind": "leave_one_out"})
    assert sorted(p.name for p in other.iterdir()) == ["loo-3.npy"]  # nothing written or deleted


@pytest.mark.parametrize("key", ["../base", "/tmp/x", "base/../../x", "loo-1\n"])
def test_cache_keys_cannot_leave_the_folder(tmp_path, key):
    cache = RetrainCache(tmp_path / "cache", {"kind": "leave_one_out"})
    with pytest.raises(ValueError, match=r"key=.*job key"):
        cache.load(key)
    with pytest.raises(ValueError, match=r"key=.*job key"):
        cache.save(key, np.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


# -- verify()'s caches ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flip", "symlink", "empty"])
def test_verify_cache_result_is_retrained(regression_problem, tmp_path, outside, kind):
    p = regression_problem

    def train_fn(data, seed=0):
        return fit_full_batch(p.model, p.task, data, max_iter=300, tolerance_grad=1e-10)

    influence = datatrace.InfluenceFunction(p.model, p.task, progress=False).fit(p.train)
    scores = influence.score(p.query)
    kwargs = dict(
        scores=scores, n_retrains=6, method="leave-one-out", cache_dir=tmp_path / "v", progress=False
    )
    first = verify(influence, p.train, train_fn, p.query, **kwargs)
    results = sorted((tmp_path / "v").rglob("loo-*.npy"))
    assert results, "verify wrote no cached results"
    target = results[0]
    (outside / target.name).write_bytes(target.read_bytes())
    before = snapshot(outside)
    damage(target, kind, outside / target.name)
    second = verify(influence, p.train, train_fn, p.query, **kwargs)
    np.testing.assert_allclose(second.actual, first.actual, rtol=1e-8, atol=1e-12)
    assert stat.S_ISREG(os.lstat(target).st_mode) and snapshot(outside) == before


# -- the command line's outputs -------------------------------------------------------------------------------------
def _demo(out: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["demo", "--out", str(out), "--n-loo", "2", "--jobs", "1", "--quiet"])
    return code, err.getvalue()


@pytest.mark.slow
def test_cli_outputs_damaged_then_rerun(tmp_path, outside):
    """A rerun over damaged outputs rewrites them as plain files and never writes through a link."""
    out = tmp_path / "out"
    code, stderr = _demo(out)
    assert code == 0, stderr
    loo_results = sorted((out / "loo-cache").rglob("loo-*.npy"))
    plan = {
        out / "results.json": "symlink",
        out / "report.html": "symlink",
        out / "scores.safetensors": "truncate",
        out / "scores.safetensors.json": "flip",
        out / "loo.npz": "empty",
        loo_results[0]: "flip",
        loo_results[1]: "symlink",
    }
    for (
        path
    ) in plan:  # link targets: a cached result links to a perfect copy, the rest to a file of the user's
        (outside / path.name).write_bytes(path.read_bytes() if path.suffix == ".npy" else b"precious\n")
    for path, kind in plan.items():
        damage(path, kind, outside / path.name)
    before = snapshot(outside)

    with pytest.raises(ScoresFileError, match=r"scores\.safetensors"):
        Scores.load(out / "scores.safetensors")
    code, stderr = _demo(out)
    assert code == 0, stderr
    assert snapshot(outside) == before
    for path in plan:
        assert stat.S_ISREG(os.lstat(path).st_mode), path
    assert Scores.load(out / "scores.safetensors").n_query > 0
    assert json.loads((out / "results.json").read_text())  # valid JSON again
    assert np.load(out / "loo.npz", allow_pickle=False).files


@pytest.mark.slow
def test_cli_loo_cache_manifest_damaged_fails_cleanly(tmp_path):
    out = tmp_path / "out"
    assert _demo(out)[0] == 0
    (manifest,) = (out / "loo-cache").rglob(MANIFEST)
    damage(manifest, "flip", tmp_path)
    code, stderr = _demo(out)
    assert code == 1
    assert "RetrainCacheError" in stderr and "manifest.json" in stderr and "Fix:" in stderr
    assert "Traceback" not in stderr


def test_verify_subfolder_replaced_by_a_link_is_not_followed(regression_problem, tmp_path, outside):
    p = regression_problem
    influence = datatrace.InfluenceFunction(p.model, p.task, progress=False).fit(p.train)
    cache = tmp_path / "v"
    cache.mkdir()
    (cache / "loo").symlink_to(outside, target_is_directory=True)
    kwargs = dict(n_retrains=4, method="leave-one-out", cache_dir=cache, progress=False)
    try:
        verify(influence, p.train, lambda data, seed=0: p.model, p.query, **kwargs)
    except ValueError:
        pass  # a named refusal is fine
    assert list(outside.iterdir()) == []
