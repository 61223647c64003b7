"""What every application needs from a fitted attributor, through the :class:`~datatrace.attributors.base.Attributor`
contract only: the model and task the scores refer to, data in the model's own form, the training data, and the
model's per-example outputs (sign convention of every score: :data:`datatrace.scores.MEANING`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace.attributors.base import Attributor
from datatrace.data import DataLike, DataSource, as_data_source, cast_batch
from datatrace.errors import bad_value, check_finite
from datatrace.tasks import Task

__all__ = [
    "as_numpy",
    "call_train",
    "check_attributor",
    "model_and_task",
    "per_example",
    "prepare_query",
    "training_source",
]


def check_attributor(influence: Any, allowed: str, fitted: bool = False) -> Attributor:
    """``influence`` if it is a datatrace attributor (and, with ``fitted``, a fitted one), else a ValueError naming
    ``allowed``. Without ``fitted`` an unfitted attributor raises its own NotFittedError when used."""
    if not isinstance(influence, Attributor) or (fitted and not influence.is_fitted):
        raise bad_value(
            "influence", influence, allowed, "pass e.g. datatrace.InfluenceFunction(model, task).fit(train)"
        )
    return influence


def model_and_task(influence: Attributor) -> tuple[nn.Module, Task]:
    """The trained model the scores refer to (the attributor's working copy at ``theta_hat``) and its task."""
    model = influence.fitted_model
    task = influence.task
    if isinstance(model, nn.Module) and isinstance(task, Task):
        return model, task
    raise bad_value(
        "influence",
        influence,
        f"expected a fitted datatrace attributor with one model and task ({influence.name} has none)",
        "pass a fitted datatrace.InfluenceFunction (or TracIn / projected influence)",
    )


def prepare_query(influence: Attributor, data: DataLike, name: str) -> DataLike:
    """Data in the form the attributor's own model needs (scikit-learn labels are encoded through ``classes_``)."""
    return influence.prepare_data(data, name)


def training_source(influence: Attributor, train: DataLike | None) -> DataSource:
    """``train`` in the model's form, or the training data the attributor kept."""
    if train is not None:
        return as_data_source(prepare_query(influence, train, "train"), "train")
    source = influence.training_data
    if isinstance(source, DataSource):
        return source
    raise bad_value(
        "train",
        None,
        f"{influence.name} does not keep its training data, so the training losses cannot be computed",
        "pass train=(X, y), the data the attributor was fitted on",
    )


def per_example(
    model: nn.Module, fn: Callable[[nn.Module, tuple], torch.Tensor], data: DataLike, name: str
) -> np.ndarray:
    """``fn(model, batch)`` for every example of ``data`` in index order, as float64 numpy, under no_grad."""
    source = data if isinstance(data, DataSource) else as_data_source(data, name)
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None else torch.get_default_dtype()
    device = first.device if first is not None else None
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for idx, batch in source.batches():
                values = torch.as_tensor(fn(model, cast_batch(batch, dtype, device)))
                if values.shape != (len(idx),):
                    raise ValueError(
                        f"the measurement returned shape {tuple(values.shape)} for a batch of {len(idx)} {name} "
                        f"examples; it must return one value per example. Fix: use reduction='none'."
                    )
                out.append(values.detach().to("cpu", torch.float64))
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def as_numpy(values: Any, what: str | None = None) -> np.ndarray:
    """``values`` as float64 numpy; with ``what`` (e.g. ``"self_influence()"``), NaN or inf raise a
    FloatingPointError saying where, instead of sorting silently to one end of a ranking."""
    if isinstance(values, torch.Tensor):
        out = values.detach().to("cpu", torch.float64).numpy()
    else:
        out = np.asarray(values, dtype=np.float64)
    if what is not None:
        check_finite(
            torch.from_numpy(out),
            f"the attributor's {what}",
            "Fix: look for NaN or inf in the model's parameters and the data, or raise the attributor's damping.",
        )
    return out


def call_train(train_fn: Callable[..., Any], data: Any, seed: int | None) -> Any:
    """``train_fn(data, seed=seed)`` when ``train_fn`` takes a ``seed`` (and one is given), else ``train_fn(data)``."""
    try:
        accepts_seed = "seed" in inspect.signature(train_fn).parameters
    except (TypeError, ValueError):
        accepts_seed = False
    return train_fn(data, seed=seed) if accepts_seed and seed is not None else train_fn(data)
