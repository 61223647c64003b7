"""Leave-one-out check of ``datatrace.attributors.sklearn.from_sklearn`` on multinomial logistic regression (digits).

What it measures: a scikit-learn ``LogisticRegression`` (multinomial, L2, tight tolerance) is fitted on 1000
digits (pixels scaled to [0, 1]); ``from_sklearn`` with the exact Hessian estimates, for every test point q and
training point i, ``score[q, i] ~ logloss_q(theta_{-i}) - logloss_q(theta_hat)`` (nats). The same scikit-learn
estimator is then refitted from scratch (``warm_start=False``) without each of ``--n-removed`` random training
points, and the estimated and actual changes of each test point's log-loss are correlated over the removed points
(Pearson and Spearman per test point, then averaged over test points). Acceptance target: mean Pearson >= 0.99.

It also reports how far the refits themselves can be trusted: the full model is refitted with a second solver
(``newton-cholesky``, exact Newton) and a few leave-one-out refits are repeated with it; the disagreement between
the two solvers, relative to the size of the leave-one-out changes, is the noise floor of the "actual" numbers.

Run:  python benchmarks/bench_sklearn_loo.py [--C 0.5] [--n-removed 100] [--n-jobs 2]
Writes benchmarks/results/sklearn_loo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
import sklearn
import torch
from joblib import Parallel, delayed
from scipy.stats import spearmanr
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

import datatrace
from datatrace.attributors.sklearn import from_sklearn

RESULTS = Path(__file__).resolve().parent / "results" / "sklearn_loo.json"


def log_loss_per_example(estimator: LogisticRegression, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``-log p(y | x)`` in nats for each example (datatrace's ClassificationTask loss)."""
    proba = estimator.predict_proba(X)
    column = np.searchsorted(estimator.classes_, y)
    return -np.log(proba[np.arange(len(y)), column])


def refit_without(
    template: LogisticRegression, X: np.ndarray, y: np.ndarray, i: int, X_test: np.ndarray, y_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
    """Fit a fresh clone without example ``i``: test losses, coef_, intercept_, iterations, seconds."""
    keep = np.arange(len(X)) != i
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=sklearn.exceptions.ConvergenceWarning)
        model = clone(template).set_params(warm_start=False).fit(X[keep], y[keep])
    seconds = time.perf_counter() - start
    return (
        log_loss_per_example(model, X_test, y_test),
        model.coef_.copy(),
        model.intercept_.copy(),
        int(np.max(model.n_iter_)),
        seconds,
    )


def row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


