"""datatrace.attributors.sklearn: fitted scikit-learn linear models -> influence functions on the estimator's own objective.

Ground truth is (a) closed forms for least squares and ridge (first order and, by Sherman-Morrison, the exact
leave-one-out change), (b) actual retraining of the same scikit-learn estimator without each left-out example,
and (c) stationarity: the rebuilt objective's gradient vanishes at the estimator's coefficients only if the
objective mapping (weight decay scaling, penalised intercept, label encoding) is exact.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression, LogisticRegressionCV, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from datatrace import ClassificationTask, InfluenceFunction
from datatrace.attributors.sklearn import SklearnInfluence, from_sklearn

N_TRAIN, N_TEST, N_FEATURES = 200, 50, 4
TIGHT = {"tol": 1e-10, "max_iter": 10_000}
LEFT_OUT = np.arange(3, N_TRAIN, 13)[:15]


# ---------------------------------------------------------------------------------------------------------------
# Data and helpers
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _single_threaded_blas():
    """These problems are tiny: several BLAS threads only contend (100x slower fits on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def regression():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N_TRAIN + N_TEST, N_FEATURES))
    y = X @ rng.normal(size=N_FEATURES) + 0.5 + rng.normal(size=len(X))
    return X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]


def _classification(n_classes: int, seed: int):
    X, y = make_classification(
        n_samples=N_TRAIN + N_TEST,
        n_features=N_FEATURES + 1,
        n_informative=3,
        n_redundant=0,
        n_classes=n_classes,
        flip_y=0.1,
        random_state=seed,
    )
    return X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]


@pytest.fixture(scope="module")
def binary():
    return _classification(2, 0)


@pytest.fixture(scope="module")
def multiclass():
    return _classification(3, 1)


def _with_intercept(X: np.ndarray) -> np.ndarray:
    return np.hstack([X, np.ones((len(X), 1))])


def _refit_without(estimator, X, y, indices):
    fits = []
    for i in indices:
        keep = np.arange(len(X)) != i
        fits.append(clone(estimator).fit(X[keep], y[keep]))
    return fits


def _query_loss(estimator, X, y) -> np.ndarray:
    """Per-example loss in datatrace's units: squared error (summed over outputs) or log-loss in nats."""
    if hasattr(estimator, "predict_proba"):
        proba = estimator.predict_proba(X)
        column = np.searchsorted(estimator.classes_, y)
        return -np.log(proba[np.arange(len(y)), column])
    residual = estimator.predict(X) - y
    return residual**2 if residual.ndim == 1 else (residual**2).sum(axis=1)


