"""Constructor and entry-point fuzz: every public entry point called with a wrong value for one argument at a time.

Each call must raise a ``ValueError`` / ``TypeError`` whose message names the argument (or ``NotFittedError``),
never a raw ``AttributeError`` / ``IndexError`` / ``KeyError`` from deep inside, and never accept the value in
silence. Attributors are called as ``Cls(...).fit(train)``, since a constructor may only store (scikit-learn
style) and validate in ``fit``. ``ENTRIES`` lists each entry point with a valid call (checked to succeed by
``test_valid_call_succeeds``, so the fuzz is not vacuous) and the arguments to fuzz; ``VALID`` lists the wrong-looking
values that are documented as valid for an argument (``None`` for an optional one, ``-3`` for ``n_jobs``...).
Cases that fail today in modules owned elsewhere are ``KNOWN`` (strict xfail, so a fix shows up as XPASS).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import catalogue
import datatrace
from datatrace.curvature.registry import available, make_curvature
from datatrace.errors import NotFittedError
from datatrace.verification import metrics, retrain, verify


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque object>"


BAD: dict[str, Any] = {
    "none": None,
    "string": "not-a-valid-value",
    "bool": True,
    "negative": -3,
    "nan": math.nan,
    "list": [1, 2],
    "object": _Opaque(),
}


@dataclass
class Entry:
    call: Callable[..., Any]  # call(**kwargs) -> result
    valid: Callable[[Any], dict[str, Any]]  # (context) -> a valid set of keyword arguments
    args: tuple[str, ...]  # the arguments to fuzz


class Context:
    """The trained small problems the valid calls use (built once per module)."""

    def __init__(self, tmp: Any) -> None:
        self.tmp = tmp
        self.p = catalogue.logistic_regression()
        X, y = self.p.train
        self.X_np, self.y_np = X.numpy(), y.numpy()
        self.sk = LogisticRegression(C=1.0, max_iter=500).fit(self.X_np, self.y_np)
        self.fitted = datatrace.InfluenceFunction(self.p.model, self.p.task, progress=False).fit(self.p.train)
        self.scores = self.fitted.score(self.p.query)
        self.counter = 0

    def fresh_dir(self) -> Any:
        self.counter += 1
        return self.tmp / f"d{self.counter}"

    def train_fn(self, data, seed=0):
        """A cheap stand-in for training (the fuzz checks arguments, not the verdict)."""
        return self.p.model


def _fit(cls):
    def call(train, **kwargs):
        return cls(**kwargs).fit(train)

    return call


def _ridge_train(data):
    X, y = data
    return np.linalg.solve(X.T @ X + 0.5 * np.eye(X.shape[1]), X.T @ y)


def _ridge_data(c):
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, 2)), rng.normal(size=8)


def _evaluate(w):
    return np.array([w[0], w[1]])


ENTRIES: dict[str, Entry] = {
    "InfluenceFunction": Entry(
        _fit(datatrace.InfluenceFunction),
        lambda c: dict(model=c.p.model, task=c.p.task, train=c.p.train, progress=False),
        ("model", "task", "curvature", "damping", "params", "dtype", "batch_size", "progress", "train"),
    ),
    "ProjectedInfluence": Entry(
        _fit(datatrace.ProjectedInfluence),
        lambda c: dict(model=c.p.model, task=c.p.task, train=c.p.train, progress=False),
        (
            "model",
            "task",
            "projector",
            "damping",
            "params",
            "store_dir",
            "dtype",
            "feature_dtype",
            "fisher",
            "ggn_samples",
            "regularizer",
            "batch_size",
            "chunk_size",
            "random_state",
            "progress",
            "train",
        ),
    ),
    "TRAK": Entry(
        _fit(datatrace.TRAK),
        lambda c: dict(models=[c.p.model], task=c.p.task, train=c.p.train, progress=False),
        ("models", "task", "projector", "store_dir", "train"),
    ),
    "TracIn": Entry(
        _fit(datatrace.TracIn),
        lambda c: dict(
            model=c.p.model,
            task=c.p.task,
            checkpoints=[c.p.model.state_dict()],
            learning_rates=0.1,
            batch_size_train=len(c.p.train[0]),
            train=c.p.train,
            progress=False,
        ),
        (
            "model",
            "task",
            "checkpoints",
            "learning_rates",
            "batch_size_train",
            "params",
            "projector",
            "dtype",
            "batch_size",
            "progress",
            "train",
        ),
    ),
    "from_sklearn": Entry(
        datatrace.from_sklearn,
        lambda c: dict(estimator=c.sk, X=c.X_np, y=c.y_np),
        ("estimator", "X", "y", "curvature", "damping", "progress"),
    ),
    "ClassificationTask": Entry(datatrace.ClassificationTask, lambda c: {}, ("weight_decay",)),
    "RegressionTask": Entry(datatrace.RegressionTask, lambda c: {}, ("weight_decay",)),
    "RandomProjector": Entry(
        datatrace.RandomProjector,
        lambda c: {},
        ("dim", "kind", "random_state", "eps", "max_dim", "density", "max_cached_bytes"),
    ),
    "FactorizedProjector": Entry(
        datatrace.FactorizedProjector,
        lambda c: {},
        ("dim_in", "dim_out", "kind", "random_state", "eps", "max_dim", "density"),
    ),
    "GradientStore.create": Entry(
        datatrace.GradientStore.create,
        lambda c: dict(directory=c.fresh_dir(), n=4, dim=3),
        ("directory", "n", "dim", "dtype", "chunk_size", "fingerprints", "metadata", "chunk_multiple"),
    ),
    "leave_one_out": Entry(
        retrain.leave_one_out,
        lambda c: dict(
            train_fn=_ridge_train, train=_ridge_data(c), evaluate=_evaluate, indices=[0, 1], progress=False
        ),
        (
            "train_fn",
            "train",
            "evaluate",
            "indices",
            "n_jobs",
            "cache_dir",
            "progress",
            "base_outputs",
            "seed",
        ),
    ),
    "subsets": Entry(
        retrain.subsets,
        lambda c: dict(
            train_fn=_ridge_train, train=_ridge_data(c), evaluate=_evaluate, n_subsets=3, progress=False
        ),
        (
            "train_fn",
            "train",
            "evaluate",
            "n_subsets",
            "fraction",
            "n_seeds",
            "random_state",
            "n_jobs",
            "cache_dir",
            "progress",
        ),
    ),
    "metrics.lds": Entry(
        metrics.lds,
        lambda c: dict(
            scores=np.random.default_rng(0).normal(size=(2, 6)),
            masks=np.random.default_rng(1).random((5, 6)) < 0.5,
            outputs=np.random.default_rng(2).normal(size=(5, 2)),
        ),
        ("scores", "masks", "outputs"),
    ),
    "metrics.loo_correlation": Entry(
        metrics.loo_correlation,
        lambda c: dict(
            estimated=np.random.default_rng(0).normal(size=(2, 6)),
            actual=np.random.default_rng(1).normal(size=(2, 6)),
        ),
        ("estimated", "actual"),
    ),
    "verify": Entry(
        verify,
        lambda c: dict(
            attributor=c.fitted,
            train=c.p.train,
            train_fn=c.train_fn,
            query=c.p.query,
            scores=c.scores,
            method="leave-one-out",
            n_retrains=4,
            progress=False,
        ),
        (
            "attributor",
            "train",
            "train_fn",
            "query",
            "scores",
            "method",
            "n_retrains",
            "n_seeds",
            "loo_max_n",
            "noise_ratio",
            "random_state",
            "n_jobs",
            "cache_dir",
            "progress",
        ),
    ),
}

# every registered curvature route, through make_curvature, with each of its options
_ROUTE_OPTIONS = {
    "arnoldi": ("matrix", "rank", "negative", "n_iter", "random_state", "max_bytes", "complement"),
    "auto": ("max_bytes",),
    "block-diagonal": ("base", "negative", "blocks", "rtol", "max_bytes"),
    "cg": ("matrix", "max_iter", "rtol", "preconditioner", "block_size", "random_state"),
    "diagonal": ("matrix", "negative", "n_probes", "random_state"),
    "ekfac": ("fisher", "n_samples", "random_state", "input_factor"),
    "exact": ("negative", "rtol", "max_bytes"),
    "gauss-newton": ("negative", "rtol", "max_bytes"),
    "identity": (),
    "kfac": ("fisher", "n_samples", "random_state", "input_factor"),
    "lissa": ("matrix", "scale", "depth", "repeats", "batch_size", "tail", "random_state"),
}


def _route_fit(model, task, train, **route_kwargs):
    """A route is built by make_curvature and used by InfluenceFunction.fit, where a lazy check would fire."""
    curvature = make_curvature(**route_kwargs)
    return datatrace.InfluenceFunction(model, task, curvature=curvature, progress=False).fit(train)


for _route in available():
    ENTRIES[f"make_curvature[{_route}]"] = Entry(
        _route_fit,
        lambda c, route=_route: dict(model=c.p.model, task=c.p.task, train=c.p.train, curvature=route),
        ("damping", *_ROUTE_OPTIONS.get(_route, ())),
    )

# wrong-looking values that are documented as valid for an argument
_OPTIONAL = {"none"}
_PATH = {"none", "string"}  # an optional directory: any string is a (relative) path
VALID: dict[tuple[str, str], set[str]] = {}
for _entry, _names in {
    "InfluenceFunction": {"params": _OPTIONAL, "dtype": _OPTIONAL, "batch_size": _OPTIONAL},
    "ProjectedInfluence": {
        "params": _OPTIONAL,
        "store_dir": _PATH,
        "feature_dtype": _OPTIONAL,
        "ggn_samples": _OPTIONAL,
        "batch_size": _OPTIONAL,
        "chunk_size": _OPTIONAL,
    },
    "TRAK": {"store_dir": _PATH},
    "TracIn": {"params": _OPTIONAL, "projector": _OPTIONAL, "dtype": _OPTIONAL, "batch_size": _OPTIONAL},
    "GradientStore.create": {
        "directory": {"string"},
        "chunk_size": _OPTIONAL,
        "fingerprints": _OPTIONAL,
        "metadata": _OPTIONAL,
    },
    "leave_one_out": {
        "indices": {"none", "list", "negative"},  # -3 is the third example from the end
        "n_jobs": {"none", "negative"},  # joblib: -3 is all cores but two
        "cache_dir": _PATH,
        "base_outputs": {"none", "list"},  # [1, 2]: one output per query (two queries)
        "seed": _OPTIONAL,
    },
    "subsets": {"n_jobs": {"none", "negative"}, "cache_dir": _PATH},
    "verify": {"scores": _OPTIONAL, "n_jobs": {"none", "negative"}, "cache_dir": _PATH},
    "make_curvature[arnoldi]": {"n_iter": _OPTIONAL},
    "make_curvature[block-diagonal]": {"rtol": _OPTIONAL},
    "make_curvature[cg]": {"max_iter": _OPTIONAL, "preconditioner": _OPTIONAL, "block_size": _OPTIONAL},
    "make_curvature[ekfac]": {"random_state": _OPTIONAL, "input_factor": _OPTIONAL},
    "make_curvature[kfac]": {"random_state": _OPTIONAL, "input_factor": _OPTIONAL},
    "make_curvature[exact]": {"rtol": _OPTIONAL},
    "make_curvature[gauss-newton]": {"rtol": _OPTIONAL},
}.items():
    for _arg, _ids in _names.items():
        VALID[(_entry, _arg)] = _ids
for _entry in ENTRIES:  # progress flags: True is valid
    VALID.setdefault((_entry, "progress"), set()).add("bool")

# cases that fail today in modules owned elsewhere: (entry, argument) -> (bad value ids, what happens today)
KNOWN: dict[tuple[str, str], tuple[set[str], str]] = {}


def _cases():
    for name, entry in ENTRIES.items():
        for arg in entry.args:
            for bad_id in BAD:
                if bad_id in VALID.get((name, arg), set()):
                    continue
                marks = []
                ids, reason = KNOWN.get((name, arg), (set(), ""))
                if bad_id in ids:
                    marks.append(pytest.mark.xfail(strict=True, reason=reason))
                yield pytest.param(name, arg, bad_id, id=f"{name}-{arg}-{bad_id}", marks=marks)


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> Context:
    return Context(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("name", list(ENTRIES))
def test_valid_call_succeeds(context, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entry = ENTRIES[name]
    assert entry.call(**entry.valid(context)) is not None


@pytest.mark.parametrize(("name", "arg", "bad_id"), list(_cases()))
def test_wrong_value_is_refused_by_name(context, name, arg, bad_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a string given as a directory is created here, not in the repository
    entry = ENTRIES[name]
    kwargs = entry.valid(context)
    kwargs[arg] = BAD[bad_id]
    try:
        entry.call(**kwargs)
    except NotFittedError:
        return
    except (ValueError, TypeError) as error:
        assert arg in str(error), f"{type(error).__name__} does not name {arg!r}: {error}"
        return
    except Exception as error:  # a raw AttributeError / IndexError / KeyError / RuntimeError
        pytest.fail(f"{name}({arg}={BAD[bad_id]!r}) raised {type(error).__name__}: {error}")
    pytest.fail(f"{name}({arg}={BAD[bad_id]!r}) was accepted in silence")


def test_bad_values_are_distinct_kinds():
    """The fuzz values cover the kinds named in issue 12 (None, str, bool, negative int, NaN, list, object)."""
    assert {type(v) for v in BAD.values()} == {type(None), str, bool, int, float, list, _Opaque}
    assert torch.isnan(torch.tensor(BAD["nan"]))
