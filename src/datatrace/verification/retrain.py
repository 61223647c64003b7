"""Ground truth by actually retraining: leave-one-out and random-subset retraining.

Influence methods *estimate* what would happen to a measurement if a training example were removed. This module
*computes* it, by training the model again without that example, so that estimates can be checked.

What it computes is what every attributor's score estimates (:data:`datatrace.scores.MEANING`):
``f_q(theta_{-i}) - f_q(theta_hat)``, with ``theta_hat`` trained on all ``n`` examples and ``theta_{-i}`` on all
but example ``i``.

* :func:`leave_one_out` retrains once per left-out example and returns exactly these differences.
* :func:`subsets` retrains on random subsets of the data; its outputs are the ground truth of the linear
  datamodeling score (LDS).
* :func:`evaluator` turns a :class:`~datatrace.Task` and query data into the ``evaluate(model)`` callable both
  need.

Parallelism goes through joblib, so any joblib backend works, including clusters::

    import joblib

    with joblib.parallel_config(backend="dask"):  # or "ray", "loky", "threading", ...
        result = leave_one_out(train_fn, train, evaluate, n_jobs=-1)

``n_jobs`` passed here overrides the ``n_jobs`` of ``parallel_config``; pass ``n_jobs=None`` to take it from the
config. ``backend=None`` (the default) uses the backend of the active ``parallel_config``.

Long runs can be made resumable with ``cache_dir``: each finished retrain is saved as its own small ``.npy`` file
(written atomically), and a rerun with the same ``cache_dir`` only trains what is missing. The cache records a
sha256 of the training data's content and refuses other data; it cannot tell whether ``train_fn`` or ``evaluate``
changed between runs: use a new ``cache_dir`` when they do. A cached result that was changed on disk (its sha256
differs from the one recorded), truncated, or is not a plain finite float64 vector is retrained with a warning; a
malformed manifest raises :class:`~datatrace.errors.RetrainCacheError` (see
:mod:`datatrace.verification.retrain_cache`).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from joblib import Parallel, delayed
from tqdm.auto import tqdm

from datatrace.data import DEFAULT_BATCH_SIZE, DataLike, DataSource, as_data_source, cast_batch
from datatrace.errors import bad_value, check_indices, check_positive_int, describe
from datatrace.run.recording import Recording
from datatrace.run.replay import Replay, recorded_data_source
from datatrace.verification.retrain_cache import RetrainCache

__all__ = ["LOOResult", "SubsetResult", "evaluator", "leave_one_out", "subsets"]

logger = logging.getLogger(__name__)

_SEED_HIGH = 2**31 - 1  # seeds fit every RNG (torch, numpy, random, CUDA)


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LOOResult:
    """Leave-one-out retraining results.

    Attributes:
        indices: ``(m,)`` int64, the training examples that were left out, in the order of the columns below.
        base: ``(n_query,)`` float64, :math:`f_q(\\hat\\theta)` for the model trained on all examples.
        retrained: ``(n_query, m)`` float64, ``retrained[q, j]`` is :math:`f_q(\\theta_{-i})` with
            ``i = indices[j]``.
        changes: ``(n_query, m)`` float64, ``retrained - base[:, None]``, i.e. the actual effect of removing each
            example. It lines up with ``scores.values[:, indices]`` of an influence estimate.
    """

    indices: np.ndarray
    base: np.ndarray
    retrained: np.ndarray
    changes: np.ndarray


@dataclass(frozen=True)
class SubsetResult:
    """Random-subset retraining results (the ground truth of the linear datamodeling score).

    Attributes:
        masks: ``(n_subsets, n_train)`` bool, ``masks[s, i]`` is True when example ``i`` was in subset ``s``.
        outputs: ``(n_subsets, n_seeds, n_query)`` float64, the measurement of each query for the model trained
            on subset ``s`` with seed ``seeds[s, k]``.
        seeds: ``(n_subsets, n_seeds)`` int64, the seed of each run (passed to ``train_fn`` when it accepts a
            ``seed`` argument).
    """

    masks: np.ndarray
    outputs: np.ndarray
    seeds: np.ndarray

    @property
    def mean_outputs(self) -> np.ndarray:
        """``(n_subsets, n_query)``: the outputs averaged over seeds."""
        return self.outputs.mean(axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------------
def leave_one_out(
    train_fn: Callable[..., Any],
    train: DataLike,
    evaluate: Callable[[Any], Any],
    indices: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    *,
    n_jobs: int | None = 1,
    backend: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    base_outputs: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    seed: int | None = 0,
) -> LOOResult:
    """Retrain without each of ``indices`` and measure the change of every query.

    For each left-out example ``i`` this trains :math:`\\theta_{-i}` = ``train_fn(train without i)`` and computes

    .. math::

        \\text{changes}[q, j] = f_q(\\theta_{-i}) - f_q(\\hat\\theta), \\qquad i = \\text{indices}[j],

    where :math:`f_q` is ``evaluate(model)[q]`` and :math:`\\hat\\theta` = ``train_fn(train)``. This is the quantity
    an influence score ``scores.values[q, i]`` estimates (positive: removing ``i`` raises the measurement).

    Args:
        train_fn: ``train_fn(train_subset) -> model``. ``train_subset`` is ``train`` without the left-out example,
            in the same form as ``train``: a tuple of numpy arrays or tensors stays one, a ``Dataset`` (or a
            ``DataLoader``'s dataset) becomes a ``torch.utils.data.Subset``. If ``train_fn`` has a parameter named
            ``seed``, it is called as ``train_fn(train_subset, seed=seed)`` with the *same* seed for every retrain,
            so that the only difference between runs is the removed example.
        train: the full training data (tuple of arrays/tensors, ``Dataset`` or ``DataLoader``).
        evaluate: ``evaluate(model) -> array-like (n_query,)``, the measurement of each query, e.g. each query's
            loss (see :func:`evaluator`). It must return finite values, the same number every time.
        indices: the training examples to leave out (default: all of them). Negative indices count from the end.
        n_jobs: parallel jobs for joblib (``-1``: all cores; ``None``: take it from ``joblib.parallel_config``).
        backend: joblib backend; ``None`` uses the active ``joblib.parallel_config`` (e.g. Dask or Ray).
        cache_dir: a directory to save each finished retrain in, so that an interrupted run can be resumed by
            calling again with the same ``cache_dir``.
        progress: show a tqdm progress bar over finished retrains.
        base_outputs: ``evaluate`` of the model trained on all data, if already known; the base model is then not
            trained.
        seed: the seed passed to ``train_fn`` (when it accepts one); ``None`` never passes a seed.

    Returns:
        :class:`LOOResult` with ``indices``, ``base``, ``retrained`` and ``changes`` (``(n_query, m)`` float64).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X, y, X_query = rng.normal(size=(20, 3)), rng.normal(size=20), rng.normal(size=(4, 3))
        >>> def train_fn(data):  # ridge regression, closed form
        ...     A, b = data
        ...     return np.linalg.solve(A.T @ A + 0.1 * np.eye(3), A.T @ b)
        >>> def evaluate(w):  # one prediction per query
        ...     return X_query @ w
        >>> result = leave_one_out(train_fn, (X, y), evaluate, indices=[0, 5], progress=False)
        >>> result.changes.shape
        (4, 2)
    """
    _check_callable("train_fn", train_fn)
    _check_callable("evaluate", evaluate)
    n_jobs = _check_n_jobs(n_jobs)
    progress = _check_bool("progress", progress)
    if seed is not None:
        seed = _check_seed("seed", seed)
    source = as_data_source(train, "train")
    n = len(source)
    if indices is None:
        idx = np.arange(n, dtype=np.int64)
    else:
        idx = check_indices("indices", indices, n).numpy().astype(np.int64)
    if idx.size == 0:
        raise bad_value(
            "indices", indices, "expected at least one training example to leave out", "pass e.g. [0]"
        )
    if len(np.unique(idx)) != idx.size:
        raise bad_value(
            "indices", indices, "each training example may be left out only once", "pass unique indices"
        )
    if n < 2:
        raise bad_value(
            "train",
            train,
            "leave-one-out needs at least 2 training examples (one left out, at least one kept)",
            "pass more training data",
        )
    base = None if base_outputs is None else _as_base_outputs(base_outputs)
    pass_seed = seed is not None and _accepts_seed(train_fn)

    width = max(6, len(str(n - 1)))
    jobs: list[_Job] = []
    if base is None:
        jobs.append(_Job("base", "the base model trained on all training examples", None, seed))
    for i in idx.tolist():
        jobs.append(_Job(f"loo-{i:0{width}d}", f"the retrain that leaves out training example {i}", i, seed))

    config = {
        "kind": "leave_one_out",
        "n_train": n,
        "train_sha256": source.content_sha256() if cache_dir is not None else None,
        "n_indices": int(idx.size),
        "indices_sha256": _sha256(idx.astype("<i8")),
        "seed": seed,
        "seed_passed": pass_seed,
    }
    outputs = _run_jobs(
        jobs,
        source=source,
        train_fn=train_fn,
        evaluate=evaluate,
        pass_seed=pass_seed,
        n_jobs=n_jobs,
        backend=backend,
        cache_dir=cache_dir,
        config=config,
        progress=progress,
        desc="leave-one-out",
    )
    if base is None:
        base = outputs["base"]
    retrained = np.stack([outputs[job.key] for job in jobs if job.key != "base"], axis=1)
    if retrained.shape[0] != base.size:
        raise bad_value(
            "base_outputs",
            base_outputs,
            f"expected {retrained.shape[0]} values, one per query, as evaluate returns",
            "pass base_outputs=evaluate(model trained on all data), or leave it None",
        )
    retrained = np.ascontiguousarray(retrained, dtype=np.float64)
    return LOOResult(indices=idx, base=base, retrained=retrained, changes=retrained - base[:, None])


def subsets(
    train_fn: Callable[..., Any],
    train: DataLike,
    evaluate: Callable[[Any], Any],
    *,
    n_subsets: int = 100,
    fraction: float = 0.5,
    n_seeds: int = 1,
    random_state: int = 0,
    n_jobs: int | None = 1,
    backend: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> SubsetResult:
    """Retrain on random subsets of the training data: the ground truth of the linear datamodeling score (LDS).

    Draws ``n_subsets`` subsets :math:`S_s` of ``k = round(fraction * n_train)`` examples each, without
    replacement, with ``numpy.random.default_rng(random_state)``, and for each seed ``seeds[s, r]`` computes

    .. math::

        \\text{outputs}[s, r, q] = f_q\\big(\\theta(S_s, \\text{seed}_{s,r})\\big).

    With datatrace's removal sign (``score[q, i] ~ f_q(theta_{-i}) - f_q(theta_hat)``), an additive model of the
    scores predicts the output of subset ``s`` as ``f_q(theta_hat) + (~masks[s]).astype(float) @ score[q]`` (the
    sum over the *removed* examples). The linear datamodeling score of the attribution is the Spearman rank
    correlation, over subsets, between these predictions and ``mean_outputs[:, q]``, averaged over queries.

    Args:
        train_fn: ``train_fn(train_subset) -> model`` (``train_subset`` in the same form as ``train``, see
            :func:`leave_one_out`); called with ``seed=seeds[s, r]`` when it has a ``seed`` parameter.
        train: the full training data (tuple of arrays/tensors, ``Dataset`` or ``DataLoader``).
        evaluate: ``evaluate(model) -> array-like (n_query,)``.
        n_subsets: number of random subsets.
        fraction: the share of training examples in each subset, in (0, 1).
        n_seeds: trainings per subset, with different seeds (to average out training noise).
        random_state: non-negative int seeding the subset draws and, deterministically, the per-run seeds.
        n_jobs, backend, cache_dir, progress: as in :func:`leave_one_out`.

    Returns:
        :class:`SubsetResult` with ``masks`` ``(n_subsets, n_train)`` bool, ``outputs``
        ``(n_subsets, n_seeds, n_query)`` float64 and ``seeds`` ``(n_subsets, n_seeds)`` int64.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X, y, X_query = rng.normal(size=(20, 3)), rng.normal(size=20), rng.normal(size=(4, 3))
        >>> def train_fn(data):
        ...     A, b = data
        ...     return np.linalg.solve(A.T @ A + 0.1 * np.eye(3), A.T @ b)
        >>> result = subsets(train_fn, (X, y), lambda w: X_query @ w, n_subsets=5, progress=False)
        >>> result.masks.shape, result.outputs.shape, int(result.masks[0].sum())
        ((5, 20), (5, 1, 4), 10)
    """
    _check_callable("train_fn", train_fn)
    _check_callable("evaluate", evaluate)
    n_subsets = check_positive_int("n_subsets", n_subsets)
    n_seeds = check_positive_int("n_seeds", n_seeds)
    random_state = _check_seed("random_state", random_state)
    n_jobs = _check_n_jobs(n_jobs)
    progress = _check_bool("progress", progress)
    source = as_data_source(train, "train")
    n = len(source)
    fraction, k = _subset_size(fraction, n)

    masks = _draw_masks(n, k, n_subsets, random_state)
    seeds = np.random.default_rng([random_state, 1]).integers(0, _SEED_HIGH, size=(n_subsets, n_seeds))
    seeds = seeds.astype(np.int64)
    pass_seed = _accepts_seed(train_fn)
    if n_seeds > 1 and not pass_seed:
        warnings.warn(
            f"n_seeds={n_seeds} but train_fn has no 'seed' parameter, so the {n_seeds} runs per subset cannot be "
            "seeded differently. Fix: add a seed argument to train_fn (train_fn(data, seed)), or pass n_seeds=1.",
            UserWarning,
            stacklevel=2,
        )

    s_width = max(5, len(str(n_subsets - 1)))
    jobs = [
        _Job(
            f"subset-{s:0{s_width}d}-seed-{r}",
            f"the retrain on subset {s} with seed index {r} (seed={int(seeds[s, r])})",
            masks[s],
            int(seeds[s, r]),
        )
        for s in range(n_subsets)
        for r in range(n_seeds)
    ]
    config = {
        "kind": "subsets",
        "n_train": n,
        "train_sha256": source.content_sha256() if cache_dir is not None else None,
        "n_subsets": n_subsets,
        "fraction": fraction,
        "random_state": random_state,
        "n_seeds": n_seeds,
        "masks_sha256": _sha256(np.packbits(masks, axis=1)),
        "seeds_sha256": _sha256(seeds.astype("<i8")),
        "seed_passed": pass_seed,
    }
    results = _run_jobs(
        jobs,
        source=source,
        train_fn=train_fn,
        evaluate=evaluate,
        pass_seed=pass_seed,
        n_jobs=n_jobs,
        backend=backend,
        cache_dir=cache_dir,
        config=config,
        progress=progress,
        desc="subset retraining",
    )
    outputs = np.stack([results[job.key] for job in jobs]).reshape(n_subsets, n_seeds, -1)
    return SubsetResult(masks=masks, outputs=np.ascontiguousarray(outputs, dtype=np.float64), seeds=seeds)


def _subset_size(fraction: Any, n: int) -> tuple[float, int]:
    """``(fraction, round(fraction * n))`` after checking that the subsets are neither empty nor whole."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating, np.integer)):
        raise bad_value("fraction", fraction, "expected a number strictly between 0 and 1", "pass e.g. 0.5")
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
        raise bad_value("fraction", fraction, "expected a number strictly between 0 and 1", "pass e.g. 0.5")
    k = round(fraction * n)
    if not 1 <= k < n:
        raise bad_value(
            "fraction",
            fraction,
            f"round(fraction * n_train) = {k} with n_train={n}, but a subset needs between 1 and {n - 1} examples",
            f"pass a fraction between {1 / n:.3g} and {(n - 1) / n:.3g}, or more training data",
        )
    return fraction, k


def _draw_masks(n: int, k: int, n_subsets: int, random_state: int) -> np.ndarray:
    """``(n_subsets, n)`` bool: subsets of ``k`` examples drawn without replacement from ``default_rng(random_state)``."""
    rng = np.random.default_rng(random_state)
    masks = np.zeros((n_subsets, n), dtype=bool)
    for s in range(n_subsets):
        masks[s, rng.choice(n, size=k, replace=False)] = True
    return masks


def single_model_subsets(
    model: Any,
    task: Any,
    recording: Any,
    train: DataLike,
    evaluate: Callable[[Any], Any],
    *,
    n_subsets: int = 100,
    fraction: float = 0.5,
    random_state: int = 0,
    n_jobs: int | None = 1,
    backend: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> SubsetResult:
    """Single-model subset ground truth: the *recorded* run replayed with the left-out examples removed.

    Draws the same subsets as :func:`subsets` (same ``random_state``, ``fraction``) and, for each, replays the
    recording (:class:`datatrace.Recorder`) from its initial state with the same minibatch order, seeds and
    normalisers, the loss terms of the examples outside the subset weighted 0 (:mod:`datatrace.run.replay`).
    ``outputs[s, 0, q] = f_q(theta_T(mask_s))``. This is what the metagradient
    (:class:`datatrace.attributors.metagradient.Metagradient`) estimates to first order, with training noise
    (initialisation, order, dropout) held fixed; :func:`subsets` with several seeds averages it out instead
    (Park et al. 2023's seed-averaged LDS). Both feed :func:`datatrace.verification.metrics.lds` alike.

    Args:
        model: a model of the recorded architecture; task: the task the run minimised.
        recording: a :class:`~datatrace.run.recording.Recording` or its folder.
        train, evaluate, n_subsets, fraction, random_state, n_jobs, backend, cache_dir, progress: as in
            :func:`subsets`.
    """
    _check_callable("evaluate", evaluate)
    n_subsets = check_positive_int("n_subsets", n_subsets)
    random_state = _check_seed("random_state", random_state)
    n_jobs = _check_n_jobs(n_jobs)
    progress = _check_bool("progress", progress)
    recording = recording if isinstance(recording, Recording) else Recording(recording)
    source = recorded_data_source(train)
    n = len(source)
    fraction, k = _subset_size(fraction, n)
    masks = _draw_masks(n, k, n_subsets, random_state)
    seeds = np.full((n_subsets, 1), int(recording.manifest["seed"]), dtype=np.int64)
    jobs = [
        _Job(f"subset-{s:05d}-seed-0", f"the replay without the examples outside subset {s}", masks[s], None)
        for s in range(n_subsets)
    ]
    config = {
        "kind": "single-model-subsets",
        "n_train": n,
        "train_sha256": source.content_sha256() if cache_dir is not None else None,
        "recording_steps_sha256": recording.manifest["steps_sha256"],
        "recording_final_sha256": recording.manifest["final"]["sha256"],
        "n_subsets": n_subsets,
        "fraction": fraction,
        "random_state": random_state,
        "masks_sha256": _sha256(np.packbits(masks, axis=1)),
    }
    results = _run_jobs(
        jobs,
        source=source,
        train_fn=_ReplayWithout(model, task, str(recording.folder), train),
        evaluate=evaluate,
        pass_seed=False,
        n_jobs=n_jobs,
        backend=backend,
        cache_dir=cache_dir,
        config=config,
        progress=progress,
        desc="single-model replays",
        data_for=lambda job: job.drop_or_mask,
    )
    outputs = np.stack([results[job.key] for job in jobs]).reshape(n_subsets, 1, -1)
    return SubsetResult(masks=masks, outputs=np.ascontiguousarray(outputs, dtype=np.float64), seeds=seeds)


class _ReplayWithout:
    """Picklable ``train_fn(mask) -> model``: the recorded run replayed with the examples outside ``mask``
    weighted 0, as a model in eval mode."""

    def __init__(self, model: Any, task: Any, folder: str, train: DataLike) -> None:
        self.model, self.task, self.folder, self.train = model, task, folder, train

    def __call__(self, mask: np.ndarray) -> Any:
        replay = Replay(self.model, self.task, Recording(self.folder), self.train)
        weights = torch.as_tensor(mask, dtype=replay.dtype, device=replay.device)
        state = replay.run(replay.initial(), replay.n_steps, weights)
        return replay.model_at(state)


def evaluator(
    task: Any, query: DataLike, batch_size: int = DEFAULT_BATCH_SIZE
) -> Callable[[Any], np.ndarray]:
    """Build ``evaluate(model) -> (n_query,) float64`` from a task's measurement on query data.

    The returned callable computes :math:`f_q(\\theta)` = ``task.measurement(model, batch)`` for every query ``q``
    in index order, in ``model.eval()`` mode (the previous mode is restored afterwards) under
    ``torch.no_grad()``, with floating-point inputs cast to the dtype (and moved to the device) of the model's
    parameters. It is picklable, so it can be shipped to joblib workers.

    Args:
        task: an object with ``measurement(model, batch) -> Tensor (b,)``, e.g. a :class:`~datatrace.Task`.
        query: the query data (tuple of arrays/tensors, ``Dataset`` or ``DataLoader``).
        batch_size: queries per forward pass.

    Example:
        >>> import torch
        >>> class SquaredError:
        ...     def measurement(self, model, batch):
        ...         x, y = batch
        ...         return (model(x).squeeze(-1) - y) ** 2
        >>> evaluate = evaluator(SquaredError(), (torch.randn(5, 2), torch.randn(5)))
        >>> evaluate(torch.nn.Linear(2, 1)).shape
        (5,)
    """
    if not callable(getattr(task, "measurement", None)):
        raise bad_value(
            "task",
            task,
            "expected an object with a measurement(model, batch) method, such as a datatrace.Task",
            "pass a datatrace Task (e.g. one of datatrace.tasks)",
        )
    batch_size = check_positive_int("batch_size", batch_size)
    return _Evaluator(task, as_data_source(query, "query"), batch_size)


class _Evaluator:
    """Picklable ``evaluate(model)`` built by :func:`evaluator`."""

    def __init__(self, task: Any, source: DataSource, batch_size: int) -> None:
        self.task = task
        self.source = source
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"evaluator(task={type(self.task).__name__}, n_query={len(self.source)}, batch_size={self.batch_size})"

    def __call__(self, model: Any) -> np.ndarray:
        is_module = isinstance(model, torch.nn.Module)
        dtype, device = torch.get_default_dtype(), None
        if is_module:
            first = next(model.parameters(), None)
            if first is not None:
                dtype, device = first.dtype, first.device
        was_training = bool(getattr(model, "training", False))
        if is_module:
            model.eval()
        values = []
        try:
            with torch.no_grad():
                for idx, batch in self.source.batches(self.batch_size):
                    batch = cast_batch(batch, dtype, device)
                    out = self.task.measurement(model, batch)
                    out = torch.as_tensor(out)
                    if out.shape != (len(idx),):
                        raise ValueError(
                            f"task.measurement returned shape {tuple(out.shape)} for a batch of {len(idx)} queries: "
                            f"it must return one value per example, shape ({len(idx)},). Fix: reduce per example "
                            "(e.g. loss(..., reduction='none')) and do not average over the batch."
                        )
                    values.append(out.detach().to("cpu", torch.float64))
        finally:
            if is_module:
                model.train(was_training)
        return torch.cat(values).numpy()


# ---------------------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    key: str  # file name stem in cache_dir
    label: str  # words for messages
    drop_or_mask: int | np.ndarray | None  # LOO: index left out; subsets: bool mask; base: None
    seed: int | None

    def keep(self, n: int) -> np.ndarray:
        if self.drop_or_mask is None:
            return np.arange(n, dtype=np.int64)
        if isinstance(self.drop_or_mask, np.ndarray):
            return np.flatnonzero(self.drop_or_mask).astype(np.int64)
        return np.delete(np.arange(n, dtype=np.int64), self.drop_or_mask)


def _train_and_evaluate(
    key: str, label: str, train_fn: Callable, evaluate: Callable, data: Any, seed: int | None, pass_seed: bool
) -> tuple[str, np.ndarray]:
    """One retrain (runs in a joblib worker). Returns ``(key, outputs as a float64 array)``."""
    try:
        model = train_fn(data, seed=seed) if pass_seed else train_fn(data)
        if model is None:
            raise ValueError(
                f"train_fn returned None for {label}: it must return the trained model, which evaluate(model) "
                "measures. Fix: end train_fn with `return model`."
            )
        out = evaluate(model)
        if isinstance(out, torch.Tensor):
            out = out.detach().to("cpu", torch.float64).numpy()
        try:
            arr = np.asarray(out, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"evaluate returned {describe(out)} for {label}, which is not a numeric array. "
                "Fix: return one number per query, e.g. a numpy array or tensor of shape (n_query,)."
            ) from None
    except Exception as error:
        if hasattr(error, "add_note"):
            error.add_note(f"datatrace.verification.retrain: raised while running {label} (job '{key}').")
        raise
    return key, arr


def _run_jobs(
    jobs: list[_Job],
    *,
    source: DataSource,
    train_fn: Callable,
    evaluate: Callable,
    pass_seed: bool,
    n_jobs: int | None,
    backend: Any,
    cache_dir: str | os.PathLike[str] | None,
    config: dict[str, Any],
    progress: bool,
    desc: str,
    data_for: Callable[[_Job], Any] | None = None,
) -> dict[str, np.ndarray]:
    """Run (or reuse from ``cache_dir``) every job and return ``{key: outputs}``. ``train_fn`` receives
    ``data_for(job)`` (default: the job's subset of the training data in the user's form)."""
    cache = None if cache_dir is None else RetrainCache(cache_dir, config)
    checker = _OutputChecker(None if cache is None else cache.n_query, None if cache is None else cache.path)
    results: dict[str, np.ndarray] = {}
    if cache is not None:
        for job in jobs:
            cached = cache.load(job.key)
            if cached is not None:
                checker.check(cached, job, cached_in=cache.path)
                results[job.key] = cached
        logger.info(
            "%s: reusing %d of %d finished retrains from %s; %d left to train.",
            desc,
            len(results),
            len(jobs),
            cache.path,
            len(jobs) - len(results),
        )
    todo = [job for job in jobs if job.key not in results]
    if not todo:
        return results

    by_key = {job.key: job for job in todo}
    n = len(source)
    calls = (
        delayed(_train_and_evaluate)(
            job.key,
            job.label,
            train_fn,
            evaluate,
            source.subset(job.keep(n)) if data_for is None else data_for(job),
            job.seed,
            pass_seed,
        )
        for job in todo
    )
    logger.info("%s: training %d model(s) with n_jobs=%s, backend=%s.", desc, len(todo), n_jobs, backend)
    finished = 0
    try:
        with tqdm(total=len(todo), desc=desc, unit="model", disable=not progress) as bar:
            parallel = Parallel(n_jobs=n_jobs, backend=backend, return_as="generator_unordered")
            for key, out in parallel(calls):
                job = by_key[key]
                checker.check(out, job)
                if cache is not None:
                    if cache.n_query is None:
                        cache.set_n_query(out.size)
                    cache.save(key, out)
                results[key] = out
                finished += 1
                bar.update(1)
    except BaseException:
        if cache is not None:
            cache.flush()  # record the digests of the finished retrains, so that they are reused
            logger.warning(
                "%s stopped after %d of %d new retrains; every finished retrain is saved in %s. Call again with "
                "the same cache_dir to resume.",
                desc,
                finished,
                len(todo),
                cache.path,
            )
        raise
    if cache is not None:
        cache.flush()
    return results


class _OutputChecker:
    """Checks that every evaluate output is 1-D, the same length and finite."""

    def __init__(self, n_query: int | None, cache_path: Path | None) -> None:
        self.n_query = n_query
        # where n_query was first seen: the manifest of a cache, or the first result of this call
        self.origin = f"the runs cached in {cache_path}" if n_query is not None else None

    def check(self, out: np.ndarray, job: _Job, cached_in: Path | None = None) -> None:
        where = f" (cached in {cached_in})" if cached_in is not None else ""
        if out.ndim == 0:
            raise ValueError(
                f"evaluate returned a scalar for {job.label}{where}: it must return one value per query, shape "
                "(n_query,). Fix: return a 1-D array (np.atleast_1d(value) for a single query)."
            )
        if out.ndim != 1:
            raise ValueError(
                f"evaluate returned shape {out.shape} for {job.label}{where}: it must return one value per query, "
                "shape (n_query,). Fix: return a 1-D array (e.g. flatten it)."
            )
        if self.n_query is None:
            self.n_query = int(out.size)
            self.origin = f"{job.label}{where}"
        elif out.size != self.n_query:
            fix = (
                "use a new cache_dir when evaluate or the query data changed"
                if cached_in is not None or (self.origin or "").startswith("the runs cached")
                else "return one value per query, the same queries for every model"
            )
            raise ValueError(
                f"evaluate returned {out.size} values for {job.label}{where} but {self.n_query} for "
                f"{self.origin} (n_query={self.n_query}). Fix: {fix}."
            )
        bad = ~np.isfinite(out)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise FloatingPointError(
                f"evaluate returned {int(bad.sum())} non-finite value(s) for {job.label} (job '{job.key}'){where}; "
                f"first at query {first}: {out[first]}. Fix: make training converge on this data (lower the "
                "learning rate, add weight decay) or make evaluate return finite values."
            )


# ---------------------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------------------
def _check_callable(name: str, value: Any) -> None:
    if not callable(value):
        what = (
            "train_fn(train_subset) -> model" if name == "train_fn" else "evaluate(model) -> array (n_query,)"
        )
        raise bad_value(name, value, f"expected a callable {what}", f"pass a function {what}")


def _check_n_jobs(n_jobs: Any) -> int | None:
    if n_jobs is None:
        return None
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0:
        raise bad_value(
            "n_jobs",
            n_jobs,
            "expected a non-zero integer (1: sequential, -1: all cores) or None (use joblib.parallel_config)",
            "pass e.g. n_jobs=1 or n_jobs=-1",
        )
    return int(n_jobs)


def _check_seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**63:
        raise bad_value(name, value, "expected a non-negative integer", f"pass e.g. {name}=0")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise bad_value(name, value, "expected True or False", f"pass {name}=True or {name}=False")
    return bool(value)


def _as_base_outputs(base_outputs: Any) -> np.ndarray:
    if isinstance(base_outputs, torch.Tensor):
        base_outputs = base_outputs.detach().to("cpu", torch.float64).numpy()
    try:
        base = np.array(base_outputs, dtype=np.float64)
    except (TypeError, ValueError):
        base = None
    if base is None or base.ndim != 1 or base.size == 0:
        raise bad_value(
            "base_outputs",
            base_outputs,
            "expected a non-empty 1-D array of numbers, one per query",
            "pass base_outputs=evaluate(model trained on all data), or leave it None",
        )
    if not np.isfinite(base).all():
        raise bad_value(
            "base_outputs", base_outputs, "expected finite values", "pass the finite outputs of evaluate"
        )
    return base


def _accepts_seed(train_fn: Callable) -> bool:
    """Whether ``train_fn`` has a parameter named ``seed`` that can be passed by keyword."""
    try:
        parameters = inspect.signature(train_fn).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get("seed")
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