def centred(coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Flatten (m, K, d) and (m, K) parameter changes; intercepts centred (defined up to a common shift)."""
    intercept = intercept - intercept.mean(axis=-1, keepdims=True)
    return np.concatenate([coef.reshape(len(coef), -1), intercept.reshape(len(intercept), -1)], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--C", type=float, default=0.5, help="inverse L2 strength of LogisticRegression")
    parser.add_argument("--tol", type=float, default=1e-10)
    parser.add_argument("--solver", default="lbfgs")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--n-removed", type=int, default=100)
    parser.add_argument("--n-check", type=int, default=5, help="refits repeated with newton-cholesky")
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS/OpenMP/torch threads in the main process (joblib workers get cores/n_jobs each); 1 avoids "
        "oversubscription on a small shared machine, where 2 BLAS threads made one fit ~100x slower",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:

    X_all, y_all = load_digits(return_X_y=True)
    X_all = X_all / 16.0
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(X_all))
    train, test = order[: args.n_train], order[args.n_train : args.n_train + args.n_test]
    X, y, X_test, y_test = X_all[train], y_all[train], X_all[test], y_all[test]
    removed = np.sort(rng.choice(args.n_train, size=args.n_removed, replace=False))
    template = LogisticRegression(C=args.C, tol=args.tol, max_iter=10_000, solver=args.solver)

    start = time.perf_counter()
    estimator = clone(template).fit(X, y)
    fit_seconds = time.perf_counter() - start

    start = time.perf_counter()
    # warm-up on a small model: torch.func's one-time initialisation, reported but not in the timing below
    from_sklearn(clone(template).fit(X[:100], y[:100]), X[:100], y[:100])
    first_call_seconds = time.perf_counter() - start

    start = time.perf_counter()
    influence = from_sklearn(estimator, X, y)
    scores = influence.score((X_test, y_test)).values.numpy()[:, removed]
    change = influence.coef_change(removed)
    influence_seconds = time.perf_counter() - start

    start = time.perf_counter()
    refits = Parallel(n_jobs=args.n_jobs)(
        delayed(refit_without)(template, X, y, int(i), X_test, y_test) for i in removed
    )
    retrain_wall = time.perf_counter() - start
    base = log_loss_per_example(estimator, X_test, y_test)
    actual = np.stack([r[0] for r in refits], axis=1) - base[:, None]  # (n_test, n_removed)

    pearson = row_pearson(scores, actual)
    spearman = np.array([spearmanr(scores[q], actual[q]).statistic for q in range(len(scores))])
    overall = float(np.corrcoef(scores.ravel(), actual.ravel())[0, 1])

    actual_params = centred(
        np.stack([r[1] for r in refits]) - estimator.coef_,
        np.stack([r[2] for r in refits]) - estimator.intercept_,
    )
    estimated_params = centred(change["coef_"], change["intercept_"])
    relative = np.linalg.norm(estimated_params - actual_params, axis=1) / np.linalg.norm(
        actual_params, axis=1
    )

    # noise floor of the refits: the same objective solved by exact Newton
    newton = clone(template).set_params(solver="newton-cholesky", tol=1e-12)
    reference = newton.fit(X, y)
    base_ref = log_loss_per_example(reference, X_test, y_test)
    check = removed[: args.n_check]
    ref_refits = Parallel(n_jobs=args.n_jobs)(
        delayed(refit_without)(newton, X, y, int(i), X_test, y_test) for i in check
    )
    actual_ref = np.stack([r[0] for r in ref_refits], axis=1) - base_ref[:, None]
    solver_disagreement = float(
        np.linalg.norm(actual_ref - actual[:, : len(check)]) / np.linalg.norm(actual[:, : len(check)])
    )
    full_fit_gap = float(np.abs(base_ref - base).max() / np.abs(actual).mean())

    result = {
        "what": "LOO check of from_sklearn on multinomial LogisticRegression, digits scaled to [0, 1]",
        "meaning": "score[q, i] ~ logloss_q(theta_without_i) - logloss_q(theta_hat), nats; correlations are per "
        "test point over the removed training points, then averaged",
        "config": {
            "C": args.C,
            "tol": args.tol,
            "solver": args.solver,
            "n_train": args.n_train,
            "n_test": args.n_test,
            "n_removed": args.n_removed,
            "seed": args.seed,
            "n_params": influence.fmodel_.num_params,
            "test_accuracy": float(estimator.score(X_test, y_test)),
        },
        "metrics": {
            "pearson_mean": float(np.mean(pearson)),
            "pearson_median": float(np.median(pearson)),
            "pearson_min": float(np.min(pearson)),
            "pearson_fraction_ge_0.99": float(np.mean(pearson >= 0.99)),
            "spearman_mean": float(np.mean(spearman)),
            "spearman_median": float(np.median(spearman)),
            "spearman_min": float(np.min(spearman)),
            "pearson_all_pairs": overall,
            "params_relative_error_median": float(np.median(relative)),
            "params_relative_error_max": float(np.max(relative)),
            "mean_abs_actual_change": float(np.abs(actual).mean()),
        },
        "refit_precision": {
            "estimator_convergence_ratio": influence.convergence_ratio_,
            "refit_iterations_max": int(max(r[3] for r in refits)),
            "lbfgs_vs_newton_loo_relative_disagreement": solver_disagreement,
            "lbfgs_vs_newton_full_fit_gap_over_mean_change": full_fit_gap,
        },
        "timing_seconds": {
            "sklearn_fit": fit_seconds,
            "from_sklearn_fit_and_score": influence_seconds,
            "from_sklearn_first_call_overhead": first_call_seconds,
            "retrain_wall": retrain_wall,
            "retrain_mean_single": float(np.mean([r[4] for r in refits])),
            "n_jobs": args.n_jobs,
            "threads_main_process": args.threads,
            "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared with other work)",
        },
        "versions": {
            "datatrace": datatrace.__version__,
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "python": platform.python_version(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    m, c, t = result["metrics"], result["config"], result["timing_seconds"]
    print(
        f"from_sklearn vs actual LOO: LogisticRegression(C={c['C']}, solver={c['solver']!r}, tol={c['tol']}) "
        f"on digits, {c['n_train']} train / {c['n_test']} test, {c['n_removed']} removed, {c['n_params']} params"
    )
    print(f"{'metric (per test point, over removed points)':<48}{'mean':>9}{'median':>9}{'min':>9}")
    print(
        f"{'Pearson(estimated, actual change of log-loss)':<48}{m['pearson_mean']:>9.4f}"
        f"{m['pearson_median']:>9.4f}{m['pearson_min']:>9.4f}"
    )
    print(f"{'Spearman':<48}{m['spearman_mean']:>9.4f}{m['spearman_median']:>9.4f}{m['spearman_min']:>9.4f}")
    print(
        f"Pearson over all (test, removed) pairs: {m['pearson_all_pairs']:.5f}; "
        f"test points with Pearson >= 0.99: {100 * m['pearson_fraction_ge_0.99']:.1f}%"
    )
    print(
        f"parameter change, relative error: median {m['params_relative_error_median']:.4f}, "
        f"max {m['params_relative_error_max']:.4f}"
    )
    p = result["refit_precision"]
    print(
        f"refit noise floor: lbfgs vs newton-cholesky LOO changes differ by "
        f"{p['lbfgs_vs_newton_loo_relative_disagreement']:.2e} (relative); estimator convergence ratio "
        f"{p['estimator_convergence_ratio']:.2e}"
    )
    print(
        f"time: sklearn fit {t['sklearn_fit']:.1f}s, from_sklearn fit+score {t['from_sklearn_fit_and_score']:.1f}s, "
        f"{c['n_removed']} refits {t['retrain_wall']:.1f}s wall ({t['retrain_mean_single']:.1f}s each, "
        f"n_jobs={t['n_jobs']})"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
