"""The attributor contract: what every estimator of training-data influence offers, and the checks they share.

An attributor is fitted once on the training data ``D = {z_1..z_n}`` and then answers queries with a
:class:`~datatrace.Scores` matrix whose entry ``[q, i]`` estimates the leave-one-out change
``f_q(theta_{-i}) - f_q(theta_hat)`` (sign and units: :data:`datatrace.scores.MEANING`). Every route keeps that
meaning, so applications (:mod:`datatrace.apps`) are written once against :class:`Attributor`:

* ``fit(train) -> self``; ``score(query, measurement=None) -> Scores``; ``self_influence() -> (n_train,)``;
* ``top_k(query, k)``: per query, the ``k`` training examples with the largest ``|score|``, exactly
  :meth:`Scores.top_k <datatrace.Scores.top_k>` of ``score(query)``;
* read-only accessors: ``n_train``, ``fitted_model`` (the private working copy the scores refer to),
  ``training_data`` (when kept), ``prepare_data`` (data in the form the working model takes),
  ``supports_measurement``.

Shared here: the one "not fitted" check (:class:`~datatrace.errors.NotFittedError`, scikit-learn's
``check_is_fitted`` style), the one stationarity check (influence functions assume ``grad L(theta_hat) = 0``,
Koh & Liang 2017) and the one shape of ``Scores.metadata``.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

try:  # optional: the machine's available memory, for the default memory budget
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

from datatrace.data import DataLike, DataSource
from datatrace.errors import NotFittedError, bad_value
from datatrace.scores import Scores, TopK

logger = logging.getLogger(__name__)

__all__ = [
    "FALLBACK_MEMORY_BYTES",
    "MEMORY_FRACTION",
    "STATIONARITY_TOLERANCE",
    "Attributor",
    "Measurement",
    "check_candidates",
    "check_index_set",
    "check_stationary",
    "default_memory_budget",
    "json_scalars",
]

#: a query measurement: ``(model, batch) -> tensor of shape (batch_size,)``
Measurement = Callable[[nn.Module, tuple], torch.Tensor]

#: relative gradient norm ``||grad L|| / mean_i ||g_i||`` above which the model is reported as not at a minimum
#: (the rule and its reasons: :func:`check_stationary`)
STATIONARITY_TOLERANCE = 0.3


#: share of the currently available memory (psutil on CPU, ``torch.cuda.mem_get_info`` on CUDA) that the default
#: budget lets one attributor's stored matrices take
MEMORY_FRACTION = 0.5
#: the default budget where the available memory cannot be read (psutil not installed)
FALLBACK_MEMORY_BYTES = 4 * 1024**3


def default_memory_budget(device: torch.device | str | None = None) -> tuple[int, str]:
    """The default ``max_bytes`` of an attributor's stored matrices and, in words, where it comes from:
    :data:`MEMORY_FRACTION` of the memory available now on ``device`` (CUDA: ``torch.cuda.mem_get_info``; CPU:
    ``psutil.virtual_memory().available`` when psutil is installed), else :data:`FALLBACK_MEMORY_BYTES`."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free = torch.cuda.mem_get_info(dev)[0]
        return int(MEMORY_FRACTION * free), f"{MEMORY_FRACTION:g} of the free memory of {dev}"
    if psutil is not None:
        free = psutil.virtual_memory().available
        return int(MEMORY_FRACTION * free), f"{MEMORY_FRACTION:g} of the machine's available memory"
    return FALLBACK_MEMORY_BYTES, "the fixed default used when psutil is not installed"


def check_index_set(name: str, idx: torch.Tensor, given: Any = None) -> torch.Tensor:
    """``idx`` (normalised indices, :func:`datatrace.errors.check_indices`, of the user's ``given``) as a *set*:
    a ValueError naming the first repeated index. Removing a set counts each example once; a repeat would
    silently count it twice."""
    if idx.numel() > 1:
        values, counts = torch.unique(idx, return_counts=True)
        if bool((counts > 1).any()):
            repeated = values[counts > 1]
            raise bad_value(
                name,
                idx if given is None else given,
                f"a set of examples to remove together, each at most once; index {int(repeated[0])} is repeated"
                + (f" (and {len(repeated) - 1} more)" if len(repeated) > 1 else "")
                + " (negative indices count from the end), which would count that example twice",
                "pass each example once (e.g. sorted(set(indices))); for a weighted removal add the rows of "
                "params_change yourself",
            )
    return idx