def _flat_params(coef: np.ndarray, intercept: np.ndarray, centre_intercept: bool) -> np.ndarray:
    m = coef.shape[0]
    intercept = intercept.reshape(m, -1)
    if centre_intercept:  # multinomial intercepts are defined up to a common shift
        intercept = intercept - intercept.mean(axis=1, keepdims=True)
    return np.hstack([coef.reshape(m, -1), intercept])


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ---------------------------------------------------------------------------------------------------------------
# Closed forms: least squares and ridge
# ---------------------------------------------------------------------------------------------------------------
def test_ols_params_change_is_the_closed_form_and_retraining_divides_by_one_minus_leverage(regression):
    X, y, _, _ = regression
    ols = LinearRegression().fit(X, y)
    inf = from_sklearn(ols, X, y)
    assert inf.task_.weight_decay == 0.0

    X1 = _with_intercept(X)
    gram_inv = np.linalg.inv(X1.T @ X1)
    residual = y - ols.predict(X)
    # first order: theta_{-i} - theta_hat = (1/n) H^{-1} g_i = -(X1^T X1)^{-1} x1_i r_i
    expected = -(gram_inv @ (X1[LEFT_OUT] * residual[LEFT_OUT, None]).T).T
    change = inf.coef_change(LEFT_OUT)
    estimated = np.hstack([change["coef_"], change["intercept_"][:, None]])
    np.testing.assert_allclose(estimated, expected, rtol=1e-8, atol=1e-12)

    # exact leave-one-out (Cook 1977): the first-order change divided by 1 - h_ii
    leverage = np.einsum("ij,jk,ik->i", X1[LEFT_OUT], gram_inv, X1[LEFT_OUT])
    refits = _refit_without(ols, X, y, LEFT_OUT)
    actual = np.array([np.append(r.coef_ - ols.coef_, r.intercept_ - ols.intercept_) for r in refits])
    np.testing.assert_allclose(actual * (1.0 - leverage[:, None]), estimated, rtol=1e-7, atol=1e-11)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_ridge_matches_closed_form_first_order_and_sherman_morrison_loo(regression, fit_intercept):
    X, y, _, _ = regression
    alpha = 30.0
    ridge = Ridge(alpha=alpha, fit_intercept=fit_intercept).fit(X, y)
    inf = from_sklearn(ridge, X, y)
    assert inf.task_.weight_decay == pytest.approx({"weight": 2 * alpha / N_TRAIN})
    assert ("bias" in dict(inf.module_.named_parameters())) is fit_intercept

    X1 = _with_intercept(X) if fit_intercept else X
    penalty = alpha * np.eye(X1.shape[1])
    if fit_intercept:
        penalty[-1, -1] = 0.0  # scikit-learn never penalises the intercept
    system_inv = np.linalg.inv(X1.T @ X1 + penalty)
    residual = y - ridge.predict(X)
    expected = -(system_inv @ (X1[LEFT_OUT] * residual[LEFT_OUT, None]).T).T
    change = inf.coef_change(LEFT_OUT)
    estimated = change["coef_"]
    if fit_intercept:
        estimated = np.hstack([estimated, change["intercept_"][:, None]])
    else:
        np.testing.assert_array_equal(change["intercept_"], 0.0)
    np.testing.assert_allclose(estimated, expected, rtol=1e-8, atol=1e-12)

    leverage = np.einsum("ij,jk,ik->i", X1[LEFT_OUT], system_inv, X1[LEFT_OUT])
    refits = _refit_without(ridge, X, y, LEFT_OUT)
    actual = np.array([r.coef_ - ridge.coef_ for r in refits])
    if fit_intercept:
        actual = np.hstack([actual, np.array([[r.intercept_ - ridge.intercept_] for r in refits])])
    np.testing.assert_allclose(actual * (1.0 - leverage[:, None]), estimated, rtol=1e-6, atol=1e-11)


def test_ridge_multi_output_matches_closed_form_per_target(regression):
    X, y, X_test, y_test = regression
    rng = np.random.default_rng(5)
    Y = np.stack([y, X @ rng.normal(size=N_FEATURES) + rng.normal(size=len(X))], axis=1)
    alpha = 10.0
    ridge = Ridge(alpha=alpha).fit(X, Y)
    inf = from_sklearn(ridge, X, Y)
    change = inf.coef_change(LEFT_OUT)
    assert change["coef_"].shape == (len(LEFT_OUT), 2, N_FEATURES)
    assert change["intercept_"].shape == (len(LEFT_OUT), 2)

    X1 = _with_intercept(X)
    penalty = alpha * np.diag([1.0] * N_FEATURES + [0.0])
    system_inv = np.linalg.inv(X1.T @ X1 + penalty)
    residual = Y - ridge.predict(X)
    for k in range(2):
        expected = -(system_inv @ (X1[LEFT_OUT] * residual[LEFT_OUT, k, None]).T).T
        estimated = np.hstack([change["coef_"][:, k], change["intercept_"][:, k, None]])
        np.testing.assert_allclose(estimated, expected, rtol=1e-8, atol=1e-12)
    # a query's loss sums the squared errors of both outputs
    Y_test = np.stack([y_test, np.zeros_like(y_test)], axis=1)
    assert inf.score((X_test[:3], Y_test[:3])).values.shape == (3, N_TRAIN)


