"""Tests for datatrace.verification.retrain: leave-one-out and subset retraining checked against brute-force loops."""

from __future__ import annotations

import json
import logging
import pickle
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from datatrace.data import as_data_source
from datatrace.verification.retrain import LOOResult, SubsetResult, evaluator, leave_one_out, subsets

N, D, N_QUERY, RIDGE = 12, 3, 4, 0.5


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, D))
    y = X @ rng.normal(size=D) + 0.3 * rng.normal(size=N)
    X_query = rng.normal(size=(N_QUERY, D))
    return X, y, X_query


def ridge(X, y):
    return np.linalg.solve(X.T @ X + RIDGE * np.eye(X.shape[1]), X.T @ y)


def ridge_train_fn(train):
    X, y = train
    return ridge(X, y)


class Predict:
    """evaluate(w): the prediction for each query (a picklable class)."""

    def __init__(self, X_query):
        self.X_query = X_query

    def __call__(self, w):
        return self.X_query @ w


class Counting:
    """A train_fn that counts its calls (n_jobs=1 runs in this process) and can fail on one call."""

    def __init__(self, fail_on_call=None):
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, train):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return ridge_train_fn(train)


# -- leave_one_out ------------------------------------------------------------------------------------------------
def test_loo_matches_brute_force(data):
    X, y, X_query = data
    result = leave_one_out(ridge_train_fn, (X, y), Predict(X_query), progress=False)
    base = X_query @ ridge(X, y)
    expected = np.stack([X_query @ ridge(np.delete(X, i, 0), np.delete(y, i)) for i in range(N)], axis=1)

    assert isinstance(result, LOOResult)
    assert result.indices.dtype == np.int64 and result.indices.tolist() == list(range(N))
    assert result.base.dtype == np.float64 and result.changes.dtype == np.float64
    assert result.retrained.shape == result.changes.shape == (N_QUERY, N)
    np.testing.assert_allclose(result.base, base, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.retrained, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.changes, expected - base[:, None], rtol=1e-10, atol=1e-12)
    assert np.abs(result.changes).max() > 1e-3  # a real effect, not zeros


def test_loo_indices_subset_and_negative(data):
    X, y, X_query = data
    result = leave_one_out(ridge_train_fn, (X, y), Predict(X_query), indices=[5, -1, 2], progress=False)
    assert result.indices.tolist() == [5, N - 1, 2]
    for j, i in enumerate(result.indices):
        w = ridge(np.delete(X, i, 0), np.delete(y, i))
        np.testing.assert_allclose(result.retrained[:, j], X_query @ w, rtol=1e-12)


def test_loo_base_outputs_skips_base_training(data):
    X, y, X_query = data
    train_fn = Counting()
    base = np.full(N_QUERY, 1.5)
    result = leave_one_out(
        train_fn, (X, y), Predict(X_query), indices=[0, 1], base_outputs=base, progress=False
    )
    assert train_fn.calls == 2
    np.testing.assert_array_equal(result.base, base)
    np.testing.assert_allclose(result.changes, result.retrained - 1.5)
    with pytest.raises(ValueError, match="base_outputs"):
        leave_one_out(
            train_fn, (X, y), Predict(X_query), indices=[0], base_outputs=[1.0, 2.0], progress=False
        )


def test_seed_is_passed_when_accepted(data):
    X, y, X_query = data
    seen = []

    def train_with_seed(train, seed):
        seen.append(seed)
        return ridge_train_fn(train)

    leave_one_out(train_with_seed, (X, y), Predict(X_query), indices=[0, 3], seed=7, progress=False)
    assert seen == [7, 7, 7]  # base + two retrains, all the same seed

    seen_kw = []

    def train_keyword_only(train, *, seed=None):
        seen_kw.append(seed)
        return ridge_train_fn(train)

    result = subsets(
        train_keyword_only, (X, y), Predict(X_query), n_subsets=3, n_seeds=2, random_state=1, progress=False
    )
    assert sorted(seen_kw) == sorted(result.seeds.ravel().tolist())
    assert len(set(seen_kw)) == 6  # each run has its own seed

    # A train_fn without a seed parameter is called with the data only (it would raise TypeError otherwise).
    leave_one_out(ridge_train_fn, (X, y), Predict(X_query), indices=[0], progress=False)