def check_candidates(name: str, candidates: Any, n_query: int, n_train: int) -> torch.Tensor:
    """``candidates`` as an ``(n_query, m)`` long tensor of training indices, ``m >= 1``: row ``q`` lists the
    training examples whose scores on query ``q`` are wanted (a shortlist, :mod:`datatrace.apps.shortlist`).
    Negative indices count from the end, as everywhere; a row may not repeat an example (it would be scored twice
    and counted twice by a recall). Errors name ``name``, the value, what is allowed and the fix."""
    try:
        idx = torch.as_tensor(candidates)
    except (TypeError, ValueError, RuntimeError):
        raise bad_value(
            name,
            candidates,
            "expected integer training indices, one row per query",
            "pass an (n_query, m) array",
        ) from None
    if idx.dim() == 1 and n_query == 1:
        idx = idx.reshape(1, -1)
    if idx.dim() != 2 or idx.shape[0] != n_query or idx.shape[1] == 0:
        raise bad_value(
            name,
            candidates,
            f"expected shape (n_query, m) = ({n_query}, m) with m >= 1: one row of training indices per query",
            "pass e.g. datatrace.apps.shortlist.select_candidates(similarity, m) for these queries",
        )
    if idx.numel() and (idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool):
        raise bad_value(
            name, candidates, f"expected integer indices, got dtype {idx.dtype}", "pass integer indices"
        )
    idx = idx.long()
    if int(idx.min()) < -n_train or int(idx.max()) >= n_train:
        bad = idx[(idx < -n_train) | (idx >= n_train)][0].item()
        raise IndexError(
            f"{name} contains {bad}, out of range for {n_train} training examples: allowed is -{n_train} <= index "
            f"< {n_train}. Fix: pass indices of the training data the attributor was fitted on."
        )
    idx = torch.where(idx < 0, idx + n_train, idx)
    ordered = idx.sort(dim=1).values
    repeats = ordered[:, 1:] == ordered[:, :-1]
    if bool(repeats.any()):
        q, j = (int(v) for v in repeats.nonzero()[0])
        raise bad_value(
            name,
            candidates,
            f"each row must list a training example at most once; row {q} repeats index {int(ordered[q, j])}",
            "remove the repeats (e.g. with numpy.unique per row), or choose the candidates with select_candidates",
        )
    return idx


def check_stationary(gradient_norm: float, typical_norm: float, gradient: str, typical: str) -> float:
    """Warn when ``gradient_norm`` (the norm of the training objective's gradient at ``theta_hat``, named
    ``gradient`` in the message) exceeds :data:`STATIONARITY_TOLERANCE` times ``typical_norm`` (the mean
    per-example gradient norm, named ``typical``). Returns the relative norm ``r = ||grad L|| / mean_i ||g_i||``.

    The rule warns only where the warning tells the user something:

    * ``r <= 1`` by the triangle inequality (the regulariser aside), with ``r = 1`` when every example's gradient
      points the same way: ``r`` is the share of a typical example's gradient that all examples have in common.
    * A model trained by minibatch SGD or Adam stops at the noise floor of its minibatch gradients: its full
      gradient is about the minibatch noise, of order ``1 / sqrt(batch size)`` of a per-example gradient (about
      0.18 for batches of 32), whatever the number of epochs. A common gradient of that size does not bias the
      scores to first order: it adds the same Newton step ``-H^{-1} grad L`` to the response to every removal,
      which cancels in the leave-one-out difference (Koh & Liang 2017 assume ``grad L = 0`` only so that
      ``theta_hat`` is the point whose curvature the retrained models share).
    * Above ``STATIONARITY_TOLERANCE`` (0.3) a third of every example's gradient is shared: the examples still
      agree on a direction of descent, which is the signature of a model stopped well before its minimum (an
      untrained model, a shifted bias, a training objective that differs from the task's, e.g. another weight
      decay); there the curvature at ``theta_hat`` need not be the curvature the retrained models see.
    """
    relative = gradient_norm / typical_norm
    if relative > STATIONARITY_TOLERANCE:
        logger.warning(
            "the model is not at a minimum of the training objective: %s = %.3g (%.3g of a typical %s; models "
            "trained to convergence by minibatch SGD or Adam stay below %g). Influence functions assume a "
            "minimum; estimates continue but may be off. Fix: train to convergence, or check that the task's "
            "weight_decay matches training.",
            gradient,
            gradient_norm,
            relative,
            typical,
            STATIONARITY_TOLERANCE,
        )
    return relative


