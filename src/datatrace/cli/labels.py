"""The label codec of spec files: a scikit-learn estimator's labels <-> the class indices of its PyTorch twin.

A spec with ``estimator()`` gives data in the estimator's own label space (any values in ``classes_``); the
commands work on the estimator's exact PyTorch equivalent (:func:`datatrace.from_sklearn`), whose task takes class
indices. :func:`encode_split` translates a data set one way (through :meth:`SklearnInfluence.encode_targets`),
:class:`DecodedTrainFn` translates retraining subsets back before the spec's ``train_fn`` sees them, and
:func:`short_label` writes a label in a few characters for tables.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from datatrace.attributors.sklearn import SklearnInfluence
from datatrace.data import DataLike

__all__ = ["DecodedTrainFn", "encode_split", "short_label"]


def encode_split(split: str, data: DataLike, estimator: Any) -> DataLike:
    """``data`` in the form the PyTorch model takes: unchanged without an estimator, else ``(X as float64, class
    indices)``; a label outside ``classes_`` raises a ValueError naming ``split()[1]``."""
    if estimator is None:
        return data
    X, y = data
    if hasattr(X, "toarray"):
        X = X.toarray()
    translator = SklearnInfluence(estimator)
    return np.asarray(X, dtype=np.float64), translator.encode_targets(y, f"{split}()[1]")


class DecodedTrainFn:
    """The spec's ``train_fn`` for an estimator, called on label-encoded subsets (labels decoded first)."""

    def __init__(self, train_fn: Callable[..., Any], classes: np.ndarray) -> None:
        self.train_fn = train_fn
        self.classes = classes
        try:
            self.accepts_seed = "seed" in inspect.signature(train_fn).parameters
        except (TypeError, ValueError):
            self.accepts_seed = False

    def __call__(self, subset: Any, seed: int | None = None) -> Any:
        X, y = subset
        y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
        decoded = (np.asarray(X), self.classes[y.astype(np.int64)])
        if self.accepts_seed and seed is not None:
            return self.train_fn(decoded, seed=seed)
        return self.train_fn(decoded)


def short_label(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    if isinstance(value, np.ndarray) and value.size > 1:
        return np.array2string(value, precision=3, threshold=6)
    return str(value.item() if hasattr(value, "item") and np.ndim(value) == 0 else value)