def test_torch_dataset_input_gives_subset(data):
    X, y, X_query = data
    dataset = TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
    received = []

    def train_fn(train):
        assert isinstance(train, Subset)
        received.append(list(train.indices))
        Xs = torch.stack([train[k][0] for k in range(len(train))]).numpy()
        ys = torch.stack([train[k][1] for k in range(len(train))]).numpy()
        return ridge(Xs, ys)

    result = leave_one_out(train_fn, dataset, Predict(X_query), indices=[4], progress=False)
    assert received == [list(range(N)), [i for i in range(N) if i != 4]]
    expected = X_query @ ridge(np.delete(X, 4, 0), np.delete(y, 4))
    np.testing.assert_allclose(result.retrained[:, 0], expected, rtol=1e-10)


def test_tensor_tuple_input_stays_tensors(data):
    X, y, X_query = data

    def train_fn(train):
        assert isinstance(train, tuple) and all(isinstance(t, torch.Tensor) for t in train)
        return ridge(train[0].numpy(), train[1].numpy())

    result = leave_one_out(
        train_fn, (torch.from_numpy(X), torch.from_numpy(y)), Predict(X_query), indices=[1], progress=False
    )
    assert result.changes.shape == (N_QUERY, 1)


def test_non_finite_output_names_the_job(data):
    X, y, X_query = data

    def evaluate(w):
        out = X_query @ w
        if np.allclose(w, ridge(np.delete(X, 3, 0), np.delete(y, 3))):
            out[1] = np.nan
        return out

    with pytest.raises(FloatingPointError, match=r"leaves out training example 3.*loo-000003"):
        leave_one_out(ridge_train_fn, (X, y), evaluate, progress=False)


def test_inconsistent_output_length_raises(data):
    X, y, X_query = data
    calls = []

    def evaluate(w):
        calls.append(1)
        return X_query[: 2 + len(calls) % 2] @ w

    with pytest.raises(ValueError, match="evaluate returned"):
        leave_one_out(ridge_train_fn, (X, y), evaluate, indices=[0, 1], progress=False)


def test_train_fn_error_gets_a_note(data):
    X, y, X_query = data
    with pytest.raises(RuntimeError, match="simulated crash") as excinfo:
        leave_one_out(Counting(fail_on_call=2), (X, y), Predict(X_query), indices=[6], progress=False)
    if sys.version_info >= (3, 11):
        assert any("leaves out training example 6" in note for note in excinfo.value.__notes__)


# -- subsets ------------------------------------------------------------------------------------------------------
def test_subsets_masks_outputs_and_reproducibility(data):
    X, y, X_query = data
    result = subsets(
        ridge_train_fn, (X, y), Predict(X_query), n_subsets=6, fraction=0.4, random_state=3, progress=False
    )
    assert isinstance(result, SubsetResult)
    assert result.masks.shape == (6, N) and result.masks.dtype == bool
    assert (result.masks.sum(axis=1) == round(0.4 * N)).all()
    assert result.outputs.shape == (6, 1, N_QUERY) and result.outputs.dtype == np.float64
    assert result.seeds.shape == (6, 1) and result.seeds.dtype == np.int64
    for s in range(6):
        keep = result.masks[s]
        np.testing.assert_allclose(result.outputs[s, 0], X_query @ ridge(X[keep], y[keep]), rtol=1e-12)
    np.testing.assert_allclose(result.mean_outputs, result.outputs[:, 0])

    again = subsets(
        ridge_train_fn, (X, y), Predict(X_query), n_subsets=6, fraction=0.4, random_state=3, progress=False
    )
    np.testing.assert_array_equal(again.masks, result.masks)
    np.testing.assert_array_equal(again.seeds, result.seeds)
    np.testing.assert_array_equal(again.outputs, result.outputs)

    other = subsets(
        ridge_train_fn, (X, y), Predict(X_query), n_subsets=6, fraction=0.4, random_state=4, progress=False
    )
    assert not np.array_equal(other.masks, result.masks)
    assert len({m.tobytes() for m in result.masks}) > 1  # subsets differ from each other


