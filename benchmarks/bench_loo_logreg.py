"""Exact influence vs actual leave-one-out retraining: multinomial logistic regression on sklearn digits.

The core issue's acceptance benchmark. A torch ``nn.Linear`` (float64) is trained with L2 (weight decay 1e-3 on
the mean loss) to a tight minimum by full-batch L-BFGS; ``InfluenceFunction(curvature="exact")`` estimates the
change of every test example's loss when a training example is removed; the same training function, warm-started
from the trained weights, actually retrains without each of ``--n-loo`` random training examples. Reported: mean
Pearson and Spearman over test queries between estimated and actual changes, and wall times, including the ratio
of the influence computation to one forward+backward pass over the training set. ``--curvature`` picks another route
(e.g. ``arnoldi``, rank 200) against the same cached ground truth.

    python benchmarks/bench_loo_logreg.py            # ~1,000 train / 200 test, 100 LOO retrains
    python benchmarks/bench_loo_logreg.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

import datatrace
from datatrace.verification import metrics, retrain
from datatrace.verification.training import fit_full_batch

RESULTS = Path(__file__).parent / "results"


def load(n_train: int, n_test: int, seed: int) -> tuple:
    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(X))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    as_t = lambda a: torch.tensor(a)  # noqa: E731
    return (as_t(X[tr] / 16.0), as_t(y[tr])), (as_t(X[te] / 16.0), as_t(y[te]))


class WarmStart:
    """Picklable training function: L-BFGS on the subset from the trained weights."""

    def __init__(self, model: torch.nn.Module, task: datatrace.Task) -> None:
        self.model, self.task = model, task

    def __call__(self, subset: tuple) -> torch.nn.Module:
        return fit_full_batch(self.model, self.task, subset, max_iter=1000, tolerance_grad=1e-10)


def forward_backward_seconds(
    model: torch.nn.Module, task: datatrace.Task, train: tuple, repeats: int = 5
) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.zero_grad()
        task.loss(model, train).mean().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--n-loo", type=int, default=100, help="training examples actually left out")
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--curvature", default="exact", help="route name, e.g. exact, cg, arnoldi, ekfac")
    parser.add_argument("--quick", action="store_true", help="300 train / 50 test / 10 LOO")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_test, args.n_loo = 300, 50, 10

    torch.manual_seed(args.seed)
    train, test = load(args.n_train, args.n_test, args.seed)
    task = datatrace.ClassificationTask(weight_decay=args.weight_decay)
    start = time.perf_counter()
    model = fit_full_batch(torch.nn.Linear(64, 10).double(), task, train, max_iter=5000, tolerance_grad=1e-11)
    t_train = time.perf_counter() - start

    start = time.perf_counter()
    influence = datatrace.InfluenceFunction(model, task, curvature=args.curvature, progress=False).fit(train)
    scores = influence.score(test)
    t_influence = time.perf_counter() - start
    t_fb = forward_backward_seconds(model, task, train)

    indices = np.random.default_rng(args.seed + 1).choice(args.n_train, size=args.n_loo, replace=False)
    start = time.perf_counter()
    cache = RESULTS / "cache" / f"loo-logreg-{args.n_train}-{args.n_test}-{args.weight_decay}-{args.seed}"
    truth = retrain.leave_one_out(
        WarmStart(model, task),
        train,
        retrain.evaluator(task, test),
        indices,
        n_jobs=args.jobs,
        cache_dir=cache,
    )
    t_retrain = time.perf_counter() - start
    corr = metrics.loo_correlation(scores.values[:, indices].numpy(), truth.changes)

    result = {
        "benchmark": "exact influence vs leave-one-out retraining, multinomial logistic regression, digits",
        "n_train": args.n_train,
        "n_test": args.n_test,
        "n_loo": args.n_loo,
        "curvature_route": args.curvature,
        "weight_decay": args.weight_decay,
        "mean_pearson": float(corr.mean_pearson),
        "mean_spearman": float(corr.mean_spearman),
        "pooled_pearson": float(corr.pooled_pearson),
        "min_pearson": float(np.nanmin(corr.pearson)),
        "seconds_train": t_train,
        "seconds_influence_fit_and_score": t_influence,
        "seconds_forward_backward": t_fb,
        "influence_over_forward_backward": t_influence / t_fb,
        "seconds_retrain_all_loo": t_retrain,
        "curvature": influence.curvature_.info,
        "torch": torch.__version__,
    }
    print(f"{'quantity':<40}{'value':>14}")
    for key in ("mean_pearson", "mean_spearman", "pooled_pearson", "min_pearson"):
        print(f"{key:<40}{result[key]:>14.4f}")
    for key in (
        "seconds_influence_fit_and_score",
        "seconds_forward_backward",
        "influence_over_forward_backward",
    ):
        print(f"{key:<40}{result[key]:>14.3f}")
    print(f"{'seconds_retrain_all_loo':<40}{t_retrain:>14.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.curvature == "exact" else f"_{args.curvature}"
    name = f"loo_logreg{suffix}_quick.json" if args.quick else f"loo_logreg{suffix}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
