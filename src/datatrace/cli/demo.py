"""``datatrace demo``: influence functions on handwritten digits, checked against actual retraining.

What it does, end to end (about a minute on two CPU cores for the default model):

1. Data: scikit-learn's bundled 8x8 digits (pixels / 16), a seeded stratified split into 1,000 training and 300
   test images, and ``flip_fraction`` (default 5%) of the *training* labels changed to another random class, on
   purpose, so that we know which ones are wrong.
2. Model: multinomial logistic regression (``nn.Linear(64, 10)``) or, with ``model="mlp"``, a 64-32-10 tanh
   network; float64, weight decay ``1e-3``, trained to a tight minimum with full-batch L-BFGS
   (:func:`datatrace.verification.training.fit_full_batch`).
3. Influence: :class:`datatrace.InfluenceFunction` with the exact Hessian (``damping="auto"``: none on a convex
   model, Levenberg-Marquardt style damping if the network's Hessian has negative eigenvalues). ``score[q, i]``
   estimates ``loss_q(theta without i) - loss_q(theta_hat)`` for every test image ``q`` and training image ``i``,
   in nats (the cross-entropy uses the natural log). Positive: removing ``i`` would raise ``q``'s loss, so ``i``
   helped ``q`` (a proponent); negative: ``i`` hurt ``q`` (an opponent). Self-influence
   ``(1/n) g_i^T H^{-1} g_i`` estimates how much training image ``i``'s own loss would rise if it were removed.
4. Verification: ``n_loo`` random training images are each left out and the model retrained (warm-started from
   the trained weights; :func:`datatrace.verification.retrain.leave_one_out`, cached under ``out_dir`` so a rerun reuses
   finished retrains). The estimated and actual changes of the 300 test losses are correlated
   (:func:`datatrace.verification.metrics.loo_correlation`), and so are estimated and actual self-influence.
5. Uses: the proponents and opponents of the most confidently misclassified test image; flipped labels found by
   ranking training images by self-influence, against random inspection and against ranking by training loss
   (:func:`datatrace.verification.metrics.detection_curve`).
6. Output: ``out_dir/report.html`` (self-contained), ``out_dir/results.json`` (every number),
   ``out_dir/scores.safetensors`` (:meth:`datatrace.Scores.save`), ``out_dir/loo.npz`` (the estimated and actual
   leave-one-out matrices) and a printed summary.

Example:
    >>> from datatrace.cli.demo import run_demo
    >>> results = run_demo("datatrace-out", n_loo=8, progress=False)  # doctest: +SKIP
    >>> results["loo"]["mean_pearson"] > 0.9  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from datatrace.attributors.influence import InfluenceFunction
from datatrace.errors import UsageError, bad_value, check_positive_int
from datatrace.fileio import jsonable, write_json
from datatrace.scores import MEANING
from datatrace.tasks import ClassificationTask
from datatrace.verification.training import fit_full_batch, objective

logger = logging.getLogger(__name__)

MODELS = ("logreg", "mlp")
MODEL_NAMES = {
    "logreg": "multinomial logistic regression (64 -> 10)",
    "mlp": "tanh MLP (64 -> 32 -> 10)",
}
DEFAULT_N_LOO = {"logreg": 40, "mlp": 20}
WEIGHT_DECAY = 1e-3
N_TRAIN, N_TEST = 1000, 300
N_CLASSES = 10
IMAGE_SHAPE = (8, 8)


@dataclass(frozen=True)
class Schedule:
    """L-BFGS budget: target ``max |grad L|``, then iterations and restarts for the first fit and each retrain."""

    tolerance: float
    fit_iter: int
    fit_rounds: int
    retrain_iter: int
    retrain_rounds: int


#: the convex model reaches 1e-9 quickly; the network is given a looser target and a larger budget
SCHEDULES = {
    "logreg": Schedule(tolerance=1e-9, fit_iter=500, fit_rounds=4, retrain_iter=500, retrain_rounds=3),
    "mlp": Schedule(tolerance=1e-8, fit_iter=2000, fit_rounds=2, retrain_iter=1000, retrain_rounds=2),
}
#: n_jobs for retraining when none is given. Measured on 2 shared CPU cores, one process (one torch thread) beat
#: two worker processes for both models: the retrains are small, and two workers pay for starting and for
#: competing with each other (logreg 45-72 s vs 54-81 s in all; mlp retraining 150 s vs 227 s).
DEFAULT_N_JOBS = 1
UNITS = "nats"
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitsData:
    """The demo's split. ``y_train`` holds the labels trained on (some flipped); ``y_train_true`` the originals."""

    X_train: np.ndarray  # (n_train, 64) float64 in [0, 1]
    y_train: np.ndarray  # (n_train,) int64, with flipped labels
    y_train_true: np.ndarray  # (n_train,) int64
    flipped: np.ndarray  # (n_train,) bool
    X_test: np.ndarray
    y_test: np.ndarray
    train_rows: np.ndarray  # row numbers in sklearn's digits
    test_rows: np.ndarray

    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.X_train), torch.from_numpy(self.y_train)

    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.X_test), torch.from_numpy(self.y_test)


