"""datatrace spec: logistic regression on scikit-learn's breast cancer data (569 patients, 30 features).

Explain a misclassified patient by the training patients that pulled the model toward and away from the right
diagnosis:

    datatrace explain docs/examples/breast_cancer.py --k 5 --out out/breast-cancer

The model is scikit-learn's ``LogisticRegression`` (L2, C=1) fitted to a tight tolerance on standardised
features, so ``datatrace.from_sklearn`` rebuilds exactly its objective and the influence estimates agree with
refitting. Reports show the features in their original units (``display()``), not the standardised inputs.
"""

from __future__ import annotations

import functools

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

kind = "tabular"
class_names = ["malignant", "benign"]  # sklearn's target 0 and 1
curvature = "exact"
SEED = 0


@functools.cache
def _split():
    data = load_breast_cancer()
    X_train, X_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.3, random_state=SEED, stratify=data.target
    )
    scaler = StandardScaler().fit(X_train)
    return data, scaler, X_train, X_test, y_train.astype(np.int64), y_test.astype(np.int64)


feature_names = list(load_breast_cancer().feature_names)


def _fit(X, y):
    return LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(X, y)


def train():
    """Standardised training features and labels (0 = malignant, 1 = benign), as the estimator was fitted."""
    _, scaler, X_train, _, y_train, _ = _split()
    return scaler.transform(X_train), y_train


def query():
    """The held-out patients."""
    _, scaler, _, X_test, _, y_test = _split()
    return scaler.transform(X_test), y_test


def validation():
    """The same held-out patients, for `datatrace debug` (harm to their loss) and `datatrace value`."""
    return query()


def estimator():
    X, y = train()
    return _fit(X, y)


def train_fn(subset):
    """Refit on a subset of train() (used by `datatrace debug`'s removal check)."""
    X, y = subset
    return _fit(X, y)


def display():
    """The features in their original units, for the reports' feature tables."""
    _, _, X_train, X_test, _, _ = _split()
    return {"train": X_train, "query": X_test, "validation": X_test}