def test_subsets_warns_when_seeds_cannot_be_passed(data):
    X, y, X_query = data
    with pytest.warns(UserWarning, match="seed"):
        result = subsets(ridge_train_fn, (X, y), Predict(X_query), n_subsets=2, n_seeds=2, progress=False)
    assert result.outputs.shape == (2, 2, N_QUERY)


# -- caching ------------------------------------------------------------------------------------------------------
def test_cache_second_call_trains_nothing(data, tmp_path, caplog):
    X, y, X_query = data
    first = Counting()
    r1 = leave_one_out(first, (X, y), Predict(X_query), cache_dir=tmp_path, progress=False)
    assert first.calls == N + 1
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["kind"] == "leave_one_out" and manifest["n_train"] == N and manifest["n_query"] == N_QUERY
    assert (tmp_path / "base.npy").exists() and (tmp_path / "loo-000011.npy").exists()
    np.testing.assert_array_equal(
        np.load(tmp_path / "loo-000002.npy", allow_pickle=False), r1.retrained[:, 2]
    )

    second = Counting()
    with caplog.at_level(logging.INFO, logger="datatrace.verification.retrain"):
        r2 = leave_one_out(second, (X, y), Predict(X_query), cache_dir=tmp_path, progress=False)
    assert second.calls == 0
    assert "reusing 13 of 13" in caplog.text
    np.testing.assert_array_equal(r2.changes, r1.changes)
    np.testing.assert_array_equal(r2.base, r1.base)


def test_cache_subsets_second_call_trains_nothing(data, tmp_path):
    X, y, X_query = data
    first, second = Counting(), Counting()
    kwargs = dict(n_subsets=4, fraction=0.5, random_state=2, cache_dir=tmp_path, progress=False)
    r1 = subsets(first, (X, y), Predict(X_query), **kwargs)
    r2 = subsets(second, (X, y), Predict(X_query), **kwargs)
    assert (first.calls, second.calls) == (4, 0)
    assert (tmp_path / "subset-00003-seed-0.npy").exists()
    np.testing.assert_array_equal(r1.outputs, r2.outputs)
    np.testing.assert_array_equal(r1.masks, r2.masks)