def load_digits_data(
    seed: int = 0, flip_fraction: float = 0.05, n_train: int = N_TRAIN, n_test: int = N_TEST
) -> DigitsData:
    """sklearn's digits (X / 16), a seeded stratified split, and ``flip_fraction`` of the training labels changed
    to a different, uniformly random class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    rows = np.arange(len(y))
    train_rows, test_rows = train_test_split(
        rows, train_size=n_train, test_size=n_test, random_state=seed, stratify=y
    )
    train_rows, test_rows = np.sort(train_rows), np.sort(test_rows)
    rng = np.random.default_rng([seed, 1])
    n_flip = round(flip_fraction * n_train)
    y_true = y[train_rows].astype(np.int64)
    y_noisy = y_true.copy()
    flipped = np.zeros(n_train, dtype=bool)
    if n_flip:
        which = rng.choice(n_train, size=n_flip, replace=False)
        y_noisy[which] = (y_true[which] + rng.integers(1, N_CLASSES, size=n_flip)) % N_CLASSES
        flipped[which] = True
    return DigitsData(
        X_train=(X[train_rows] / 16.0).astype(np.float64),
        y_train=y_noisy,
        y_train_true=y_true,
        flipped=flipped,
        X_test=(X[test_rows] / 16.0).astype(np.float64),
        y_test=y[test_rows].astype(np.int64),
        train_rows=train_rows,
        test_rows=test_rows,
    )


def build_model(kind: str, seed: int = 0) -> nn.Module:
    """The untrained float64 model: ``"logreg"`` (``Linear(64, 10)``) or ``"mlp"`` (64-32-10, tanh)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "logreg":
            model: nn.Module = nn.Linear(64, N_CLASSES)
        elif kind == "mlp":
            model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, N_CLASSES))
        else:
            raise bad_value("model", kind, f"expected one of {list(MODELS)}", "pass model='logreg' or 'mlp'")
    return model.double()


def gradient_max(model: nn.Module, task: ClassificationTask, data: tuple) -> float:
    """``max |grad L(theta)|`` of the training objective on ``data`` (how far from a stationary point)."""
    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    value = objective(model, task, [(x.to(params[0].dtype), y)], len(y))
    grads = torch.autograd.grad(value, params)
    return max(float(g.abs().max()) for g in grads)


@contextlib.contextmanager
def _quiet_training_log() -> Iterator[None]:
    """Silence fit_full_batch's per-call warning; the demo checks and reports convergence itself."""
    training_logger = logging.getLogger("datatrace.verification.training")
    previous = training_logger.level
    training_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        training_logger.setLevel(previous)


def train_to_tolerance(
    model: nn.Module,
    task: ClassificationTask,
    data: tuple,
    *,
    tolerance: float = 1e-9,
    max_iter: int = 500,
    rounds: int = 4,
) -> nn.Module:
    """``fit_full_batch`` (full-batch L-BFGS), restarted up to ``rounds`` times until ``max |grad L| <=
    tolerance``. Returns a trained copy with the reached ``max |grad L|`` stored as ``model.grad_max``."""
    with _quiet_training_log():
        for _ in range(rounds):
            model = fit_full_batch(model, task, data, max_iter=max_iter, tolerance_grad=tolerance)
            reached = gradient_max(model, task, data)
            if reached <= 10 * tolerance:  # L-BFGS's own stop test differs slightly from this recomputation
                break
    model.grad_max = reached
    return model


class WarmStartTrainer:
    """``train_fn`` for leave-one-out retraining: L-BFGS on the subset, starting from the trained weights.

    Picklable (so joblib workers can run it). A warm start gives the same minimum as a cold one on a convex model
    and, for a network, the nearby minimum that influence functions describe, in a fraction of the time.
    """

    def __init__(self, model: nn.Module, task: ClassificationTask, schedule: Schedule) -> None:
        self.model = model
        self.task = task
        self.schedule = schedule

    def __call__(self, data: tuple) -> nn.Module:
        s = self.schedule
        return train_to_tolerance(
            self.model,
            self.task,
            data,
            tolerance=s.tolerance,
            max_iter=s.retrain_iter,
            rounds=s.retrain_rounds,
        )


class DemoEvaluate:
    """``evaluate(model)``: the loss of every query (test images, then the left-out training images), followed by
    the retrain's ``max |grad L|`` so that convergence of every retrain can be reported."""

    def __init__(self, task: ClassificationTask, X: torch.Tensor, y: torch.Tensor) -> None:
        self.task = task
        self.X = X
        self.y = y

    def __call__(self, model: nn.Module) -> np.ndarray:
        with torch.no_grad():
            losses = self.task.loss(model.eval(), (self.X, self.y)).to(torch.float64).numpy()
        return np.concatenate([losses, [float(getattr(model, "grad_max", 0.0))]])


