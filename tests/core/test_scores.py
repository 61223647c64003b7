"""Scores: selection on a hand-made matrix, totals, and the safetensors + JSON round trip (no pickle)."""

from __future__ import annotations

import json
import pickle
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from datatrace import Scores, TopK
from datatrace.errors import ScoresFileError
from datatrace.scores import MEANING

# query 0: two positives (proponents), three negatives; query 1: all positive; query 2: all negative
VALUES = torch.tensor(
    [
        [0.5, -0.2, 0.1, -0.9, 0.0, -0.05],
        [0.3, 0.2, 0.6, 0.1, 0.4, 0.05],
        [-0.3, -0.7, -0.1, -0.2, -0.6, -0.4],
    ],
    dtype=torch.float64,
)


@pytest.fixture
def scores():
    return Scores(
        VALUES.clone(), "the query's loss", {"estimator": "hand", "n_train": 6, "nested": {"a": [1, 2]}}
    )


def test_shape_and_meaning(scores):
    assert (scores.n_query, scores.n_train) == (3, 6)
    assert "f_q(theta_without_i) - f_q(theta_hat)" in scores.meaning and "proponent" in scores.meaning
    assert "n_query=3" in repr(scores) and "n_train=6" in repr(scores)


def test_values_must_be_2d():
    with pytest.raises(ValueError, match=r"values=.*2-D"):
        Scores(torch.zeros(3))


def test_top_k_by_absolute_value(scores):
    top = scores.top_k(2)
    assert isinstance(top, TopK)
    assert top.indices.tolist() == [[3, 0], [2, 4], [1, 4]]
    torch.testing.assert_close(
        top.values, torch.tensor([[-0.9, 0.5], [0.6, 0.4], [-0.7, -0.6]], dtype=torch.float64)
    )


def test_proponents_are_positive_largest_first(scores):
    top = scores.proponents(0, k=3)
    assert top.indices.tolist() == [0, 2]  # only two positive scores exist: no zero or negative is returned
    assert top.values.tolist() == [0.5, 0.1]
    assert scores.proponents(1, k=3).indices.tolist() == [2, 4, 0]
    assert scores.proponents(2).indices.numel() == 0
    assert scores.proponents(-2, k=1).indices.tolist() == [2]  # negative q counts from the end


def test_opponents_are_most_negative_first(scores):
    top = scores.opponents(0, k=10)
    assert top.indices.tolist() == [3, 1, 5]
    assert top.values.tolist() == [-0.9, -0.2, -0.05]
    assert scores.opponents(1).indices.numel() == 0
    assert scores.opponents(2, k=2).values.tolist() == [-0.7, -0.6]


def test_k_larger_than_n_train_is_clipped(scores):
    assert scores.top_k(100).indices.shape == (3, 6)
    assert len(scores.proponents(1, k=100).indices) == 6
    assert len(scores.opponents(2, k=100).indices) == 6


@pytest.mark.parametrize("q", [3, -4, 1.0, True, "0"])
def test_bad_query_index(scores, q):
    with pytest.raises(IndexError, match=r"q=.*out of range for 3 queries.*-3 <= q < 3"):
        scores.proponents(q)
    with pytest.raises(IndexError, match=r"q=.*out of range"):
        scores.opponents(q)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k(scores, k):
    with pytest.raises(ValueError, match=r"k=.*integer >= 1"):
        scores.top_k(k)
    with pytest.raises(ValueError, match=r"k=.*integer >= 1"):
        scores.proponents(0, k=k)


def test_total_sums_over_queries(scores):
    torch.testing.assert_close(scores.total(), VALUES.sum(0))
    assert scores.total().shape == (6,)


