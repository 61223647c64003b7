"""datatrace.apps with inputs as users pass them: numpy integers, pandas objects, scikit-learn label spaces, group
labels with gaps. Each is either supported (checked against a float64 oracle or the plain form) or refused with
the argument named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import datatrace
from datatrace import ClassificationTask, InfluenceFunction, RegressionTask
from datatrace.apps import debug_data, detection_summary, explain, fairness_audit, removal_check
from datatrace.verification.training import fit_full_batch

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def logreg():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 3, generator=g, dtype=F64)
    y = (X[:, 0] + 0.5 * torch.randn(30, generator=g, dtype=F64) > 0).long()
    task = ClassificationTask(weight_decay=0.1)
    model = fit_full_batch(torch.nn.Linear(3, 2).double(), task, (X, y))
    return InfluenceFunction(model, task, progress=False).fit((X, y)), X, y, task


@pytest.fixture(scope="module")
def sklearn_labels():
    """Multinomial logistic regression on labels {1, 2, 5} and the same labels as strings."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(45, 3))
    codes = np.digitize(X[:, 0] + 0.3 * rng.normal(size=45), [-0.4, 0.4])
    out = {}
    for name, labels in (("numbers", np.array([1, 2, 5])), ("strings", np.array(["low", "mid", "high"]))):
        y = labels[codes]
        clf = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(X, y)
        out[name] = (clf, datatrace.from_sklearn(clf, X, y), X, y)
    return out


@pytest.mark.parametrize("kind", ["numbers", "strings"])
def test_fairness_positive_class_is_a_label_of_the_estimator(sklearn_labels, kind):
    """positive_class=5 (or 'high') is the estimator's label, compared with its own predict_proba in float64:
    the class index 5 does not exist, and index 1 would silently be another class."""
    clf, inf, X, y = sklearn_labels[kind]
    label = clf.classes_[-1].item() if kind == "numbers" else "high"
    column = list(clf.classes_).index(label)
    groups = np.arange(12) % 2
    audit = fairness_audit(inf, (X[:12], y[:12]), groups, metric="positive_rate", positive_class=label)
    proba = clf.predict_proba(X[:12])[:, column]
    expected = proba[groups == 0].mean() - proba[groups == 1].mean()
    assert audit.gap == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert repr(label) in audit.measurement
    # a label the estimator does not know is refused with its classes_
    with pytest.raises(ValueError, match=r"positive_class=.*classes_"):
        fairness_audit(inf, (X[:12], y[:12]), groups, metric="positive_rate", positive_class=3)


def test_fairness_default_positive_class_of_an_estimator_is_classes_1(sklearn_labels):
    clf, inf, X, y = sklearn_labels["strings"]
    groups = np.arange(12) % 2
    audit = fairness_audit(inf, (X[:12], y[:12]), groups, metric="positive_rate")
    proba = clf.predict_proba(X[:12])[:, 1]
    assert audit.gap == pytest.approx(proba[groups == 0].mean() - proba[groups == 1].mean(), rel=1e-6)


def test_fairness_positive_rate_refuses_a_regression_model():
    X = torch.randn(20, 2, dtype=F64)
    y = X.sum(1, keepdim=True)
    task = RegressionTask(weight_decay=0.1)
    model = fit_full_batch(torch.nn.Linear(2, 1).double(), task, (X, y))
    inf = InfluenceFunction(model, task, progress=False).fit((X, y))
    with pytest.raises(ValueError, match=r"metric='positive_rate'.*RegressionTask.*metric='loss'"):
        fairness_audit(inf, (X[:4], y[:4]), [0, 1, 0, 1], metric="positive_rate")
    assert np.isfinite(fairness_audit(inf, (X[:4], y[:4]), [0, 1, 0, 1]).gap)


