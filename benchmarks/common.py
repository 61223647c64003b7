"""Shared pieces of the benchmarks: data, models, training, cached ground truth, and honest measurement.

Everything here is deterministic given its arguments, so that a benchmark and the ground truth it reuses from
``benchmarks/results/cache/`` always describe the same data, the same model and the same training protocol. The
cache directories are named after a hash of that protocol: change any number here and a new directory is used.

Units and signs are datatrace's: ``score[q, i] ~ f_q(theta_{-i}) - f_q(theta_hat)``, the change of query ``q``'s
loss when training example ``i`` is removed and the model retrained (positive: ``i`` helped the query).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import datatrace
from datatrace.verification import retrain
from datatrace.verification.training import fit_full_batch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = RESULTS_DIR / "cache"

logger = logging.getLogger("benchmarks")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
def digits_split(n_train: int, n_test: int, seed: int) -> tuple[tuple, tuple]:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1] (``X / 16``), float64; a seeded random split.

    Returns ``(X_train, y_train), (X_test, y_test)`` as torch tensors (labels int64). The split is the first
    ``n_train`` and the next ``n_test`` examples of ``numpy.random.default_rng(seed).permutation(1797)``.
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    if n_train + n_test > len(X):
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {len(X)} digits.")
    perm = np.random.default_rng(seed).permutation(len(X))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.int64)
    return (X[tr], y[tr]), (X[te], y[te])


# --------------------------------------------------------------------------------------------------------------
# Problems: a model family, its training protocol and its data
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One benchmark problem: the data, the architecture, the L2 strength and how models are trained.

    ``kind`` is ``"logreg"`` (``nn.Linear(64, 10)``: multinomial logistic regression, convex) or ``"mlp"``
    (``Linear(64, hidden) -> tanh -> Linear(hidden, 10)``, non-convex). Every model is float64 and trained by
    :func:`datatrace.verification.training.fit_full_batch` (full-batch L-BFGS) on the mean cross-entropy plus
    ``weight_decay / 2 * ||theta||^2`` (every parameter, biases included).
    """

    kind: str
    n_train: int = 1000
    n_test: int = 200
    seed: int = 0
    weight_decay: float = 1e-3
    hidden: int = 32
    base_max_iter: int = 5000  # L-BFGS iterations for the model trained on all data
    base_tolerance: float = 1e-11
    retrain_max_iter: int = 1000  # per retrain (warm start for LOO, from a seeded init for subsets)
    retrain_tolerance: float = 1e-10

    def __post_init__(self) -> None:
        if self.kind not in ("logreg", "mlp"):
            raise ValueError(f"Problem.kind must be 'logreg' or 'mlp', got {self.kind!r}.")

    def key(self) -> str:
        """A short name for the cache: the kind, the sizes and a hash of every setting."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.kind}-{self.n_train}-{self.n_test}-{digest}"

    def retrain_key(self) -> str:
        """Like :meth:`key` but without the base model's training settings: retraining from a seeded init (the
        subsets) does not depend on how the base model was trained, so its cache is shared across them."""
        settings = {k: v for k, v in asdict(self).items() if not k.startswith("base_")}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.kind}-{self.n_train}-{self.n_test}-retrain-{digest}"

    def data(self) -> tuple[tuple, tuple]:
        return digits_split(self.n_train, self.n_test, self.seed)

    def task(self) -> datatrace.ClassificationTask:
        return datatrace.ClassificationTask(weight_decay=self.weight_decay)

    def describe(self) -> str:
        arch = (
            "Linear(64,10)"
            if self.kind == "logreg"
            else f"Linear(64,{self.hidden})-tanh-Linear({self.hidden},10)"
        )
        return (
            f"{arch} float64 on sklearn digits (X/16), {self.n_train} train / {self.n_test} test "
            f"(split seed {self.seed}), mean cross-entropy + {self.weight_decay:g}/2 ||theta||^2, full-batch L-BFGS"
        )

    def init_model(self, seed: int) -> nn.Module:
        """A freshly initialised model (PyTorch's default init) drawn from ``torch.Generator().manual_seed(seed)``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.kind == "logreg":
                model = nn.Linear(64, 10)
            else:
                model = nn.Sequential(nn.Linear(64, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 10))
        return model.double()


class FromSeed:
    """Picklable ``train_fn(data, seed) -> model``: initialise from ``seed`` and train with L-BFGS."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem

    def __call__(self, data: tuple, seed: int = 0) -> nn.Module:
        torch.set_num_threads(1)  # joblib runs two of these at once on two cores
        model = self.problem.init_model(int(seed))
        return fit_full_batch(
            model,
            self.problem.task(),
            data,
            max_iter=self.problem.retrain_max_iter,
            tolerance_grad=self.problem.retrain_tolerance,
            copy_model=False,
        )


class WarmStart:
    """Picklable ``train_fn(data) -> model``: L-BFGS on ``data`` starting from the trained model's weights.

    For a strictly convex objective (logistic regression with L2) the minimum is unique, so the warm start only
    saves time; it is the standard way to get tight leave-one-out ground truth.
    """

    def __init__(self, problem: Problem, model: nn.Module) -> None:
        self.problem = problem
        self.model = model

    def __call__(self, data: tuple) -> nn.Module:
        torch.set_num_threads(1)
        return fit_full_batch(
            self.model,
            self.problem.task(),
            data,
            max_iter=self.problem.retrain_max_iter,
            tolerance_grad=self.problem.retrain_tolerance,
        )


def trained_model(problem: Problem, train: tuple | None = None) -> nn.Module:
    """The model trained on all of ``problem``'s training data (init seed = ``problem.seed``), cached on disk."""
    path = CACHE_DIR / problem.key() / "model.pt"
    model = problem.init_model(problem.seed)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    if train is None:
        train, _ = problem.data()
    start = time.perf_counter()
    model = fit_full_batch(
        model, problem.task(), train, max_iter=problem.base_max_iter, tolerance_grad=problem.base_tolerance
    )
    logger.info("trained the %s base model in %.1f s", problem.kind, time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Ground truth by retraining (cached)
# --------------------------------------------------------------------------------------------------------------
def loo_indices(problem: Problem, n_loo: int) -> np.ndarray:
    """``n_loo`` distinct training indices drawn with ``default_rng(problem.seed + 1)``."""
    return np.random.default_rng(problem.seed + 1).choice(problem.n_train, size=n_loo, replace=False)


def loo_truth(
    problem: Problem, model: nn.Module, n_loo: int, n_jobs: int = 2, progress: bool = True
) -> retrain.LOOResult:
    """Actual leave-one-out changes of every test query's loss, warm-started retraining, cached."""
    train, test = problem.data()
    task = problem.task()
    indices = loo_indices(problem, n_loo)
    return retrain.leave_one_out(
        WarmStart(problem, model),
        train,
        retrain.evaluator(task, test),
        indices,
        n_jobs=n_jobs,
        cache_dir=CACHE_DIR / problem.key() / f"loo-{n_loo}",
        progress=progress,
        base_outputs=retrain.evaluator(task, test)(model),
    )


def subset_truth(
    problem: Problem,
    n_subsets: int,
    n_seeds: int,
    n_jobs: int = 2,
    progress: bool = True,
    random_state: int = 0,
) -> retrain.SubsetResult:
    """Test losses of models trained from a seeded random init on random half subsets, cached.

    Each run initialises the model from its own seed (``retrain.subsets`` draws one per subset and seed index), so
    with ``n_seeds >= 2`` the spread between runs of one subset measures the training noise, and
    :func:`datatrace.verification.metrics.lds` reports the resulting noise ceiling.
    """
    train, test = problem.data()
    name = f"subsets-{n_subsets}x{n_seeds}-rs{random_state}"
    cache_dir = CACHE_DIR / problem.retrain_key() / name
    legacy = CACHE_DIR / problem.key() / name  # where earlier versions of this file kept it
    if legacy.exists() and not cache_dir.exists():
        cache_dir = legacy
    return retrain.subsets(
        FromSeed(problem),
        train,
        retrain.evaluator(problem.task(), test),
        n_subsets=n_subsets,
        fraction=0.5,
        n_seeds=n_seeds,
        random_state=random_state,
        n_jobs=n_jobs,
        cache_dir=cache_dir,
        progress=progress,
    )


# --------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------
def forward_backward_seconds(
    model: nn.Module, task: datatrace.Task, train: tuple, repeats: int = 21
) -> float:
    """Median wall time of ONE plain forward + backward pass of the mean training loss over the whole training
    set (one batch, the model's dtype), after one warm-up pass: the floor for any gradient-based method."""
    model = model.train(False)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        for p in params:
            p.grad = None
        task.loss(model, train).mean().backward()
        elapsed = time.perf_counter() - start
        if r:
            times.append(elapsed)
    for p in params:
        p.grad = None
    return statistics.median(times)


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set size.

    ``VmHWM`` of ``/proc/self/status`` where available: it belongs to the process's own address space, so it starts
    afresh at ``exec`` and :func:`reset_peak_rss` can reset it. ``getrusage(RUSAGE_SELF).ru_maxrss`` is the
    fallback; note that Linux carries ``ru_maxrss`` over ``fork`` + ``exec``, so a subprocess inherits its parent's
    peak there.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the ``VmHWM`` high-water mark to the current resident size (Linux >= 4.0: ``clear_refs`` ``5``).
    Returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Measure:
    """Wall time and peak memory of a block of code, in a process that runs nothing else.

    * ``seconds``: ``time.perf_counter`` around the block.
    * ``peak_rss_mib``: the process's resident-set high-water mark at the end of the block (Python, torch, the
      library under test, the data and everything the block allocated; what the OS had to provide).
    * ``extra_peak_mib``: that high-water mark minus the resident set just before the block: the additional memory
      the block needed at its peak. The high-water mark is reset just before the block (``/proc/self/clear_refs``),
      so the peak is the block's own; where that reset is not possible, the block runs in a fresh subprocess that
      does only light work before it, and ``peak_was_set_in_block`` says whether the peak is the block's.

    ``tracemalloc`` would miss torch's allocations (they are not made through Python's allocator), so resident
    memory is the honest measure here; it includes memory-mapped files and shared libraries that were touched.
    """

    def __enter__(self) -> Measure:
        self.peak_reset = reset_peak_rss()
        self.rss_before = current_rss_bytes()
        self.peak_before = peak_rss_bytes()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start
        self.peak_after = peak_rss_bytes()
        self.peak_rss_mib = self.peak_after / 2**20
        self.extra_peak_mib = max(self.peak_after - self.rss_before, 0) / 2**20
        # without a reset, the block's own peak may have stayed below an earlier peak; then it is unknown (<= this)
        self.peak_was_set_in_block = self.peak_reset or self.peak_after > self.peak_before


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    """Table cell text: floats to ``digits`` significant places, None/NaN as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            return "nan"
        v = float(value)
        if v != 0 and (abs(v) >= 10**digits or abs(v) < 10 ** -(digits - 1)):
            return f"{v:.{digits - 1}e}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}f}" if abs(v) < 1 else f"{v:.{max(digits - 1, 1)}g}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], markdown: bool = False) -> str:
    """Render ``rows`` as a fixed-width (or Markdown) table; ``columns`` are ``(key, header)`` pairs."""
    cells = [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    headers = [h for _, h in columns]
    widths = [max([len(h)] + [len(c[j]) for c in cells]) for j, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        if markdown:
            return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
        return "  ".join(v.rjust(w) if j else v.ljust(w) for j, (v, w) in enumerate(zip(values, widths)))

    if markdown:
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(c) for c in cells)])


def to_jsonable(value: Any) -> Any:
    """Numbers, strings, lists and dicts only; NaN/inf become None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, torch.dtype):
        return str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return repr(value)


def write_json(path: Path, payload: Any) -> None:
    """Write strict JSON atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def versions(modules: Sequence[str]) -> dict[str, str | None]:
    """Installed versions of ``modules`` (None when not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in modules:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


@dataclass(frozen=True)
class Method:
    """One benchmarked method: ``kind`` picks the script's runner (``influence``, ``projected``, ``trak``, or a
    peer library), ``options`` its settings; ``max_params``: skipped on problems with more parameters (predicted
    to take minutes); ``reference``: the row whose scores this one is compared to."""

    label: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    max_params: int | None = None
    reference: str | None = None