# ---------------------------------------------------------------------------------------------------------------
# Against actual retraining of the scikit-learn estimator
# ---------------------------------------------------------------------------------------------------------------
CASES = {
    "linear-regression": ("regression", LinearRegression()),
    "ridge": ("regression", Ridge(alpha=20.0)),
    "ridge-no-intercept": ("regression", Ridge(alpha=20.0, fit_intercept=False)),
    "logistic-lbfgs": ("binary", LogisticRegression(C=0.1, **TIGHT)),
    "logistic-liblinear": (
        "binary",
        LogisticRegression(C=0.1, solver="liblinear", intercept_scaling=2.0, **TIGHT),
    ),
    "logistic-unpenalised": ("binary", LogisticRegression(C=np.inf, **TIGHT)),
    "multinomial-lbfgs": ("multiclass", LogisticRegression(C=0.1, **TIGHT)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_estimates_match_actual_retraining(case, request):
    data_name, template = CASES[case]
    X, y, X_test, y_test = request.getfixturevalue(data_name)
    estimator = clone(template).fit(X, y)
    inf = from_sklearn(estimator, X, y)
    # the estimator sits at the minimum of the rebuilt objective: this fails if the penalty scaling is off
    assert inf.convergence_ratio_ < 1e-3

    refits = _refit_without(estimator, X, y, LEFT_OUT)
    multinomial = case.startswith("multinomial")
    actual = _flat_params(
        np.stack([r.coef_ - estimator.coef_ for r in refits]),
        np.stack([np.asarray(r.intercept_ - estimator.intercept_) for r in refits]),
        multinomial,
    )
    change = inf.coef_change(LEFT_OUT)
    estimated = _flat_params(change["coef_"], change["intercept_"], multinomial)
    relative = np.linalg.norm(estimated - actual, axis=1) / np.linalg.norm(actual, axis=1)
    # the first-order error is O(leverage) = O(p/n) relative: a few percent here
    assert np.median(relative) < 0.05, relative
    assert relative.max() < 0.1, relative

    base = _query_loss(estimator, X_test, y_test)
    actual_loss = np.stack([_query_loss(r, X_test, y_test) - base for r in refits], axis=1)
    scores = inf.score((X_test, y_test)).values.numpy()[:, LEFT_OUT]
    assert _pearson(scores, actual_loss) > 0.995
    per_query = [np.corrcoef(scores[q], actual_loss[q])[0, 1] for q in range(len(X_test))]
    assert np.mean(per_query) > 0.98


# ---------------------------------------------------------------------------------------------------------------
# The objective mapping and the model
# ---------------------------------------------------------------------------------------------------------------
def test_logistic_weight_decay_mapping(binary):
    X, y, _, _ = binary
    n, C = len(X), 0.5
    lbfgs = from_sklearn(LogisticRegression(C=C, **TIGHT).fit(X, y), X, y)
    assert lbfgs.task_.weight_decay == pytest.approx({"weight": 1 / (C * n)})
    s = 3.0
    liblinear = LogisticRegression(C=C, solver="liblinear", intercept_scaling=s, **TIGHT).fit(X, y)
    inf = from_sklearn(liblinear, X, y)
    assert inf.task_.weight_decay == pytest.approx({"weight": 1 / (C * n), "bias": 1 / (C * n * s**2)})
    assert inf.convergence_ratio_ < 1e-3  # would fail with an unpenalised intercept: liblinear penalises it
    unpenalised = from_sklearn(LogisticRegression(C=np.inf, **TIGHT).fit(X, y), X, y)
    assert unpenalised.task_.weight_decay == {}


def test_module_reproduces_the_estimators_predictions(regression, binary, multiclass):
    X, y, X_test, _ = regression
    ridge = Ridge(alpha=1.0).fit(X, y)
    inf = from_sklearn(ridge, X, y)
    with torch.no_grad():
        out = inf.module_(torch.as_tensor(X_test)).numpy()
    np.testing.assert_allclose(out[:, 0], ridge.predict(X_test), rtol=1e-12, atol=1e-12)

    X, y, X_test, _ = binary
    clf = LogisticRegression(**TIGHT).fit(X, y)
    inf = from_sklearn(clf, X, y)
    with torch.no_grad():
        p = torch.sigmoid(inf.module_(torch.as_tensor(X_test))).numpy()[:, 0]
    np.testing.assert_allclose(p, clf.predict_proba(X_test)[:, 1], rtol=1e-12)
    assert inf.module_.weight.dtype == torch.float64

    X, y, X_test, _ = multiclass
    clf = LogisticRegression(**TIGHT).fit(X, y)
    inf = from_sklearn(clf, X, y)
    with torch.no_grad():
        p = torch.softmax(inf.module_(torch.as_tensor(X_test)), dim=1).numpy()
    np.testing.assert_allclose(p, clf.predict_proba(X_test), rtol=1e-10)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_multinomial_shift_direction_is_dropped(multiclass, fit_intercept):
    X, y, _, _ = multiclass
    clf = LogisticRegression(C=0.1, fit_intercept=fit_intercept, **TIGHT).fit(X, y)
    inf = from_sklearn(clf, X, y)
    # unpenalised intercepts: adding one constant to all of them changes nothing -> one zero eigenvalue
    assert inf.curvature_.info["num_zero_dropped"] == (1 if fit_intercept else 0)
    assert inf.curvature_.info["num_negative"] == 0
    change = inf.coef_change(LEFT_OUT)
    if fit_intercept:  # the pseudo-inverse answer has no component along the shift
        np.testing.assert_allclose(change["intercept_"].sum(axis=1), 0.0, atol=1e-12)
    else:
        assert inf.module_.bias is None
        np.testing.assert_array_equal(change["intercept_"], 0.0)


def test_labels_in_the_estimators_own_space(multiclass):
    X, y, X_test, y_test = multiclass
    names = np.array(["emu", "cat", "dog"])  # classes_ will be sorted: cat, dog, emu
    clf = LogisticRegression(C=0.1, **TIGHT).fit(X, names[y])
    inf = from_sklearn(clf, X, names[y])
    assert isinstance(inf, SklearnInfluence) and isinstance(inf, InfluenceFunction)
    np.testing.assert_array_equal(inf.encode_targets(["cat", "emu"]), [0, 2])

    # the same numbers as a plain InfluenceFunction on the module, task and encoded labels
    encoded = np.searchsorted(clf.classes_, names[y])
    manual = InfluenceFunction(
        inf.module_, ClassificationTask(weight_decay=inf.task_.weight_decay), progress=False
    ).fit((X, encoded))
    expected = manual.score((X_test, np.searchsorted(clf.classes_, names[y_test]))).values
    torch.testing.assert_close(inf.score((X_test, names[y_test])).values, expected)

    with pytest.raises(ValueError, match=r"query\[1\]\[1\].*'cow'.*classes_"):
        inf.score((X_test[:2], np.array(["cat", "cow"])))


def test_binary_positive_class_is_classes_1(binary):
    X, y, X_test, y_test = binary
    labels = np.array([7, -3])[y]  # classes_ = [-3, 7]: 7 is the positive class
    clf = LogisticRegression(**TIGHT).fit(X, labels)
    inf = from_sklearn(clf, X, labels)
    assert inf.convergence_ratio_ < 1e-3  # a flipped label map would put the estimator far from the minimum
    scores = inf.score((X_test, np.array([7, -3])[y_test])).values
    assert scores.shape == (N_TEST, N_TRAIN)


def test_loose_tolerance_logs_a_warning(multiclass, caplog):
    X, y, _, _ = multiclass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=0.1, tol=1e-2, max_iter=3).fit(X, y)
    with caplog.at_level(logging.WARNING, logger="datatrace"):
        inf = from_sklearn(clf, X, y)
    assert inf.convergence_ratio_ > 0.1
    text = " ".join(r.getMessage() for r in caplog.records if r.name == "datatrace.attributors.sklearn")
    assert "tol=0.01" in text and "tol=1e-10" in text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datatrace"):
        from_sklearn(LogisticRegression(C=0.1, **TIGHT).fit(X, y), X, y)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def test_unsupported_estimators_raise_type_error(binary):
    X, y, _, _ = binary
    with pytest.raises(TypeError, match=r"estimator=.*SVC.*LinearRegression, Ridge or LogisticRegression"):
        from_sklearn(SVC().fit(X, y), X, y)
    with pytest.raises(TypeError, match=r"estimator=LogisticRegression is a class.*Fix"):
        from_sklearn(LogisticRegression, X, y)
    with pytest.raises(TypeError, match=r"(?s)estimator=.*Pipeline.*final estimator"):
        from_sklearn(make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y), X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cv = LogisticRegressionCV(Cs=2, cv=2).fit(X, y)
    with pytest.raises(TypeError, match=r"estimator=.*LogisticRegressionCV.*C_\[0\]"):
        from_sklearn(cv, X, y)


@pytest.mark.parametrize(
    ("estimator", "pattern"),
    [
        (LogisticRegression(), r"estimator=LogisticRegression\(\) is not allowed: .*not fitted.*Fix: call"),
        (Ridge(), r"estimator=Ridge\(\) is not allowed: .*not fitted"),
        (LogisticRegression(class_weight="balanced"), r"estimator.class_weight='balanced'.*Fix: refit"),
        (LogisticRegression(l1_ratio=1.0, solver="liblinear"), r"estimator.l1_ratio=1.0.*'l1'.*Fix: refit"),
        (LogisticRegression(l1_ratio=0.5, solver="saga"), r"estimator.l1_ratio=0.5.*'elasticnet'"),
        (
            LogisticRegression(penalty="l1", l1_ratio=1.0, solver="saga"),
            r"estimator.penalty='l1' is not allowed",
        ),
        (Ridge(positive=True), r"estimator=.*positive=True.*Fix: refit with positive=False"),
        (LinearRegression(positive=True), r"estimator=.*positive=True"),
    ],
)
def test_unsupported_settings_raise_value_error(binary, estimator, pattern):
    X, y, _, _ = binary
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "not fitted" not in pattern:
            estimator = clone(estimator).fit(X, y)
    with pytest.raises(ValueError, match=pattern):
        from_sklearn(estimator, X, y)


def test_per_target_ridge_alpha_is_refused(regression):
    X, y, _, _ = regression
    Y = np.stack([y, -y], axis=1)
    with pytest.raises(ValueError, match=r"estimator.alpha=.*one alpha per target.*Fix: fit one Ridge"):
        from_sklearn(Ridge(alpha=np.array([1.0, 2.0])).fit(X, Y), X, Y)
    same = from_sklearn(Ridge(alpha=np.array([2.0, 2.0])).fit(X, Y), X, Y)
    assert same.task_.weight_decay == pytest.approx({"weight": 4.0 / N_TRAIN})


def test_data_that_does_not_match_the_estimator(binary, regression):
    X, y, X_test, y_test = binary
    clf = LogisticRegression(**TIGHT).fit(X, y)
    with pytest.raises(ValueError, match=r"X=ndarray\(shape=\(200, 3\).*fitted on 5 feature\(s\).*Fix"):
        from_sklearn(clf, X[:, :3], y)
    with pytest.raises(ValueError, match=r"X has 200 row\(s\) but y has 199.*Fix"):
        from_sklearn(clf, X, y[:-1])
    with pytest.raises(ValueError, match=r"y\[0\]=5 is not allowed: labels must be among .*classes_"):
        from_sklearn(clf, X, np.where(np.arange(N_TRAIN) == 0, 5, y))
    inf = from_sklearn(clf, X, y)
    with pytest.raises(ValueError, match=r"query\[0\]=.*fitted on 5 feature"):
        inf.score((X_test[:, :2], y_test))
    with pytest.raises(ValueError, match=r"(?s)query=.*expected a pair \(X, y\)"):
        inf.score((X_test,))
    with pytest.raises(ValueError, match=r"model=.*from_sklearn builds the model"):
        from_sklearn(clf, X, y, model=torch.nn.Linear(5, 1))

    Xr, yr, _, _ = regression
    ridge = Ridge().fit(Xr, yr)
    with pytest.raises(ValueError, match=r"y=.*1 target\(s\).*shape \(n,\)"):
        from_sklearn(ridge, Xr, np.stack([yr, yr], axis=1))


def test_sparse_inputs_and_influence_kwargs(binary):
    scipy_sparse = pytest.importorskip("scipy.sparse")
    X, y, X_test, y_test = binary
    clf = LogisticRegression(**TIGHT).fit(X, y)
    dense = from_sklearn(clf, X, y)
    sparse = from_sklearn(clf, scipy_sparse.csr_matrix(X), y, batch_size=64, params="weight")
    # params="weight" holds the intercept fixed: a different (smaller) parameter space
    assert sparse.fmodel_.num_params == N_FEATURES + 1
    assert dense.fmodel_.num_params == N_FEATURES + 2
    assert not sparse.train_grads_.requires_grad  # the frozen intercept is a constant, not an autograd leaf
    change = sparse.coef_change([0, 1])
    np.testing.assert_array_equal(change["intercept_"], 0.0)
    assert sparse.score((scipy_sparse.csr_matrix(X_test), y_test)).values.shape == (N_TEST, N_TRAIN)