def json_scalars(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe scalar entries of ``info`` (non-finite floats become ``None``), for ``Scores.metadata``."""
    flat = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in flat.items()}


class Attributor(ABC):
    """Base class of every datatrace attributor (module docstring).

    Subclasses set :attr:`fitted_attribute` (the learned attribute whose presence means "fitted") and
    :attr:`route` (a short name of the method, recorded in ``Scores.metadata``), implement :meth:`fit`,
    :meth:`score` and :meth:`self_influence`, and call :meth:`check_is_fitted` first in every method that needs
    the fit.
    """

    #: the learned attribute set by ``fit`` (scikit-learn convention: trailing underscore)
    fitted_attribute: str = "n_train_"
    #: the method, in a few words, for ``Scores.metadata["route"]``
    route: str = ""
    #: whether ``score`` / ``query_gradients`` accept ``measurement=``
    supports_measurement: bool = False
    #: whether the scores estimate removals from the attributor's *recorded run* (same initialisation, order and
    #: seeds; ground truth :func:`~datatrace.verification.retrain.single_model_subsets`) rather than retraining
    removal_from_recorded_run: bool = False

    task: Any

    # -- the contract --------------------------------------------------------------------------------------------
    @abstractmethod
    def fit(self, train: DataLike) -> Attributor:
        """Compute what queries need from the training data (the data the model was trained on); returns self."""

    @abstractmethod
    def score(self, query: DataLike, measurement: Measurement | None = None) -> Scores:
        """``values[q, i] ~ f_q(theta_{-i}) - f_q(theta_hat)`` for every query and training example."""

    @abstractmethod
    def self_influence(self) -> torch.Tensor:
        """The score of every training example on its own loss, shape ``(n_train,)``."""

    def top_k(self, query: DataLike, k: int, measurement: Measurement | None = None) -> TopK:
        """Per query, the ``k`` training examples with the largest ``|score|``, shape ``(n_query, k)``: the same
        as ``score(query, measurement).top_k(k)`` (:meth:`datatrace.Scores.top_k`)."""
        return self.score(query, measurement).top_k(k)

    def query_gradients(self, query: DataLike, measurement: Measurement | None = None) -> torch.Tensor:
        """``grad f_q(theta_hat)`` per query (routes that have them)."""
        raise NotImplementedError(
            f"{self.name} does not expose query gradients. Fix: use datatrace.InfluenceFunction (or TracIn) for "
            "gradients, or this attributor's own query features."
        )

    # -- accessors -----------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, self.fitted_attribute)

    def check_is_fitted(self) -> None:
        """Raise :class:`~datatrace.errors.NotFittedError` unless :meth:`fit` has run."""
        if not self.is_fitted:
            raise NotFittedError(
                f"this {self.name} is not fitted yet. Fix: call .fit(train) with the training data first."
            )

    @property
    def n_train(self) -> int:
        """The number of training examples the attributor was fitted on."""
        self.check_is_fitted()
        return int(self.n_train_)  # type: ignore[attr-defined]

    @property
    def fitted_model(self) -> nn.Module | None:
        """The model the scores refer to (the private working copy at ``theta_hat``, in the working dtype, eval
        mode), or ``None`` for routes without a single model (ensembles)."""
        return None

    @property
    def training_data(self) -> DataSource | None:
        """The training data given to :meth:`fit`, when the attributor keeps it (else ``None``)."""
        return None

    def prepare_data(self, data: DataLike, name: str) -> DataLike:
        """``data`` in the form :attr:`fitted_model` takes (identity, except where labels are re-encoded)."""
        return data

    def check_measurement(self, measurement: Measurement | None) -> None:
        """Raise a clear error when a ``measurement`` is given to a route that cannot use one."""
        if measurement is None:
            return
        if not self.supports_measurement:
            raise bad_value(
                "measurement",
                measurement,
                f"{self.name} scores the task's own measurement only",
                "define the measurement on the Task (Task.measurement), or use datatrace.InfluenceFunction, "
                "whose score accepts measurement=",
            )
        if not callable(measurement):
            raise bad_value(
                "measurement",
                measurement,
                "expected a callable (model, batch) -> (batch_size,)",
                "pass a function",
            )

    def describe_measurement(self, measurement: Measurement | None) -> str:
        """Words for what the scores measure (``Scores.measurement``)."""
        if measurement is None:
            return self.task.describe_measurement()
        return getattr(measurement, "__name__", "a custom measurement")

    def metadata(self) -> dict[str, Any]:
        """``Scores.metadata`` of this attributor: :meth:`scores_metadata` with the route's own details."""
        return self.scores_metadata()

    def scores_metadata(self, damping: Any = None, **details: Any) -> dict[str, Any]:
        """``Scores.metadata``: ``estimator``, ``route``, ``damping``, ``n_train``, ``units`` and the route's own
        ``details`` (these win on a clash; values must be JSON-serialisable)."""
        meta: dict[str, Any] = {
            "estimator": self.name,
            "route": self.route,
            "damping": damping,
            "n_train": self.n_train,
            "units": "the measurement's own units (leave-one-out change, datatrace.scores.MEANING)",
        }
        meta.update(details)
        return meta