@pytest.mark.parametrize("kind", ["leave_one_out", "subsets"])
def test_cache_refuses_other_training_data_of_the_same_size(data, tmp_path, kind):
    X, y, X_query = data
    run = leave_one_out if kind == "leave_one_out" else subsets
    kwargs = {} if kind == "leave_one_out" else dict(n_subsets=3, random_state=0)
    run(ridge_train_fn, (X, y), Predict(X_query), cache_dir=tmp_path, progress=False, **kwargs)
    changed = y.copy()
    changed[N // 2] += 1.0  # one example in the middle, same n
    with pytest.raises(ValueError, match=r"training data differ.*train_sha256.*Fix: use a new cache_dir"):
        run(ridge_train_fn, (X, changed), Predict(X_query), cache_dir=tmp_path, progress=False, **kwargs)
    # the same data in another form (tensors instead of arrays) is the same data
    second = Counting()
    run(
        second,
        (torch.from_numpy(X), torch.from_numpy(y)),
        Predict(X_query),
        cache_dir=tmp_path,
        progress=False,
        **kwargs,
    )
    assert second.calls == 0


def test_content_fingerprint_covers_every_example_and_ignores_batching(data):
    X, y, _ = data
    base = as_data_source((X, y)).content_sha256()
    assert as_data_source((X, y), batch_size=5).content_sha256() == base
    for i in range(N):
        changed = X.copy()
        changed[i, 0] = np.nextafter(changed[i, 0], np.inf)
        assert as_data_source((changed, y)).content_sha256() != base


def test_interrupted_run_resumes(data, tmp_path):
    X, y, X_query = data
    crashing = Counting(fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        leave_one_out(crashing, (X, y), Predict(X_query), cache_dir=tmp_path, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["base.npy", "loo-000000.npy", "manifest.json"]  # only complete files, no temporaries
    for name in files[:2]:
        assert np.load(tmp_path / name, allow_pickle=False).shape == (N_QUERY,)

    resumed = Counting()
    result = leave_one_out(resumed, (X, y), Predict(X_query), cache_dir=tmp_path, progress=False)
    assert resumed.calls == N - 1  # base and example 0 were reused
    fresh = leave_one_out(ridge_train_fn, (X, y), Predict(X_query), progress=False)
    np.testing.assert_allclose(result.changes, fresh.changes, rtol=1e-12, atol=1e-14)


def test_non_finite_result_is_not_cached(data, tmp_path):
    X, y, X_query = data

    def evaluate(w):
        return np.full(N_QUERY, np.inf) if np.allclose(w, ridge(X[1:], y[1:])) else X_query @ w

    with pytest.raises(FloatingPointError, match="example 0"):
        leave_one_out(ridge_train_fn, (X, y), evaluate, indices=[2, 0, 1], cache_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.npy", "loo-000002.npy", "manifest.json"]


def test_mismatched_manifest_raises(data, tmp_path):
    X, y, X_query = data
    leave_one_out(
        ridge_train_fn, (X, y), Predict(X_query), indices=[0, 1], cache_dir=tmp_path, progress=False
    )
    with pytest.raises(ValueError, match=r"indices_sha256.*new cache_dir"):
        leave_one_out(
            ridge_train_fn, (X, y), Predict(X_query), indices=[0, 2], cache_dir=tmp_path, progress=False
        )
    with pytest.raises(ValueError, match="seed"):
        leave_one_out(
            ridge_train_fn,
            (X, y),
            Predict(X_query),
            indices=[0, 1],
            seed=1,
            cache_dir=tmp_path,
            progress=False,
        )
    with pytest.raises(ValueError, match="n_train"):
        leave_one_out(
            ridge_train_fn,
            (X[:-1], y[:-1]),
            Predict(X_query),
            indices=[0, 1],
            cache_dir=tmp_path,
            progress=False,
        )
    with pytest.raises(ValueError, match="kind"):
        subsets(ridge_train_fn, (X, y), Predict(X_query), n_subsets=2, cache_dir=tmp_path, progress=False)
    (tmp_path / "loo-000001.npy").unlink()  # one job to rerun, with an evaluate of another length
    with pytest.raises(ValueError, match=r"evaluate returned 2 values.*n_query=4"):
        leave_one_out(
            ridge_train_fn, (X, y), Predict(X_query[:2]), indices=[0, 1], cache_dir=tmp_path, progress=False
        )

    subset_dir = tmp_path / "subsets"
    subsets(ridge_train_fn, (X, y), Predict(X_query), n_subsets=2, cache_dir=subset_dir, progress=False)
    with pytest.raises(ValueError, match="fraction"):
        subsets(
            ridge_train_fn,
            (X, y),
            Predict(X_query),
            n_subsets=2,
            fraction=0.25,
            cache_dir=subset_dir,
            progress=False,
        )
    with pytest.raises(ValueError, match="random_state"):
        subsets(
            ridge_train_fn,
            (X, y),
            Predict(X_query),
            n_subsets=2,
            random_state=5,
            cache_dir=subset_dir,
            progress=False,
        )


def test_result_files_without_manifest_raise(data, tmp_path):
    X, y, X_query = data
    np.save(tmp_path / "loo-000000.npy", np.zeros(N_QUERY))
    with pytest.raises(ValueError, match="manifest"):
        leave_one_out(ridge_train_fn, (X, y), Predict(X_query), cache_dir=tmp_path, progress=False)


# -- parallel -----------------------------------------------------------------------------------------------------
def test_n_jobs_2_matches_n_jobs_1(data):
    X, y, X_query = data

    # Closures: loky ships them to worker processes with cloudpickle.
    def train_fn(train, seed):
        Xs, ys = train
        return ridge(Xs, ys) + 1e-3 * np.random.default_rng(seed).normal(size=Xs.shape[1])

    def evaluate(w):
        return X_query @ w

    serial = leave_one_out(train_fn, (X, y), evaluate, indices=[0, 4, 9], progress=False, n_jobs=1)
    parallel = leave_one_out(train_fn, (X, y), evaluate, indices=[0, 4, 9], progress=False, n_jobs=2)
    np.testing.assert_array_equal(parallel.indices, serial.indices)
    np.testing.assert_allclose(parallel.changes, serial.changes, rtol=1e-12, atol=1e-15)

    kwargs = dict(n_subsets=3, n_seeds=2, random_state=5, progress=False)
    s1 = subsets(train_fn, (X, y), evaluate, n_jobs=1, **kwargs)
    s2 = subsets(train_fn, (X, y), evaluate, n_jobs=2, **kwargs)
    np.testing.assert_allclose(s2.outputs, s1.outputs, rtol=1e-12, atol=1e-15)
    assert not np.allclose(s1.outputs[:, 0], s1.outputs[:, 1])  # seeds differ between runs


# -- evaluator ----------------------------------------------------------------------------------------------------
class SquaredError:
    """Stand-in for datatrace.Task: per-example squared error."""

    def measurement(self, model, batch):
        x, y = batch
        return (model(x).squeeze(-1) - y) ** 2


class MeanSquaredError:
    def measurement(self, model, batch):
        x, y = batch
        return ((model(x).squeeze(-1) - y) ** 2).mean()


def test_evaluator_with_linear_model():
    torch.manual_seed(0)
    x, y = torch.randn(7, 2), torch.randn(7)
    model = torch.nn.Linear(2, 1).double()
    model.train()
    evaluate = evaluator(SquaredError(), (x.numpy(), y.numpy()), batch_size=3)
    out = evaluate(model)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (7,)
    with torch.no_grad():
        expected = ((model(x.double()).squeeze(-1) - y.double()) ** 2).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert model.training  # mode restored

    restored = pickle.loads(pickle.dumps(evaluate))
    np.testing.assert_allclose(restored(model), out)

    with pytest.raises(ValueError, match="measurement"):
        evaluator(MeanSquaredError(), (x, y))(model)


def test_evaluator_in_leave_one_out():
    torch.manual_seed(1)
    x, y = torch.randn(10, 2, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    x_query, y_query = torch.randn(3, 2), torch.randn(3)  # float32 queries, cast to the model's float64

    def fit(train):
        xs, ys = train
        design = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], 1)
        coef = torch.linalg.lstsq(design, ys.unsqueeze(1)).solution.squeeze(1)
        model = torch.nn.Linear(2, 1).double()
        with torch.no_grad():
            model.weight.copy_(coef[:2].unsqueeze(0))
            model.bias.copy_(coef[2:])
        return model

    result = leave_one_out(fit, (x, y), evaluator(SquaredError(), (x_query, y_query)), progress=False)
    keep = torch.arange(10) != 5
    brute = ((fit((x[keep], y[keep]))(x_query.double()).squeeze(-1) - y_query.double()) ** 2).detach().numpy()
    np.testing.assert_allclose(result.retrained[:, 5], brute, rtol=1e-6)


# -- validation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"train_fn": 3}, "train_fn"),
        ({"evaluate": "loss"}, "evaluate"),
        ({"n_jobs": 0}, "n_jobs"),
        ({"n_jobs": "2"}, "n_jobs"),
        ({"n_jobs": 1.5}, "n_jobs"),
        ({"indices": [1, 1]}, "indices"),
        ({"indices": []}, "indices"),
        ({"indices": [0.5]}, "indices"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"progress": "yes"}, "progress"),
        ({"base_outputs": [[1.0]]}, "base_outputs"),
        ({"base_outputs": [np.nan] * N_QUERY}, "base_outputs"),
        ({"train": "data"}, "train"),
    ],
)
def test_leave_one_out_bad_inputs(data, kwargs, name):
    X, y, X_query = data
    args = {"train_fn": ridge_train_fn, "train": (X, y), "evaluate": Predict(X_query), "progress": False}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name) as excinfo:
        leave_one_out(**args)
    assert "Fix:" in str(excinfo.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"fraction": "half"}, "fraction"),
        ({"fraction": 0.01}, "fraction"),  # rounds to an empty subset
        ({"n_subsets": 0}, "n_subsets"),
        ({"n_subsets": 2.0}, "n_subsets"),
        ({"n_seeds": 0}, "n_seeds"),
        ({"n_seeds": True}, "n_seeds"),
        ({"random_state": None}, "random_state"),
        ({"random_state": -3}, "random_state"),
        ({"n_jobs": 0}, "n_jobs"),
        ({"train_fn": None}, "train_fn"),
        ({"evaluate": 1}, "evaluate"),
    ],
)
def test_subsets_bad_inputs(data, kwargs, name):
    X, y, X_query = data
    args = {"train_fn": ridge_train_fn, "train": (X, y), "evaluate": Predict(X_query), "progress": False}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name) as excinfo:
        subsets(**args)
    assert "Fix:" in str(excinfo.value)