def test_save_load_round_trip(scores, tmp_path, monkeypatch):
    path = tmp_path / "sub" / "scores.safetensors"
    returned = scores.save(path)
    assert returned == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["scores.safetensors", "scores.safetensors.json"]

    # the values file is plain safetensors: 8-byte header length, then a JSON header
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header["values"]["dtype"] == "F64" and header["values"]["shape"] == [3, 6]
    assert torch.equal(load_file(str(path))["values"], VALUES)
    meta = json.loads((path.parent / "scores.safetensors.json").read_text())
    assert meta["format"] == "datatrace.Scores" and meta["shape"] == [3, 6] and meta["meaning"] == MEANING

    def no_pickle(*args, **kwargs):
        raise AssertionError("Scores.load must not unpickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    back = Scores.load(str(path))
    assert torch.equal(back.values, scores.values) and back.values.dtype == torch.float64
    assert back.measurement == scores.measurement
    assert back.metadata == scores.metadata
    # no temporary files left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["scores.safetensors", "scores.safetensors.json"]


def test_save_overwrites(scores, tmp_path):
    path = tmp_path / "s.safetensors"
    Scores(torch.zeros(2, 2)).save(path)
    scores.save(path)
    assert torch.equal(Scores.load(path).values, VALUES)


def test_load_of_mismatched_pair_raises(scores, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    scores.save(a)
    Scores(torch.zeros(2, 6, dtype=torch.float64)).save(b)
    shutil.copy(tmp_path / "b.safetensors.json", tmp_path / "a.safetensors.json")
    with pytest.raises(
        ValueError, match=r"shape \[3, 6\] but its metadata says \[2, 6\].*not written together"
    ):
        Scores.load(a)


def test_load_of_missing_or_foreign_files(scores, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing.safetensors does not exist"):
        Scores.load(tmp_path / "nothing.safetensors")
    path = tmp_path / "s.safetensors"
    scores.save(path)
    (tmp_path / "s.safetensors.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"s.safetensors.json does not exist"):
        Scores.load(path)
    (tmp_path / "s.safetensors.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match=r"not a datatrace Scores file"):
        Scores.load(path)


def test_save_rejects_metadata_that_is_not_json(tmp_path):
    path = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match=r"metadata must be JSON-serialisable"):
        Scores(torch.zeros(1, 2), metadata={"tensor": torch.zeros(1)}).save(path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_save_non_contiguous_float32_values(tmp_path):
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4).T  # a transposed view
    Scores(values).save(tmp_path / "t.safetensors")
    back = Scores.load(tmp_path / "t.safetensors")
    assert back.values.dtype == torch.float32 and torch.equal(back.values, values)


# -- malformed or tampered files: ScoresFileError, never a raw KeyError / TypeError / AttributeError ------------------
def _saved(scores, tmp_path):
    path = scores.save(tmp_path / "s.safetensors")
    return path, path.with_name(path.name + ".json")


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        pytest.param(lambda m: "not json {", "not readable JSON", id="not-json"),
        pytest.param(lambda m: json.dumps([m]), "JSON list, not an object", id="a-list"),
        pytest.param(lambda m: json.dumps("datatrace.Scores"), "JSON str", id="a-string"),
        pytest.param(lambda m: json.dumps({**m, "shape": None}), "shape=None", id="shape-null"),
        pytest.param(lambda m: json.dumps({**m, "shape": "3x6"}), "shape='3x6'", id="shape-string"),
        pytest.param(lambda m: json.dumps({**m, "shape": [3, 6.0]}), r"shape=\[3, 6.0\]", id="shape-float"),
        pytest.param(lambda m: json.dumps({**m, "shape": [3, -6]}), "two non-negative", id="shape-negative"),
        pytest.param(lambda m: json.dumps({**m, "version": "1"}), "version='1'", id="version-string"),
        pytest.param(lambda m: json.dumps({**m, "version": True}), "version=True", id="version-bool"),
        pytest.param(lambda m: json.dumps({**m, "version": 99}), "version=99", id="version-future"),
        pytest.param(lambda m: json.dumps({**m, "measurement": 3}), "measurement=3", id="measurement-int"),
        pytest.param(lambda m: json.dumps({**m, "metadata": []}), r"metadata=\[\]", id="metadata-list"),
        pytest.param(lambda m: json.dumps({**m, "dtype": "object"}), "dtype='object'", id="dtype-unknown"),
        pytest.param(lambda m: json.dumps({**m, "sha256": "../x"}), "sha256=", id="digest-path"),
        pytest.param(
            lambda m: json.dumps({**m, "extra": 1}), r"unknown key\(s\) \['extra'\]", id="extra-key"
        ),
        pytest.param(lambda m: json.dumps({**m, "format": 7}), "format=7", id="format-int"),
        *[
            pytest.param(
                lambda m, key=key: json.dumps({k: v for k, v in m.items() if k != key}),
                f"no '{key}' key",
                id=f"missing-{key}",
            )
            for key in ("version", "measurement", "meaning", "shape", "metadata")
        ],
    ],
)
def test_load_of_tampered_json(scores, tmp_path, edit, words):
    path, json_path = _saved(scores, tmp_path)
    json_path.write_text(edit(json.loads(json_path.read_text())))
    with pytest.raises(ScoresFileError, match=rf"s\.safetensors\.json.*{words}.*Fix: save the scores again"):
        Scores.load(path)


@pytest.mark.parametrize(
    ("tensors", "words"),
    [
        pytest.param(
            {"values": VALUES.float()}, "dtype float32 but its metadata .* says float64", id="dtype"
        ),
        pytest.param({"values": VALUES[:2]}, r"shape \[2, 6\] but its metadata says \[3, 6\]", id="shape"),
        pytest.param(
            {"values": VALUES, "other": VALUES.clone()}, r"tensors \['other', 'values'\]", id="extra-tensor"
        ),
        pytest.param({"scores": VALUES}, r"tensors \['scores'\]", id="renamed"),
        pytest.param({"values": VALUES.clone().add_(1.0)}, "sha256", id="other-numbers"),
    ],
)
def test_load_of_tampered_values(scores, tmp_path, tensors, words):
    path, _ = _saved(scores, tmp_path)
    save_file(tensors, str(path))
    with pytest.raises(ScoresFileError, match=rf"s\.safetensors.*{words}.*Fix: save the scores again"):
        Scores.load(path)


def test_load_of_a_pair_without_dtype_and_digest(scores, tmp_path):
    """Files written before ``dtype`` and ``sha256`` were recorded still load; integer values are refused."""
    path, json_path = _saved(scores, tmp_path)
    meta = json.loads(json_path.read_text())
    del meta["dtype"], meta["sha256"]
    json_path.write_text(json.dumps(meta))
    assert torch.equal(Scores.load(path).values, VALUES)
    save_file({"values": VALUES.long()}, str(path))
    with pytest.raises(ScoresFileError, match=r"dtype int64 .* a floating-point dtype"):
        Scores.load(path)


def test_load_of_a_folder_is_refused(scores, tmp_path):
    path, json_path = _saved(scores, tmp_path)
    json_path.unlink()
    json_path.mkdir()
    with pytest.raises(ScoresFileError, match=r"s\.safetensors\.json is not a regular file.*Fix"):
        Scores.load(path)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"values": "abc"}, "values"),
        ({"values": [[1.0], [2.0, 3.0]]}, "values"),
        ({"values": VALUES, "measurement": None}, "measurement"),
        ({"values": VALUES, "measurement": 3}, "measurement"),
        ({"values": VALUES, "metadata": "abc"}, "metadata"),
        ({"values": VALUES, "metadata": [("a", 1)]}, "metadata"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"{name}=.*Fix:"):
        Scores(**kwargs)