def test_fairness_groups_with_missing_or_mixed_labels_are_refused(logreg):
    inf, X, y, _ = logreg
    with pytest.raises(ValueError, match=r"groups=.*groups\[1\] is None"):
        fairness_audit(inf, (X[:4], y[:4]), np.array(["a", None, "b", "a"], dtype=object))
    with pytest.raises(ValueError, match=r"groups=.*groups\[2\] is nan"):
        fairness_audit(inf, (X[:4], y[:4]), np.array(["a", "b", float("nan"), "a"], dtype=object))
    with pytest.raises(ValueError, match=r"groups=.*mixed types.*astype\(str\)"):
        fairness_audit(inf, (X[:4], y[:4]), np.array([1, "1", 1, "1"], dtype=object))
    # string groups, with a group of one example, are supported: the gap is that example minus the rest
    audit = fairness_audit(inf, (X[:4], y[:4]), np.array(["solo", "rest", "rest", "rest"]))
    assert audit.group_sizes == (3, 1) and audit.group_names == ("rest", "solo")


def test_numpy_integers_are_accepted_as_counts_and_query_rows(logreg):
    inf, X, y, task = logreg
    k = np.int64(3)
    plain = explain(inf, (X[:2], y[:2]), k=3)
    numpy_k = explain(inf, (X[:2], y[:2]), k=k)
    assert torch.equal(plain[0].proponents.indices, numpy_k[0].proponents.indices)
    scores = inf.score((X[:2], y[:2]))
    assert torch.equal(scores.proponents(np.int64(1), k).indices, scores.proponents(1, 3).indices)
    result = debug_data(inf)
    summary = detection_summary(result, np.arange(30) < 3, fractions=0.1)  # one fraction, not a sequence
    assert summary["fractions"] == [0.1]

    def train_fn(data):
        return fit_full_batch(torch.nn.Linear(3, 2).double(), task, data)

    check = removal_check(train_fn, (X, y), lambda m: 0.0, result.suspicious_order, k=np.int64(2), n_random=0)
    assert check.k == 2 and check.removed.size == 2


def test_pandas_query_and_training_data_match_numpy(logreg):
    pd = pytest.importorskip("pandas")
    inf, X, y, _ = logreg
    frame = pd.DataFrame(X[:4].numpy(), columns=["a", "b", "c"], index=[40, 41, 42, 43])
    labels = pd.Series(y[:4].numpy(), index=[40, 41, 42, 43])
    plain = inf.score((X[:4], y[:4])).values
    assert torch.allclose(inf.score((frame, labels)).values, plain, rtol=0, atol=1e-12)
    train = (pd.DataFrame(X.numpy()), pd.Series(y.numpy()))
    assert np.allclose(debug_data(inf, train=train).training_loss, debug_data(inf).training_loss)
    with pytest.raises(ValueError, match=r"query\[0\]=DataFrame\(shape=\(4, 2\)\).*non-numeric"):
        inf.score((pd.DataFrame({"a": [1.0, 2, 3, 4], "b": ["x", "y", "x", "y"]}), labels))


def test_non_finite_scores_are_refused_not_ranked_last(logreg, monkeypatch):
    """A NaN self-influence or score would sort to one end of every ranking (the example silently looks harmless,
    or is never flagged); the apps say which example instead."""
    from datatrace.apps import memorisation_audit, value_data

    inf, X, y, _ = logreg
    self_influence, score = inf.self_influence, inf.score

    def nan_self_influence():
        values = self_influence().clone()
        values[3] = float("nan")
        return values

    def nan_score(query, measurement=None):
        scores = score(query, measurement)
        scores.values[:, 5] = float("inf")
        return scores

    monkeypatch.setattr(inf, "self_influence", nan_self_influence)
    with pytest.raises(FloatingPointError, match=r"self_influence\(\).*index \(3,\): nan"):
        debug_data(inf)
    with pytest.raises(FloatingPointError, match=r"self_influence\(\).*index \(3,\)"):
        memorisation_audit(inf, false_positive_rate=0.2)
    monkeypatch.setattr(inf, "self_influence", self_influence)
    monkeypatch.setattr(inf, "score", nan_score)
    with pytest.raises(FloatingPointError, match=r"validation data.*index \(5,\): inf"):
        value_data(inf, (X[:3], y[:3]))
    with pytest.raises(FloatingPointError, match=r"validation data.*index \(5,\)"):
        debug_data(inf, validation=(X[:3], y[:3]))
    with pytest.raises(FloatingPointError, match=r"scores of the query.*index \(0, 5\)"):
        fairness_audit(inf, (X[:4], y[:4]), [0, 1, 0, 1])