def test_evaluator_bad_inputs():
    with pytest.raises(ValueError, match="task"):
        evaluator(object(), (np.zeros((2, 1)), np.zeros(2)))
    with pytest.raises(ValueError, match="batch_size"):
        evaluator(SquaredError(), (np.zeros((2, 1)), np.zeros(2)), batch_size=0)
    with pytest.raises(ValueError, match="query"):
        evaluator(SquaredError(), "queries")


def test_cache_dir_that_is_a_file_raises(data, tmp_path):
    X, y, X_query = data
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="cache_dir"):
        leave_one_out(ridge_train_fn, (X, y), Predict(X_query), cache_dir=path, progress=False)


def test_pandas_training_data_reach_train_fn_as_pandas_rows(data):
    """A (DataFrame, Series) training set is cut by position (.iloc) and handed to train_fn as pandas, whatever
    its index; the changes equal those of the numpy arrays."""
    pd = pytest.importorskip("pandas")
    X, y, X_query = data
    frame = pd.DataFrame(X, columns=["a", "b", "c"], index=np.arange(N) * 10 + 7)
    target = pd.Series(y, index=frame.index)
    seen = []

    def train_fn(train):
        Xs, ys = train
        seen.append((type(Xs).__name__, tuple(Xs.columns), type(ys).__name__))
        return ridge(Xs.to_numpy(), ys.to_numpy())

    result = leave_one_out(train_fn, (frame, target), Predict(X_query), indices=[0, 5], progress=False)
    expected = leave_one_out(ridge_train_fn, (X, y), Predict(X_query), indices=[0, 5], progress=False)
    np.testing.assert_allclose(result.changes, expected.changes, rtol=0, atol=1e-12)
    assert set(seen) == {("DataFrame", ("a", "b", "c"), "Series")}


def test_train_fn_returning_none_is_named(data):
    """A train_fn without `return` used to fail inside the task (``'NoneType' object is not callable``)."""
    X, y, _ = data
    task_evaluate = evaluator(_LossTask(), (torch.as_tensor(X[:2]), torch.as_tensor(y[:2])))

    def forgot_return(train):
        ridge_train_fn(train)

    with pytest.raises(
        ValueError, match=r"train_fn returned None for .*Fix: end train_fn with `return model`"
    ):
        subsets(forgot_return, (X, y), task_evaluate, n_subsets=2, progress=False)
    with pytest.raises(ValueError, match=r"train_fn returned None"):
        leave_one_out(forgot_return, (X, y), task_evaluate, indices=[0], n_jobs=2, progress=False)


class _LossTask:
    """measurement(model, batch): squared error of a torch module (picklable)."""

    def measurement(self, model, batch):
        x, y = batch
        return (model(x).reshape(-1) - y) ** 2
