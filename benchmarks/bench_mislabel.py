"""Which ranking finds mislabelled training data on networks trained the way people train them, measured.

Issue 10, item 5: on an MLP trained with Adam on digits with 10% flipped labels, self-influence found fewer flips
in its top 10% than the plain training loss. This benchmark measures every ranking the library can produce on the
catalogue's realistic models (``benchmarks/catalogue.py``: float32, Adam, minibatches of 32, a fixed number of
epochs, weight decay 1e-4 in the task; the CNN with BatchNorm and dropout), so that ``datatrace debug`` ranks by
what works.

Data: scikit-learn's digits (``X / 16``), the stratified split of :func:`datatrace.datasets.flipped_digits` (1,000
train), 10% of the training labels changed to another random class; one flip draw per seed
(``flip_seed=[seed, 1]``), and the model trained from the same seed. Models: ``mlp-small`` (64-32-10),
``mlp-large`` (64-128-10), ``cnn`` (DigitsCNN on ``(n, 1, 8, 8)`` images).

Rankings (higher = inspect first), each scored by the share of the flips found in the top 10% and by the area
under the detection curve (:func:`datatrace.verification.metrics.detection_curve`; random: 0.1 and 0.5):

* ``loss``: the training loss ``l_i`` under the trained model;
* ``grad-norm``: ``||g_i||`` (the same order as identity self-influence ``||g_i||^2 / n``);
* ``SI <route>``: self-influence ``s_i = (1/n) g_i^T (H + damping)^{-1} g_i`` with the curvature route ``exact``
  (the Hessian, negative eigenvalues clipped), ``gauss-newton`` (dense GGN), ``ekfac``, ``kfac``, ``identity``,
  and ``projected`` (:class:`datatrace.ProjectedInfluence` with its defaults);
* ``RelSI <route>``: ``s_i / ||g_i||^2``, the "relative" influence of Barshan et al. (2020, AISTATS) that stops
  large-gradient examples from dominating;
* ``rank(loss)+rank(SI <route>)``: the average of the two ranks; ``loss*SI <route>``: their product.

Per-example gradients are computed once per model (one ``InfluenceFunction(curvature="identity")`` fit) and every
route's curvature is fitted on the same functional model and solved against them; the seconds of a route are the
gradient pass plus its curvature fit and solve, i.e. what ``InfluenceFunction(curvature=route)`` plus
``self_influence()`` costs. The dense routes (``exact``, ``gauss-newton``) are skipped on ``mlp-large`` (9,610
parameters: a 0.7 GiB matrix and its eigendecomposition) unless ``--dense-large``.

    python benchmarks/bench_mislabel.py               # 3 flip seeds x 3 models (~10 min on 2 shared CPU cores)
    python benchmarks/bench_mislabel.py --quick       # smoke run: 1 seed, 300 train, no dense routes

Writes ``benchmarks/results/mislabel.json`` (``mislabel_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from typing import Any

import numpy as np
import torch

import catalogue
import datatrace
from common import RESULTS_DIR, table, versions, write_json
from datatrace.apps.common import per_example
from datatrace.curvature import make_curvature
from datatrace.datasets import flipped_digits
from datatrace.verification.metrics import detection_curve

FLIP = 0.1
TOP = 0.1
MODELS = ("mlp-small", "mlp-large", "cnn")
DENSE = ("exact", "gauss-newton")
ROUTES = ("exact", "gauss-newton", "ekfac", "kfac", "identity", "projected")
KFAC = ("ekfac", "kfac")
#: K-FAC covers Linear and Conv layers only: on the CNN its routes score the conv and linear weights (BatchNorm's
#: scale and shift left out, as kronfluence does), with the gradient norms of the same parameters
KFAC_PARAMS = {"cnn": ["features.0", "features.4", "head"]}

logger = logging.getLogger("benchmarks.mislabel")


def data(name: str, seed: int, n_train: int) -> tuple[tuple, tuple, np.ndarray]:
    """Train (labels flipped) and test sets in float32 for catalogue problem ``name``, and the flip mask."""
    d = flipped_digits(seed=0, flip_fraction=FLIP, n_train=n_train, n_test=300, flip_seed=[seed, 1])
    image = catalogue.CATALOGUE[name].data_kind == "digits-image"

    def pixels(X: np.ndarray) -> torch.Tensor:
        x = torch.tensor(X, dtype=torch.float32)
        return x.reshape(-1, 1, 8, 8) if image else x

    train = (pixels(d.X_train), torch.from_numpy(d.y_train))
    test = (pixels(d.X_test), torch.from_numpy(d.y_test))
    return train, test, d.flipped


def rank01(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties by index, as the detection curve breaks them)."""
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values)) / max(len(values) - 1, 1)
    return out