def test_save_refuses_a_folder_and_an_unwritable_path(scores, tmp_path):
    with pytest.raises(ValueError, match=r"path=.*is a folder.*scores\.safetensors"):
        scores.save(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"path=.*cannot be created or written"):
        scores.save(blocker / "scores")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing half-written


def test_query_row_may_be_a_numpy_integer(scores):
    import numpy as np

    rows = np.flatnonzero(VALUES[:, 0].numpy() > 0)  # query rows found with numpy
    assert torch.equal(scores.proponents(rows[0], 2).indices, scores.proponents(0, 2).indices)
    assert torch.equal(scores.opponents(np.int32(-1), 2).indices, scores.opponents(2, 2).indices)


def test_nan_scores_are_never_picked_before_real_ones():
    """NaN marks an example that was not scored (ShortlistScores.to_dense): torch.topk ranks NaN first, which
    left proponents empty when NaN outnumbered k."""
    nan = float("nan")
    values = torch.tensor([[nan, 0.5, nan, -0.9, nan, 0.2, nan, -0.1]], dtype=torch.float64)
    scores = Scores(values, "the query's loss")
    assert scores.proponents(0, 2).indices.tolist() == [1, 5]
    assert scores.opponents(0, 2).indices.tolist() == [3, 7]
    assert scores.proponents(0, 8).indices.tolist() == [1, 5]
    assert scores.top_k(4).indices.tolist() == [[3, 1, 5, 7]]