# --------------------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------------------
def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir`` as a Path, created if needed; a UsageError for an existing file or an uncreatable path."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(
            f"--out {str(path)!r} is an existing file, not a directory. Fix: pass a directory (it is created if "
            "missing), e.g. --out datatrace-out."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"--out {str(path)!r} cannot be created ({err.strerror or err}). Fix: pass a directory you can write."
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--out {str(path)!r} is not writable. Fix: pass a directory you can write.")
    return path


def _check_fraction(flip_fraction: Any) -> float:
    try:
        value = float(flip_fraction)
    except (TypeError, ValueError):
        raise UsageError(
            f"flip_fraction={flip_fraction!r} is not a number. Fix: pass a fraction such as 0.05."
        ) from None
    if not 0.0 < value <= 0.5:
        raise UsageError(
            f"flip_fraction={flip_fraction!r} is not allowed: expected a fraction in (0, 0.5] (the share of "
            "training labels flipped, and there must be some to find). Fix: pass e.g. 0.05."
        )
    return value


def _cache_key(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else float("nan")


def run_demo(
    out_dir: str | os.PathLike[str] = "datatrace-out",
    model: str = "logreg",
    n_loo: int | None = None,
    flip_fraction: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    n_jobs: int = DEFAULT_N_JOBS,
    stream: TextIO | None = None,
    torch_threads: int | None = 1,
) -> dict[str, Any]:
    """Run the digits demo (see the module docstring) and return every number it computed.

    Args:
        out_dir: directory for ``report.html``, ``results.json``, ``scores.safetensors``, ``loo.npz`` and the
            retraining cache (``loo-cache/``); created if missing.
        model: ``"logreg"`` (multinomial logistic regression, convex) or ``"mlp"`` (a 64-32-10 tanh network).
        n_loo: training images to verify by leave-one-out retraining (default 40 for logreg, 20 for mlp).
        flip_fraction: share of training labels flipped to another class, in (0, 0.5].
        seed: seeds the split, the flips, the initial weights and the leave-one-out sample.
        progress: show progress bars.
        n_jobs: parallel worker processes for retraining (joblib; ``-1`` = all cores).
        stream: where to print the summary (default: ``sys.stdout``; pass ``io.StringIO()`` to capture it).
        torch_threads: torch's intra-op threads while the demo runs (restored afterwards); ``None`` leaves the
            setting alone. The models are tiny, and one thread was measured fastest: several threads on small
            tensors mostly spin, and collapse when the cores are shared.

    Returns:
        A JSON-ready dict (also written to ``out_dir/results.json``); e.g. ``results["loo"]["mean_pearson"]``.
    """
    if model not in MODELS:
        raise UsageError(
            f"model={model!r} is not allowed: expected one of {list(MODELS)}. Fix: pass 'logreg'."
        )
    n_loo = DEFAULT_N_LOO[model] if n_loo is None else n_loo
    try:
        n_loo = check_positive_int("n_loo", n_loo, minimum=2)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if n_loo > N_TRAIN:
        raise UsageError(
            f"n_loo={n_loo} is more than the {N_TRAIN} training images. Fix: pass at most {N_TRAIN}."
        )
    flip_fraction = _check_fraction(flip_fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed={seed!r} is not allowed: expected an integer >= 0. Fix: pass e.g. 0.")
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
        raise UsageError(
            f"n_jobs={n_jobs!r} is not allowed: expected -1 or an integer >= 1. Fix: pass 1 or 2."
        )
    if torch_threads is not None:
        try:
            torch_threads = check_positive_int("torch_threads", torch_threads)
        except ValueError as err:
            raise UsageError(str(err)) from None
    out = check_out_dir(out_dir)
    stream = sys.stdout if stream is None else stream
    with _torch_threads(torch_threads):
        return _run_demo(out, model, n_loo, flip_fraction, seed, progress, n_jobs, stream)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(previous)


def _run_demo(
    out: Path,
    model: str,
    n_loo: int,
    flip_fraction: float,
    seed: int,
    progress: bool,
    n_jobs: int,
    stream: TextIO,
) -> dict[str, Any]:
    from datatrace import __version__
    from datatrace.verification.metrics import detection_curve, loo_correlation
    from datatrace.verification.retrain import leave_one_out

    timings: dict[str, float] = {}
    start = time.perf_counter()

    # -- data and model ----------------------------------------------------------------------------------------
    data = load_digits_data(seed, flip_fraction)
    train, test = data.train(), data.test()
    n_flipped = int(data.flipped.sum())
    task = ClassificationTask(weight_decay=WEIGHT_DECAY)
    schedule = SCHEDULES[model]
    tolerance = schedule.tolerance
    logger.info(
        "training %s on %d digits (%d labels flipped) with L-BFGS", MODEL_NAMES[model], N_TRAIN, n_flipped
    )
    t0 = time.perf_counter()
    trained = train_to_tolerance(
        build_model(model, seed),
        task,
        train,
        tolerance=tolerance,
        max_iter=schedule.fit_iter,
        rounds=schedule.fit_rounds,
    )
    timings["train_seconds"] = time.perf_counter() - t0
    if trained.grad_max > 100 * tolerance:
        logger.warning(
            "the model stopped at max |grad L| = %.3g, above the target %.1g: influence functions assume a "
            "minimum, so expect looser agreement with retraining.",
            trained.grad_max,
            tolerance,
        )
    with torch.no_grad():
        train_logits, test_logits = trained(train[0]), trained(test[0])
        train_loss = task.loss(trained, train).numpy()
        test_loss = task.loss(trained, test).numpy()
    test_pred = test_logits.argmax(1).numpy()
    train_acc = float((train_logits.argmax(1).numpy() == data.y_train).mean())
    test_acc = float((test_pred == data.y_test).mean())
    num_params = sum(p.numel() for p in trained.parameters())

    # -- influence ---------------------------------------------------------------------------------------------
    logger.info("fitting influence functions (exact Hessian, %d parameters)", num_params)
    t0 = time.perf_counter()
    influence = InfluenceFunction(trained, task, curvature="exact", damping="auto", progress=progress)
    influence.fit(train)
    scores = influence.score(test)
    self_influence = influence.self_influence().numpy()
    timings["influence_seconds"] = time.perf_counter() - t0
    curvature = {k: v for k, v in influence.curvature_.info.items() if isinstance(v, (int, float, str, bool))}
    values = scores.values.numpy()
    scores.metadata.update({"demo": "digits", "model": model, "seed": seed, "flip_fraction": flip_fraction})
    scores_path = scores.save(out / "scores.safetensors")

    # -- leave-one-out retraining ------------------------------------------------------------------------------
    rng = np.random.default_rng([seed, 2])
    loo_idx = np.sort(rng.choice(N_TRAIN, size=n_loo, replace=False)).astype(np.int64)
    query_X = torch.cat([test[0], train[0][loo_idx]])
    query_y = torch.cat([test[1], train[1][loo_idx]])
    evaluate = DemoEvaluate(task, query_X, query_y)
    cache_config = {
        "version": CACHE_VERSION,
        "model": model,
        "seed": seed,
        "flip_fraction": flip_fraction,
        "n_loo": n_loo,
        "weight_decay": WEIGHT_DECAY,
        "schedule": dataclasses.asdict(schedule),
        "torch": torch.__version__,
    }
    cache_dir = out / "loo-cache" / f"{model}-{_cache_key(cache_config)}"
    logger.info(
        "retraining %d times, each without one training image (n_jobs=%d, cache %s)", n_loo, n_jobs, cache_dir
    )
    t0 = time.perf_counter()
    result = leave_one_out(
        WarmStartTrainer(trained, task, schedule),
        train,
        evaluate,
        indices=loo_idx,
        n_jobs=n_jobs,
        cache_dir=cache_dir,
        progress=progress,
        base_outputs=evaluate(trained),
    )
    timings["retrain_seconds"] = time.perf_counter() - t0
    n_test = len(data.y_test)
    actual = result.changes[:n_test]  # (n_test, n_loo)
    estimated = values[:, loo_idx]
    retrain_grad = result.retrained[-1]
    correlation = loo_correlation(estimated, actual)
    actual_self = np.array([result.changes[n_test + j, j] for j in range(n_loo)])
    estimated_self = self_influence[loo_idx]
    self_pearson = _pearson(estimated_self, actual_self)
    n_unconverged = int((retrain_grad > 100 * tolerance).sum())
    # for each left-out example: do its estimated effects on the test losses line up with the actual ones, and
    # are they the right size? (a column view of the same matrices; it shows which retrains disagree)
    per_retrain = {
        "train_index": loo_idx,
        "pearson": np.array([_pearson(estimated[:, j], actual[:, j]) for j in range(n_loo)]),
        "size_ratio": np.abs(estimated).mean(axis=0) / np.maximum(np.abs(actual).mean(axis=0), 1e-300),
        "flipped": data.flipped[loo_idx],
    }
    if n_unconverged:
        logger.warning(
            "%d of %d retrains stopped above max |grad L| = %.1g (largest %.3g): the 'actual' changes carry that "
            "optimisation error.",
            n_unconverged,
            n_loo,
            100 * tolerance,
            float(retrain_grad.max()),
        )
    np.savez_compressed(
        out / "loo.npz",
        indices=loo_idx,
        estimated=estimated,
        actual=actual,
        estimated_self=estimated_self,
        actual_self=actual_self,
    )

    # -- explaining a misclassified test image -----------------------------------------------------------------
    wrong = np.flatnonzero(test_pred != data.y_test)
    pool = wrong if wrong.size else np.arange(n_test)
    q = int(pool[np.argmax(test_loss[pool])])
    k = 5
    pro, opp = scores.proponents(q, k), scores.opponents(q, k)

    def describe_train(indices: torch.Tensor, vals: torch.Tensor) -> list[dict[str, Any]]:
        return [
            {
                "train_index": int(i),
                "label": int(data.y_train[i]),
                "true_label": int(data.y_train_true[i]),
                "flipped": bool(data.flipped[i]),
                "score": float(v),
            }
            for i, v in zip(indices.tolist(), vals.tolist())
        ]

    explanation = {
        "query_test_index": q,
        "query_digits_row": int(data.test_rows[q]),
        "true_label": int(data.y_test[q]),
        "predicted_label": int(test_pred[q]),
        "misclassified": bool(test_pred[q] != data.y_test[q]),
        "loss": float(test_loss[q]),
        "chosen_as": "the misclassified test image with the highest loss"
        if wrong.size
        else "the test image with the highest loss (none is misclassified)",
        "proponents": describe_train(pro.indices, pro.values),
        "opponents": describe_train(opp.indices, opp.values),
    }

    # -- finding flipped labels --------------------------------------------------------------------------------
    curve_self = detection_curve(self_influence, data.flipped)
    curve_loss = detection_curve(train_loss, data.flipped)
    detection: dict[str, Any] = {"n_flipped": n_flipped, "n_train": N_TRAIN, "auc": {}, "top": []}
    detection["auc"] = {
        "self_influence": float(curve_self.auc),
        "training_loss": float(curve_loss.auc),
        "random": 0.5,
    }
    for fraction in (0.05, 0.10):
        inspected = round(float(curve_self.random_found_at(fraction)) * N_TRAIN)
        detection["top"].append(
            {
                "fraction_inspected": fraction,
                "n_inspected": inspected,
                "found_by_self_influence": round(float(curve_self.found_at(fraction)) * n_flipped),
                "found_by_training_loss": round(float(curve_loss.found_at(fraction)) * n_flipped),
                "expected_by_random": float(curve_self.random_found_at(fraction)) * n_flipped,
            }
        )
    results: dict[str, Any] = {
        "datatrace_version": __version__,
        "meaning": MEANING,
        "units": f"{UNITS} (natural-log cross-entropy of a test image)",
        "config": {
            "model": model,
            "n_loo": n_loo,
            "flip_fraction": flip_fraction,
            "seed": seed,
            "n_jobs": n_jobs,
            "weight_decay": WEIGHT_DECAY,
            "curvature": "exact",
            "damping": "auto",
            "lbfgs_schedule": dataclasses.asdict(schedule),
            "torch_threads": torch.get_num_threads(),
        },
        "data": {
            "source": "sklearn.datasets.load_digits, pixels / 16",
            "n_train": N_TRAIN,
            "n_test": n_test,
            "n_flipped": n_flipped,
            "flipped_train_indices": np.flatnonzero(data.flipped),
        },
        "model": {
            "kind": model,
            "description": MODEL_NAMES[model],
            "num_params": num_params,
            "train_accuracy": train_acc,
            "test_accuracy": test_acc,
            "train_loss_mean": float(train_loss.mean()),
            "test_loss_mean": float(test_loss.mean()),
            "gradient_max": float(trained.grad_max),
        },
        "influence": {
            "curvature": curvature,
            "gradient_norm": influence.gradient_norm_,
            "self_influence_mean": float(self_influence.mean()),
            "self_influence_max": float(self_influence.max()),
        },
        "loo": {
            "indices": loo_idx,
            "n_query": n_test,
            "mean_pearson": float(correlation.mean_pearson),
            "mean_spearman": float(correlation.mean_spearman),
            "pooled_pearson": float(correlation.pooled_pearson),
            "per_query_pearson": correlation.pearson,
            "self_influence_pearson": self_pearson,
            "retrain_gradient_max": float(retrain_grad.max()),
            "n_retrains_above_tolerance": n_unconverged,
            "actual_change_abs_mean": float(np.abs(actual).mean()),
            "per_retrain": per_retrain,
            "per_retrain_median_pearson": float(np.nanmedian(per_retrain["pearson"])),
            "per_retrain_median_size_ratio": float(np.nanmedian(per_retrain["size_ratio"])),
            "cache_dir": str(cache_dir),
        },
        "explanation": explanation,
        "detection": detection,
        "timings": timings,
        "files": {
            "report": str(out / "report.html"),
            "results": str(out / "results.json"),
            "scores": str(scores_path),
            "loo": str(out / "loo.npz"),
        },
    }

    t0 = time.perf_counter()
    _write_report(
        out / "report.html",
        results,
        data,
        estimated,
        actual,
        estimated_self,
        actual_self,
        curve_self,
        curve_loss,
        self_influence,
    )
    timings["report_seconds"] = time.perf_counter() - t0
    timings["total_seconds"] = time.perf_counter() - start
    write_json(out / "results.json", results)
    stream.write(format_summary(results))
    stream.flush()
    return jsonable(results)


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def format_summary(results: dict[str, Any]) -> str:
    """The printed summary of :func:`run_demo` (plain text, conventions in words)."""
    r = results
    m, loo, ex, det = r["model"], r["loo"], r["explanation"], r["detection"]
    info = r["influence"]["curvature"]
    lines = [
        f"datatrace demo: digits, {m['description']}, {m['num_params']} parameters (float64, weight decay "
        f"{r['config']['weight_decay']:g})",
        f"  data: {r['data']['n_train']} training images ({r['data']['n_flipped']} labels flipped on purpose), "
        f"{r['data']['n_test']} test images; test accuracy {_pct(m['test_accuracy'])}, "
        f"max |grad L| = {m['gradient_max']:.1g}",
        f"  curvature: exact Hessian, eigenvalues in [{info['eigenvalue_min']:.3g}, {info['eigenvalue_max']:.3g}], "
        f"{info['num_negative']} negative, damping {info['damping']:.3g} (auto)",
        "",
        "What a score means: score[q, i] estimates how much test image q's loss (cross-entropy, in nats) changes",
        "if training image i is removed and the model retrained. Positive: i helped q (a proponent).",
        "Negative: i hurt q (an opponent). Self-influence estimates how much i's own loss would rise if removed.",
        "",
        f"Check against actual retraining ({len(loo['indices'])} training images left out one at a time, "
        f"{loo['n_query']} test losses each):",
        f"  mean Pearson correlation {loo['mean_pearson']:.3f}, mean Spearman {loo['mean_spearman']:.3f} "
        f"(per test image, across the {len(loo['indices'])} retrains); pooled Pearson {loo['pooled_pearson']:.3f}",
        f"  self-influence vs actual rise of the left-out image's own loss: Pearson {loo['self_influence_pearson']:.3f}",
        f"  typical actual change |f(theta without i) - f(theta)|: {loo['actual_change_abs_mean']:.2g} nats; "
        f"retrains converged to max |grad L| <= {loo['retrain_gradient_max']:.1g}",
        f"  per left-out image, across the {loo['n_query']} test losses: median Pearson "
        f"{loo['per_retrain_median_pearson']:.3f}, median size estimated/actual "
        f"{loo['per_retrain_median_size_ratio']:.2f}",
    ]
    if loo["mean_pearson"] < 0.9:
        lines.append(
            "  Looser agreement is expected on a network: influence functions are a first-order estimate around "
            "the\n  trained weights, and some retrains move further than that (results.json: loo.per_retrain)."
        )
    lines += [
        "",
        f"Why is test image {ex['query_test_index']} (true label {ex['true_label']}) "
        + (f"predicted as {ex['predicted_label']}" if ex["misclassified"] else "hard")
        + f"? Its loss is {ex['loss']:.3g} nats ({ex['chosen_as']}).",
    ]

    def table(title: str, rows: list[dict[str, Any]]) -> None:
        lines.append(title)
        if not rows:
            lines.append("    (none)")
            return
        lines.append(
            f"    {'train index':>11}  {'label':>5}  {'true':>4}  {'flipped':>7}  {'score (nats)':>12}"
        )
        for row in rows:
            lines.append(
                f"    {row['train_index']:>11}  {row['label']:>5}  {row['true_label']:>4}  "
                f"{'yes' if row['flipped'] else 'no':>7}  {row['score']:>+12.4g}"
            )

    table(
        "  proponents (removing one would RAISE this loss by the score: they pulled toward the true label)",
        ex["proponents"],
    )
    table(
        "  opponents (removing one would LOWER this loss by |score|: they pushed toward the wrong answer)",
        ex["opponents"],
    )
    lines += [
        "",
        f"Finding the {det['n_flipped']} flipped labels by ranking training images by self-influence:",
    ]
    for top in det["top"]:
        lines.append(
            f"  top {_pct(top['fraction_inspected'])} ({top['n_inspected']} images): "
            f"{top['found_by_self_influence']} of {det['n_flipped']} found by self-influence, "
            f"{top['found_by_training_loss']} by training loss, {top['expected_by_random']:.1f} expected at random"
        )
    lines.append(
        f"  area under the detection curve: self-influence {det['auc']['self_influence']:.3f}, "
        f"training loss {det['auc']['training_loss']:.3f}, random 0.5"
    )
    files = r["files"]
    lines += [
        "",
        f"Report: {files['report']}   numbers: {files['results']}   scores: {files['scores']}",
        f"Time: {r['timings']['total_seconds']:.1f} s (train {r['timings']['train_seconds']:.1f} s, influence "
        f"{r['timings']['influence_seconds']:.1f} s, retraining {r['timings']['retrain_seconds']:.1f} s, report "
        f"{r['timings']['report_seconds']:.1f} s)",
        "",
    ]
    return "\n".join(lines)


def _grid_caption(row: dict[str, Any]) -> str:
    label = f"#{row['train_index']} label {row['label']}"
    if row["flipped"]:
        label += f" (was {row['true_label']})"
    return f"{label}\n{row['score']:+.3g} nats"


def _write_report(
    path: Path,
    results: dict[str, Any],
    data: DigitsData,
    estimated: np.ndarray,
    actual: np.ndarray,
    estimated_self: np.ndarray,
    actual_self: np.ndarray,
    curve_self: Any,
    curve_loss: Any,
    self_influence: np.ndarray,
) -> None:
    from datatrace.cli.report import Report, plot_detection_curve, plot_estimated_vs_actual, plot_image_grid

    r = results
    m, loo, ex, det = r["model"], r["loo"], r["explanation"], r["detection"]
    report = Report(
        f"datatrace demo: digits, {m['description']}",
        f"{r['data']['n_train']} training images ({r['data']['n_flipped']} labels flipped on purpose), "
        f"{r['data']['n_test']} test images, seed {r['config']['seed']}.",
    )
    report.add_heading("What the numbers mean")
    report.add_paragraph(
        "score[q, i] estimates f_q(theta without i) - f_q(theta_hat): how much test image q's loss (cross-entropy, "
        "in nats) would change if training image i were removed and the model retrained. Positive: removing i "
        "raises q's loss, so i helped q (a proponent). Negative: i hurt q (an opponent). Self-influence "
        "(1/n) g_i^T H^-1 g_i estimates how much training image i's own loss would rise if it were removed "
        "(large for atypical or mislabelled images)."
    )
    report.add_key_values(
        {
            "model": f"{m['description']}, {m['num_params']} parameters, float64",
            "weight decay": r["config"]["weight_decay"],
            "training accuracy (on the labels trained on)": m["train_accuracy"],
            "test accuracy": m["test_accuracy"],
            "max |grad L| at the trained model": m["gradient_max"],
            "curvature": "exact Hessian, damping=auto",
            "Hessian eigenvalues (min, max)": f"{r['influence']['curvature']['eigenvalue_min']:.4g}, "
            f"{r['influence']['curvature']['eigenvalue_max']:.4g}",
            "negative eigenvalues": r["influence"]["curvature"]["num_negative"],
            "damping used": r["influence"]["curvature"]["damping"],
        },
        caption="Set-up",
    )

    report.add_heading("Check against actual retraining")
    report.add_paragraph(
        f"{len(loo['indices'])} randomly chosen training images were each left out and the model retrained "
        f"(L-BFGS warm-started from the trained weights, to max |grad L| <= {loo['retrain_gradient_max']:.1g}). "
        f"For each of the {loo['n_query']} test images, the estimated and the actual changes of its loss are "
        "correlated across the left-out images."
    )
    report.add_key_values(
        {
            "mean Pearson correlation (per test image)": loo["mean_pearson"],
            "mean Spearman correlation (per test image)": loo["mean_spearman"],
            "pooled Pearson correlation (all pairs)": loo["pooled_pearson"],
            "self-influence vs actual rise of own loss (Pearson)": loo["self_influence_pearson"],
            "mean |actual change| (nats)": loo["actual_change_abs_mean"],
            "median per left-out image: Pearson across test images": loo["per_retrain_median_pearson"],
            "median per left-out image: size estimated / actual": loo["per_retrain_median_size_ratio"],
        },
        caption="Estimated vs actual leave-one-out changes",
    )
    report.add_figure(
        plot_estimated_vs_actual(
            estimated,
            actual,
            title="Change of test losses when one training image is removed",
            xlabel="actual change (retrained), nats",
            ylabel="estimated change (influence function), nats",
        ),
        "One point per (test image, left-out training image) pair. Points on the red line are estimated exactly; "
        "the title's correlations pool all pairs, the table above averages per test image.",
    )
    report.add_figure(
        plot_estimated_vs_actual(
            estimated_self,
            actual_self,
            title="Self-influence: rise of the left-out image's own loss",
            xlabel="actual rise (retrained), nats",
            ylabel="self-influence (estimated), nats",
        ),
        "One point per left-out training image.",
    )
    per = loo["per_retrain"]
    report.add_table(
        [
            [int(i), bool(f), p, ratio, e_self, a_self]
            for i, f, p, ratio, e_self, a_self in zip(
                per["train_index"],
                per["flipped"],
                per["pearson"],
                per["size_ratio"],
                estimated_self,
                actual_self,
            )
        ],
        [
            "left-out train index",
            "label flipped",
            "Pearson across test losses",
            "size estimated / actual",
            "self-influence (nats)",
            "actual rise of own loss (nats)",
        ],
        caption="Each retrain: how well its estimated effects on the test losses match the actual ones",
    )

    report.add_heading(
        "Explaining a misclassified test image" if ex["misclassified"] else "Explaining a test image"
    )
    report.add_paragraph(
        f"Test image {ex['query_test_index']} (true label {ex['true_label']})"
        + (f" is predicted as {ex['predicted_label']}" if ex["misclassified"] else "")
        + f", with loss {ex['loss']:.4g} nats; it is {ex['chosen_as']}. Proponents: removing one would raise its "
        "loss by the score shown (they pulled it toward its true label). Opponents: removing one would lower its "
        "loss by the score's size (they pushed it toward the wrong answer). Red outline: a label flipped on purpose."
    )
    report.add_figure(
        plot_image_grid(
            data.X_test[[ex["query_test_index"]]],
            [f"test #{ex['query_test_index']}: true {ex['true_label']}, predicted {ex['predicted_label']}"],
            image_shape=IMAGE_SHAPE,
            cell_size=2.4,
        ),
        "The test image being explained.",
    )
    for name, rows in (("proponents", ex["proponents"]), ("opponents", ex["opponents"])):
        if not rows:
            report.add_paragraph(
                f"No training image has a {'positive' if name == 'proponents' else 'negative'} score."
            )
            continue
        idx = [row["train_index"] for row in rows]
        report.add_figure(
            plot_image_grid(
                data.X_train[idx],
                [_grid_caption(row) for row in rows],
                image_shape=IMAGE_SHAPE,
                title=f"Top {len(rows)} {name} (score = change of the test image's loss if removed)",
                highlight=[row["flipped"] for row in rows],
                highlight_label="label flipped on purpose",
            ),
            f"Top {name} of test image {ex['query_test_index']}, with the label each was trained on.",
        )
        report.add_table(
            [
                [row["train_index"], row["label"], row["true_label"], row["flipped"], row["score"]]
                for row in rows
            ],
            ["train index", "label trained on", "true label", "flipped", "score (nats)"],
            caption=f"Top {name}",
        )

    report.add_heading("Finding the flipped labels")
    report.add_paragraph(
        f"{det['n_flipped']} of {det['n_train']} training labels were flipped. Training images are ranked by "
        "self-influence (highest first) and inspected in that order; the curve shows the share of flipped labels "
        "found. Ranking by training loss and a random order are shown for comparison."
    )
    report.add_table(
        [
            [
                f"top {_pct(t['fraction_inspected'])} ({t['n_inspected']} images)",
                t["found_by_self_influence"],
                t["found_by_training_loss"],
                t["expected_by_random"],
            ]
            for t in det["top"]
        ]
        + [["area under the curve", det["auc"]["self_influence"], det["auc"]["training_loss"], 0.5]],
        ["inspected", "found by self-influence", "found by training loss", "expected at random"],
        caption=f"Flipped labels found (of {det['n_flipped']})",
    )
    report.add_figure(
        plot_detection_curve(
            {"self-influence": curve_self, "training loss": curve_loss},
            title="Finding flipped labels",
            flagged_fraction=det["n_flipped"] / det["n_train"],
            ylabel="fraction of flipped labels found",
        ),
        "Dotted verticals at 5% and 10% inspected.",
    )
    top = np.argsort(-self_influence, kind="stable")[:10]
    report.add_figure(
        plot_image_grid(
            data.X_train[top],
            [
                f"#{i} label {data.y_train[i]}"
                + (f" (was {data.y_train_true[i]})" if data.flipped[i] else "")
                + f"\n{self_influence[i]:.3g} nats"
                for i in top
            ],
            image_shape=IMAGE_SHAPE,
            title="Highest self-influence",
            highlight=data.flipped[top].tolist(),
            highlight_label="label flipped on purpose",
        ),
        "The 10 training images whose own loss would rise most if removed.",
    )
    report.add_heading("Timing")
    report.add_key_values(
        {k.replace("_seconds", "").replace("_", " "): v for k, v in r["timings"].items()},
        caption="Seconds, in this process (the report itself is being written)",
    )
    report.save(path)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``datatrace demo``."""
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="logreg",
        help="logreg: multinomial logistic regression (convex, default); mlp: a 64-32-10 tanh network.",
    )
    parser.add_argument(
        "--out",
        default="datatrace-out",
        metavar="DIR",
        help="directory for report.html, results.json, scores.safetensors and the retraining cache "
        "(created if missing; default: ./datatrace-out).",
    )
    parser.add_argument(
        "--n-loo",
        type=int,
        default=None,
        metavar="N",
        help="training images to check by actual leave-one-out retraining "
        f"(default: {DEFAULT_N_LOO['logreg']} for logreg, {DEFAULT_N_LOO['mlp']} for mlp).",
    )
    parser.add_argument(
        "--flip-fraction",
        type=float,
        default=0.05,
        metavar="F",
        help="share of training labels flipped to another class on purpose, in (0, 0.5] (default: 0.05).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed for the split, flips, weights and LOO sample."
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=DEFAULT_N_JOBS,
        metavar="N",
        help=f"parallel processes for retraining (-1: all cores; default: {DEFAULT_N_JOBS}).",
    )


def run(args: argparse.Namespace) -> int:
    """``datatrace demo``: run :func:`run_demo` with the parsed flags."""
    run_demo(
        args.out,
        model=args.model,
        n_loo=args.n_loo,
        flip_fraction=args.flip_fraction,
        seed=args.seed,
        progress=not args.quiet,
        n_jobs=args.jobs,
        stream=sys.stdout,
    )
    return 0