def run_one(name: str, seed: int, n_train: int, routes: tuple[str, ...]) -> dict[str, Any]:
    """Train one model on one flip draw and score every ranking."""
    problem = catalogue.CATALOGUE[name]
    train, test, flipped = data(name, seed, n_train)
    t0 = time.perf_counter()
    model = catalogue.Trainer(problem)(train, seed=seed).eval()
    train_seconds = time.perf_counter() - t0
    with torch.no_grad():
        pred = model(train[0]).argmax(-1)
    fitted_flips = float((pred[flipped] == train[1][flipped]).float().mean())
    task = problem.task()
    n = len(train[1])

    t0 = time.perf_counter()
    base = datatrace.InfluenceFunction(model, task, curvature="identity", progress=False).fit(train)
    grads = base.train_grads_
    grad_seconds = time.perf_counter() - t0
    sq = (grads * grads).sum(1)
    t0 = time.perf_counter()
    loss = per_example(base.fitted_model, task.loss, base.training_data, "train")
    loss_seconds = time.perf_counter() - t0

    layered = None
    if name in KFAC_PARAMS and any(r in KFAC for r in routes):
        t0 = time.perf_counter()
        layered = datatrace.InfluenceFunction(
            model, task, curvature="identity", params=KFAC_PARAMS[name], progress=False
        ).fit(train)
        layered_seconds = time.perf_counter() - t0

    measures: dict[str, tuple[np.ndarray, float]] = {
        "loss": (loss, loss_seconds),
        "grad-norm": (sq.sqrt().numpy(), grad_seconds),
    }
    for route in routes:
        t0 = time.perf_counter()
        if route == "projected":
            si = datatrace.ProjectedInfluence(model, task, progress=False).fit(train).self_influence()
            seconds = time.perf_counter() - t0
        else:
            fit, g, g_seconds = (
                (layered, layered.train_grads_, layered_seconds)
                if (layered is not None and route in KFAC)
                else (base, grads, grad_seconds)
            )
            curv = make_curvature(route, "auto").fit(fit.functional_model, fit.training_data, progress=False)
            si = (curv.solve(g) * g).sum(1) / n
            seconds = g_seconds + time.perf_counter() - t0
        si = si.detach().to(torch.float64).cpu().numpy()
        measures[f"SI {route}"] = (si, seconds)
        if route != "identity":  # identity: s_i / ||g_i||^2 = 1/n for every example
            g2 = (g * g).sum(1).numpy() if route in KFAC and layered is not None else sq.numpy()
            measures[f"RelSI {route}"] = (si / np.maximum(g2, 1e-300), seconds)
        measures[f"rank(loss)+rank(SI {route})"] = (rank01(loss) + rank01(si), seconds + loss_seconds)
        measures[f"loss*SI {route}"] = (loss * np.maximum(si, 0.0), seconds + loss_seconds)
        logger.info("%s seed %d: %s done in %.1f s", name, seed, route, seconds)

    rows = {}
    for key, (values, seconds) in measures.items():
        curve = detection_curve(values, flipped)
        rows[key] = {"top10": float(curve.found_at(TOP)), "auc": float(curve.auc), "seconds": seconds}
    return {
        "seed": seed,
        "train_seconds": train_seconds,
        "train_accuracy_on_given_labels": float((pred == train[1]).float().mean()),
        "flips_fitted": fitted_flips,
        "test_accuracy": catalogue.accuracy(model, test),
        "num_params": int(grads.shape[1]),
        "measures": rows,
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over the seeds of every measure."""
    out = []
    for key in runs[0]["measures"]:
        top = np.array([r["measures"][key]["top10"] for r in runs])
        auc = np.array([r["measures"][key]["auc"] for r in runs])
        sec = np.array([r["measures"][key]["seconds"] for r in runs])
        out.append(
            {
                "measure": key,
                "top10_mean": float(top.mean()),
                "top10_std": float(top.std(ddof=1)) if len(top) > 1 else 0.0,
                "auc_mean": float(auc.mean()),
                "auc_std": float(auc.std(ddof=1)) if len(auc) > 1 else 0.0,
                "seconds": float(sec.mean()),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 300 train, no dense routes")
    parser.add_argument("--seeds", type=int, default=3, help="flip seeds (default 3)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--dense-large", action="store_true", help="exact / gauss-newton on mlp-large too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("datatrace").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    n_train = 300 if args.quick else 1000
    seeds = [0] if args.quick else list(range(args.seeds))
    results: dict[str, Any] = {}
    for name in args.models:
        routes = tuple(
            r
            for r in ROUTES
            if r not in DENSE or (not args.quick and (name != "mlp-large" or args.dense_large))
        )
        runs = [run_one(name, s, n_train, routes) for s in seeds]
        summary = summarise(runs)
        results[name] = {"problem": catalogue.CATALOGUE[name].summary(), "runs": runs, "summary": summary}
        fits = ", ".join(f"{r['flips_fitted']:.2f}" for r in runs)
        print(f"\n{catalogue.CATALOGUE[name].summary()}")
        print(
            f"flips fitted (model predicts the flipped label): {fits}; test accuracy "
            + ", ".join(f"{r['test_accuracy']:.3f}" for r in runs)
        )
        rows = [
            {
                "measure": s["measure"],
                "top10": f"{s['top10_mean']:.3f} +- {s['top10_std']:.3f}",
                "auc": f"{s['auc_mean']:.3f} +- {s['auc_std']:.3f}",
                "seconds": s["seconds"],
            }
            for s in summary
        ]
        print(
            table(
                rows,
                [("measure", "ranking"), ("top10", "flips in top 10%"), ("auc", "AUC"), ("seconds", "s")],
            )
        )
    payload = {
        "benchmark": "bench_mislabel",
        "quick": args.quick,
        "n_train": n_train,
        "flip_fraction": FLIP,
        "seeds": seeds,
        "top_fraction": TOP,
        "results": results,
        "platform": {"python": platform.python_version(), "threads": torch.get_num_threads()},
        "versions": versions(["torch", "numpy", "scikit-learn"]),
    }
    path = RESULTS_DIR / ("mislabel_quick.json" if args.quick else "mislabel.json")
    write_json(path, payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
