"""Which ranking finds mislabelled training data on networks trained the way people train them, measured.

Issue 10, item 5: on an MLP trained with Adam on digits with 10% flipped labels, self-influence found fewer flips
in its top 10% than the plain training loss. This benchmark measures every ranking the library can produce on the
catalogue's realistic models (``benchmarks/realistic.py``: float32, Adam, minibatches of 32, a fixed number of
epochs, weight decay 1e-4 in the task; the CNN with BatchNorm and dropout), so that ``datatrace debug`` ranks by
what works.

Data: scikit-learn's digits (``X / 16``), the stratified split of :func:`datatrace.datasets.flipped_digits` (1,000
train), 10% of the training labels changed to another random class; one flip draw per seed
(``flip_seed=[seed, 1]``), and the model trained from the same seed. Models: ``mlp-small`` (64-32-10),
``mlp-large`` (64-128-10), ``cnn`` (DigitsCNN on ``(n, 1, 8, 8)`` images), and ``mlp-large-long``: the 64-128-10 MLP
trained for 200 epochs instead of 30, long enough to fit many of its flipped labels (memorisation, the regime in which
self-influence is meant to see what the loss no longer does).

Rankings (higher = inspect first), each scored by the share of the flips found in the top 10% and by the area
under the detection curve (:func:`datatrace.verification.metrics.detection_curve`; random: 0.1 and 0.5):

* ``loss``: the training loss ``l_i`` under the trained model;
* ``grad-norm``: ``||g_i||`` (the same order as identity self-influence ``||g_i||^2 / n``);
* ``SI <route>``: self-influence ``s_i = (1/n) g_i^T (H + damping)^{-1} g_i`` with the curvature route ``exact``
  (the Hessian, negative eigenvalues clipped), ``gauss-newton`` (dense GGN), ``ekfac``, ``kfac``, ``identity``,
  and ``projected`` (:class:`datatrace.ProjectedInfluence` with its defaults);
* ``RelSI <route>``: ``s_i / ||g_i||^2``, the "relative" influence of Barshan et al. (2020, AISTATS) that stops
  large-gradient examples from dominating;
* ``loss+SI <route>``: the first-order leave-one-out loss ``l_i + s_i`` (the example's loss under the model
  retrained without it; ``rank_by="loo_loss"`` of :func:`datatrace.apps.debug_data`);
* ``rank(loss)+rank(SI <route>)``: the average of the two ranks; ``loss*SI <route>``: their product.

Each ranking's row also gives its paired difference from the loss (mean over seeds of its share found in the top
10% minus the loss's, and on how many seeds it found more / fewer).

Per-example gradients are computed once per model (one ``InfluenceFunction(curvature="identity")`` fit) and every
route's curvature is fitted on the same functional model and solved against them; the seconds of a route are the
gradient pass plus its curvature fit and solve, i.e. what ``InfluenceFunction(curvature=route)`` plus
``self_influence()`` costs. The dense routes (``exact``, ``gauss-newton``) are skipped on ``mlp-large`` (9,610
parameters: a 0.7 GiB matrix and its eigendecomposition), and the exact Hessian (3,866 ``p``-long Hessian-vector
products over the data) on the CNN, unless ``--dense-large``. Each (model, seed) result is cached under
``benchmarks/results/cache/mislabel-v2/`` (keyed by the problem, the seed, the training size and the routes).

    python benchmarks/bench_mislabel.py               # 5 flip seeds x 4 models (~20 min on 2 shared CPU cores)
    python benchmarks/bench_mislabel.py --quick       # smoke run: 1 seed, 300 train, no dense routes

Writes ``benchmarks/results/mislabel.json`` (``mislabel_quick.json`` with ``--quick``), keeping the rows of models
not run this time. Each run is cached under ``results/cache/mislabel-v2``: delete a model's files there to measure
it again after a change to the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time
from typing import Any

import numpy as np
import torch

import datatrace
import realistic as catalogue
from common import RESULTS_DIR, table, versions, write_json
from datatrace.apps.common import per_example
from datatrace.curvature import make_curvature
from datatrace.datasets import flipped_digits
from datatrace.verification.metrics import detection_curve

FLIP = 0.1
TOP = 0.1
#: the catalogue's problems, and the large MLP trained long enough to memorise
PROBLEMS: dict[str, catalogue.Problem] = {
    **{name: catalogue.CATALOGUE[name] for name in ("mlp-small", "mlp-large", "cnn")},
    "mlp-large-long": dataclasses.replace(
        catalogue.CATALOGUE["mlp-large"],
        name="mlp-large-long",
        recipe=catalogue.Recipe(epochs=200),
        description="digits, MLP 64-128-10 ReLU, Adam 200 epochs, batch 32",
    ),
}
MODELS = tuple(PROBLEMS)
#: dense routes too costly for a shared two-core machine, run only with --dense-large
COSTLY = {
    "mlp-large": ("exact", "gauss-newton"),
    "mlp-large-long": ("exact", "gauss-newton"),
    "cnn": ("exact",),
}
DENSE = ("exact", "gauss-newton")
CACHE = RESULTS_DIR / "cache" / "mislabel-v2"  # per-example values of each run
ROUTES = ("exact", "gauss-newton", "ekfac", "kfac", "identity", "projected")
KFAC = ("ekfac", "kfac")
#: K-FAC covers Linear and Conv layers only: on the CNN its routes score the conv and linear weights (BatchNorm's
#: scale and shift left out, as kronfluence does), with the gradient norms of the same parameters
KFAC_PARAMS = {"cnn": ["features.0", "features.4", "head"]}

logger = logging.getLogger("benchmarks.mislabel")


def data(name: str, seed: int, n_train: int) -> tuple[tuple, tuple, np.ndarray]:
    """Train (labels flipped) and test sets in float32 for catalogue problem ``name``, and the flip mask."""
    d = flipped_digits(seed=0, flip_fraction=FLIP, n_train=n_train, n_test=300, flip_seed=[seed, 1])
    image = PROBLEMS[name].data_kind == "digits-image"

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


def describe(name: str, n_train: int) -> str:
    """The problem in words, with the sizes this benchmark uses (not the catalogue's own split)."""
    p = PROBLEMS[name]
    return (
        f"{name}: {p.description} ({p.num_params():,} parameters, {n_train} train with {FLIP:.0%} of the labels "
        "flipped, 300 test)"
    )


def cached_run(name: str, seed: int, n_train: int, routes: tuple[str, ...]) -> dict[str, Any]:
    """:func:`run_one`, cached as JSON (written atomically) under :data:`CACHE`."""
    path = CACHE / f"{PROBLEMS[name].key()}-seed{seed}-n{n_train}-{'+'.join(routes)}.json"
    if path.exists():
        logger.info("%s seed %d: cached (%s)", name, seed, path.name)
        return json.loads(path.read_text())
    run = run_one(name, seed, n_train, routes)
    write_json(path, run)
    return run


def run_one(name: str, seed: int, n_train: int, routes: tuple[str, ...]) -> dict[str, Any]:
    """Train one model on one flip draw; the per-example values every ranking is built from, and their seconds."""
    problem = PROBLEMS[name]
    train, test, flipped = data(name, seed, n_train)
    t0 = time.perf_counter()
    model = catalogue.Trainer(problem)(train, seed=seed).eval()
    train_seconds = time.perf_counter() - t0
    with torch.no_grad():
        pred = model(train[0]).argmax(-1)
    task = problem.task()
    n = len(train[1])

    t0 = time.perf_counter()
    base = datatrace.InfluenceFunction(model, task, curvature="identity", progress=False).fit(train)
    grads = base.train_grads_
    seconds = {"gradients": time.perf_counter() - t0}
    t0 = time.perf_counter()
    values = {"loss": per_example(base.fitted_model, task.loss, base.training_data, "train")}
    seconds["loss"] = time.perf_counter() - t0
    values["grad_sq"] = (grads * grads).sum(1).numpy()

    layered = None
    if name in KFAC_PARAMS and any(r in KFAC for r in routes):
        t0 = time.perf_counter()
        layered = datatrace.InfluenceFunction(
            model, task, curvature="identity", params=KFAC_PARAMS[name], progress=False
        ).fit(train)
        seconds["layer_gradients"] = time.perf_counter() - t0
    for route in routes:
        t0 = time.perf_counter()
        if route == "projected":
            si = datatrace.ProjectedInfluence(model, task, progress=False).fit(train).self_influence()
            seconds[route] = time.perf_counter() - t0
        else:
            own = layered is not None and route in KFAC
            fit = layered if own else base
            g = fit.train_grads_
            curv = make_curvature(route, "auto").fit(fit.functional_model, fit.training_data, progress=False)
            si = (curv.solve(g) * g).sum(1) / n
            seconds[route] = seconds["layer_gradients" if own else "gradients"] + time.perf_counter() - t0
            if own:
                values[f"grad_sq {route}"] = (g * g).sum(1).numpy()
        values[f"SI {route}"] = si.detach().to(torch.float64).cpu().numpy()
        logger.info("%s seed %d: %s done in %.1f s", name, seed, route, seconds[route])
    return {
        "seed": seed,
        "routes": list(routes),
        "train_seconds": train_seconds,
        "train_accuracy_on_given_labels": float((pred == train[1]).float().mean()),
        "flips_fitted": float((pred[flipped] == train[1][flipped]).float().mean()),
        "test_accuracy": catalogue.accuracy(model, test),
        "num_params": int(grads.shape[1]),
        "flipped": flipped,
        "values": values,
        "seconds": seconds,
    }


def measures(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Every ranking of one run, scored: share of the flips in the top 10%, detection AUC, seconds."""
    v = {k: np.asarray(a, dtype=np.float64) for k, a in run["values"].items()}
    sec = run["seconds"]
    loss = v["loss"]
    out: dict[str, tuple[np.ndarray, float]] = {
        "loss": (loss, sec["loss"]),
        "grad-norm": (np.sqrt(v["grad_sq"]), sec["gradients"]),
    }
    for route in run["routes"]:
        si, t = v[f"SI {route}"], sec[route]
        out[f"SI {route}"] = (si, t)
        if route != "identity":  # identity: s_i / ||g_i||^2 = 1/n for every example
            out[f"RelSI {route}"] = (si / np.maximum(v.get(f"grad_sq {route}", v["grad_sq"]), 1e-300), t)
        out[f"loss+SI {route}"] = (loss + si, t + sec["loss"])
        out[f"rank(loss)+rank(SI {route})"] = (rank01(loss) + rank01(si), t + sec["loss"])
        out[f"loss*SI {route}"] = (loss * np.maximum(si, 0.0), t + sec["loss"])
    flipped = np.asarray(run["flipped"], dtype=bool)
    rows = {}
    for key, (values, seconds) in out.items():
        curve = detection_curve(values, flipped)
        rows[key] = {"top10": float(curve.found_at(TOP)), "auc": float(curve.auc), "seconds": seconds}
    return rows


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over the seeds of every measure, and its paired difference from the loss."""
    scored = [measures(r) for r in runs]
    out = []
    for key in scored[0]:
        top = np.array([m[key]["top10"] for m in scored])
        auc = np.array([m[key]["auc"] for m in scored])
        sec = np.array([m[key]["seconds"] for m in scored])
        diff = top - np.array([m["loss"]["top10"] for m in scored])
        out.append(
            {
                "measure": key,
                "top10_mean": float(top.mean()),
                "top10_std": float(top.std(ddof=1)) if len(top) > 1 else 0.0,
                "top10_minus_loss": float(diff.mean()),
                "seeds_better_than_loss": int((diff > 0).sum()),
                "seeds_worse_than_loss": int((diff < 0).sum()),
                "auc_mean": float(auc.mean()),
                "auc_std": float(auc.std(ddof=1)) if len(auc) > 1 else 0.0,
                "seconds": float(sec.mean()),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 300 train, no dense routes")
    parser.add_argument("--seeds", type=int, default=5, help="flip seeds (default 5)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--dense-large",
        action="store_true",
        help="the costly dense routes too (mlp-large's, the CNN's Hessian)",
    )
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
            if not (args.quick and r in DENSE) and (args.dense_large or r not in COSTLY.get(name, ()))
        )
        runs = [cached_run(name, s, n_train, routes) for s in seeds]
        summary = summarise(runs)
        results[name] = {
            "problem": describe(name, n_train),
            "runs": [{k: v for k, v in r.items() if k not in ("values", "flipped")} for r in runs],
            "summary": summary,
        }
        fits = ", ".join(f"{r['flips_fitted']:.2f}" for r in runs)
        print(f"\n{describe(name, n_train)}")
        print(
            f"flips fitted (model predicts the flipped label): {fits}; test accuracy "
            + ", ".join(f"{r['test_accuracy']:.3f}" for r in runs)
        )
        rows = [
            {
                "measure": s["measure"],
                "top10": f"{s['top10_mean']:.3f} +- {s['top10_std']:.3f}",
                "vs_loss": f"{s['top10_minus_loss']:+.3f} ({s['seeds_better_than_loss']}/{s['seeds_worse_than_loss']})",
                "auc": f"{s['auc_mean']:.3f} +- {s['auc_std']:.3f}",
                "seconds": s["seconds"],
            }
            for s in summary
        ]
        columns = [
            ("measure", "ranking"),
            ("top10", "flips in top 10%"),
            ("vs_loss", "minus loss (seeds +/-)"),
            ("auc", "AUC"),
            ("seconds", "s"),
        ]
        print(table(rows, columns))
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
    if path.exists():  # models not run this time keep their rows (same settings only)
        before = json.loads(path.read_text())
        if (before.get("n_train"), before.get("seeds")) == (n_train, seeds):
            payload["results"] = {**before.get("results", {}), **results}
    write_json(path, payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
