"""Finding mislabelled and harmful training data with influence (datatrace.apps.debug), measured.

The acceptance benchmark of the data-debugging application. Three parts, every number measured in this run:

(a) **Flipped labels on digits, with a network that fits them.** scikit-learn's 8x8 digits (X / 16), a
    stratified split of 1,000 training / 300 validation / 300 test images (``datatrace.datasets.flipped_digits``),
    10% of the *training* labels changed to another random class. A 64-128-10 tanh MLP (9,610 parameters, float64,
    weight decay 1e-4) is trained by full-batch L-BFGS (``datatrace.verification.training.fit_full_batch``) until it fits
    every training label, flipped ones included (checked and reported). Training examples are ranked by
    self-influence (the estimated rise of an example's own loss if it were removed and the model retrained) with
    several curvature routes, and compared with ranking by training loss and with random inspection: the
    fraction of the flipped labels found in the top 5 / 10 / 20% of each ranking. The exact Hessian
    (9,610^2 float64 = 0.7 GiB, an eigendecomposition of that size) is too slow for two shared CPU cores, so the
    curvature routes are EK-FAC and K-FAC (Kronecker-factored Gauss-Newton), the exact Hessian of the last layer
    only, Arnoldi (top-200 eigenpairs of the full Hessian; only with ``--all-routes``) and the identity (plain
    gradient norms: a baseline, not in leave-one-out units). Multinomial logistic regression (exact Hessian) on
    the same data is the convex reference. Target: >= 80% of the flips in the top 10% by self-influence.
(b) **A high-dimensional sparse problem** (more features than examples): synthetic bag-of-words documents (a
    Zipf background over 2,000 words, 20 informative words per class, about 45 tokens per document, features
    ``log(1 + count)``), 500 training / 500 validation documents, 10% of the training labels flipped, binary
    logistic regression (``nn.Linear(2000, 1)``, exact Hessian) at three L2 strengths: from one that cannot fit
    the flips to one that fits all of them (through rare words, which is where ranking by loss fails).
(c) **Removal check**: retrain without the ``k`` training examples ranked most harmful by their influence on the
    total validation loss (``debug_data(..., validation=...)``) and, for comparison, without ``k`` random examples
    (3 draws), for the logistic regression and the MLP of (a); validation *and* held-out test accuracy before and
    after (the validation set chose what to remove, so only the test set measures generalisation).

    python benchmarks/bench_debug.py                 # ~5 min on 2 CPU cores (the MLP is cached after one run)
    python benchmarks/bench_debug.py --quick         # a smoke run (fewer routes, no MLP removal check)
    python benchmarks/bench_debug.py --all-routes    # also Arnoldi on the MLP (about a minute more)

Writes ``benchmarks/results/debug.json`` (``debug_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import datatrace
from datatrace.apps import debug_data, detection_summary, removal_check
from datatrace.datasets import flipped_digits
from datatrace.verification.training import fit_full_batch

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS / "cache"
FRACTIONS = (0.05, 0.1, 0.2)
SEED = 0
FLIP = 0.1


# --------------------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------------------
def digits() -> dict[str, Any]:
    """1,000 train (10% flipped) / 300 validation / 300 test, stratified, seeded."""
    d = flipped_digits(seed=SEED, flip_fraction=FLIP, n_train=1000, n_test=600)
    rng = np.random.default_rng([SEED, 2])
    order = rng.permutation(600)
    val, test = order[:300], order[300:]
    t = torch.from_numpy
    return {
        "train": (t(d.X_train), t(d.y_train)),
        "flipped": d.flipped,
        "val": (t(d.X_test[val]), t(d.y_test[val])),
        "test": (t(d.X_test[test]), t(d.y_test[test])),
    }


def build(kind: str) -> tuple[nn.Module, datatrace.ClassificationTask, dict[str, Any]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if kind == "mlp":
            model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)).double()
            settings = {"weight_decay": 1e-4, "max_iter": 3000, "tolerance_grad": 1e-9}
        else:
            model = nn.Linear(64, 10).double()
            settings = {"weight_decay": 1e-3, "max_iter": 2000, "tolerance_grad": 1e-10}
    return model, datatrace.ClassificationTask(weight_decay=settings["weight_decay"]), settings


def trained(
    kind: str, train: tuple, use_cache: bool
) -> tuple[nn.Module, datatrace.ClassificationTask, float]:
    """The model trained on all training data (cached under results/cache, keyed by every setting)."""
    model, task, settings = build(kind)
    key = hashlib.sha256(
        json.dumps({"kind": kind, "seed": SEED, "flip": FLIP, **settings}, sort_keys=True).encode()
        + train[0].numpy().tobytes()
        + train[1].numpy().tobytes()
    ).hexdigest()[:10]
    path = CACHE / f"debug-{kind}-{key}" / "model.pt"
    if use_cache and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), task, 0.0
    start = time.perf_counter()
    model = fit_full_batch(
        model, task, train, max_iter=settings["max_iter"], tolerance_grad=settings["tolerance_grad"]
    )
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval(), task, seconds


def accuracy(model: nn.Module, data: tuple) -> float:
    with torch.no_grad():
        out = model.eval()(data[0])
    pred = (out.reshape(-1) > 0).long() if out.dim() == 1 or out.shape[1] == 1 else out.argmax(1)
    return float((pred == data[1]).double().mean())


def grad_max(model: nn.Module, task: datatrace.Task, data: tuple) -> float:
    from datatrace.verification.training import objective

    params = [p for p in model.parameters()]
    value = objective(model, task, [data], len(data[1]))
    return max(float(g.abs().max()) for g in torch.autograd.grad(value, params))


class WarmStart:
    """train_fn for removal checks: L-BFGS from the trained weights (the nearby minimum)."""

    def __init__(self, model: nn.Module, task: datatrace.Task, max_iter: int, tol: float) -> None:
        self.model, self.task, self.max_iter, self.tol = model, task, max_iter, tol

    def __call__(self, data: tuple) -> nn.Module:
        return fit_full_batch(self.model, self.task, data, max_iter=self.max_iter, tolerance_grad=self.tol)


class Accuracies:
    """evaluate_metric: validation accuracy (returned) and test accuracy (recorded)."""

    def __init__(self, val: tuple, test: tuple) -> None:
        self.val, self.test = val, test
        self.test_log: list[float] = []
        self.__name__ = "validation accuracy"

    def __call__(self, model: nn.Module) -> float:
        self.test_log.append(accuracy(model, self.test))
        return accuracy(model, self.val)


# --------------------------------------------------------------------------------------------------------------
# Curvature routes
# --------------------------------------------------------------------------------------------------------------
def routes(kind: str, quick: bool, all_routes: bool) -> list[tuple[str, dict[str, Any], str]]:
    """(name, InfluenceFunction kwargs, description)."""
    if kind == "logreg":
        return [("exact", {"curvature": "exact"}, "exact Hessian (convex)")]
    out: list[tuple[str, dict[str, Any], str]] = []
    try:
        from datatrace.curvature.kfac import EKFAC, KFAC

        out.append(
            ("ekfac", {"curvature": EKFAC()}, "EK-FAC (Kronecker-factored Gauss-Newton, refit eigenvalues)")
        )
        if not quick:
            out.append(("kfac", {"curvature": KFAC()}, "K-FAC (Kronecker-factored Gauss-Newton)"))
    except ImportError as err:  # the K-FAC module is optional in older trees
        logging.getLogger("bench_debug").warning("K-FAC routes unavailable: %s", err)
    if not quick:
        out.append(
            (
                "last-layer exact",
                {"curvature": "exact", "params": "2"},
                "exact Hessian of the output layer only",
            )
        )
    if all_routes:
        out.append(("arnoldi", {"curvature": "arnoldi"}, "top-200 eigenpairs of the full Hessian (Arnoldi)"))
    out.append(("identity", {"curvature": "identity"}, "gradient norms (H = I; a baseline, not LOO units)"))
    return out


def summarise(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {"auc": r["auc"], **{f"top_{int(f * 100)}pct": r["found_at"][str(f)] for f in FRACTIONS}}
        for name, r in summary["rankings"].items()
    }


# --------------------------------------------------------------------------------------------------------------
# (a) digits
# --------------------------------------------------------------------------------------------------------------
def part_a(data: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    out: dict[str, Any] = {}
    fitted: dict[str, Any] = {}
    for kind in ("logreg", "mlp"):
        model, task, train_seconds = trained(kind, data["train"], not args.no_cache)
        X, y = data["train"]
        with torch.no_grad():
            pred = model(X).argmax(1)
        flipped = torch.from_numpy(data["flipped"])
        info = {
            "num_params": sum(p.numel() for p in model.parameters()),
            "weight_decay": task.weight_decay,
            "train_seconds": train_seconds or None,
            "max_abs_grad": grad_max(model, task, data["train"]),
            "train_accuracy": float((pred == y).double().mean()),
            "flipped_labels_fitted": float((pred[flipped] == y[flipped]).double().mean()),
            "val_accuracy": accuracy(model, data["val"]),
            "test_accuracy": accuracy(model, data["test"]),
            "routes": {},
        }
        print(
            f"\n(a) {kind}: {info['num_params']} parameters, train acc {info['train_accuracy']:.3f}, flipped labels "
            f"fitted {info['flipped_labels_fitted']:.2f}, test acc {info['test_accuracy']:.3f}, max|grad L| "
            f"{info['max_abs_grad']:.2g}"
            + (f", trained in {train_seconds:.0f} s" if train_seconds else " (cached)")
        )
        print(f"    fraction of the {int(flipped.sum())} flipped labels found in the top 5 / 10 / 20% (AUC):")
        printed_baselines = False
        for name, kwargs, words in routes(kind, args.quick, args.all_routes):
            start = time.perf_counter()
            inf = datatrace.InfluenceFunction(model, task, progress=False, **kwargs).fit(data["train"])
            result = debug_data(inf, validation=data["val"])
            seconds = time.perf_counter() - start
            table = summarise(detection_summary(result, data["flipped"], FRACTIONS))
            info["routes"][name] = {
                "description": words,
                "seconds": seconds,
                "self_influence": table["self_influence"],
                "validation_harm": table["validation_harm"],
            }
            if not printed_baselines:
                info["training_loss"] = table["training_loss"]
                info["random"] = table["random"]
            rows = [("self-influence, " + name, table["self_influence"], f"{seconds:.1f} s")]
            if not printed_baselines:
                rows += [("training loss", table["training_loss"], ""), ("random", table["random"], "")]
                printed_baselines = True
            rows.append(("validation harm, " + name, table["validation_harm"], ""))
            for label, r, extra in rows:
                print(
                    f"    {label:<34} {r['top_5pct']:.2f} / {r['top_10pct']:.2f} / {r['top_20pct']:.2f}  "
                    f"(AUC {r['auc']:.3f}) {extra}"
                )
            if name in ("exact", "ekfac"):
                fitted[kind] = (model, task, result)
            elif kind not in fitted:
                fitted[kind] = (model, task, result)
        out[kind] = info
    best = max(r["self_influence"]["top_10pct"] for r in out["mlp"]["routes"].values() if r)
    main = out["mlp"]["routes"].get("ekfac", next(iter(out["mlp"]["routes"].values())))
    out["acceptance"] = {
        "target": ">= 0.80 of the flipped labels in the top 10% by self-influence (MLP that fits them)",
        "mlp_main_route": "ekfac" if "ekfac" in out["mlp"]["routes"] else next(iter(out["mlp"]["routes"])),
        "mlp_main_route_top_10pct": main["self_influence"]["top_10pct"],
        "mlp_best_route_top_10pct": best,
        "met": bool(main["self_influence"]["top_10pct"] >= 0.8),
    }
    print(
        f"    acceptance: {out['acceptance']['mlp_main_route']} finds "
        f"{out['acceptance']['mlp_main_route_top_10pct']:.0%} of the flips in the top 10% "
        f"({'met' if out['acceptance']['met'] else 'NOT met'}; target 80%)"
    )
    return out, fitted


# --------------------------------------------------------------------------------------------------------------
# (b) sparse bag of words
# --------------------------------------------------------------------------------------------------------------
def bag_of_words(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    vocab, n_train, n_val, mean_len, n_informative, boost = 2000, 500, 500, 40, 20, 8.0
    background = 1.0 / np.arange(1, vocab + 1) ** 1.1
    background = background[rng.permutation(vocab)]
    background /= background.sum()
    mid_frequency = np.argsort(-background)[50:300]
    informative = rng.choice(mid_frequency, size=2 * n_informative, replace=False).reshape(2, n_informative)

    def documents(m: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, size=m)
        X = np.zeros((m, vocab))
        for j in range(m):
            p = background.copy()
            p[informative[y[j]]] *= boost
            X[j] = rng.multinomial(rng.poisson(mean_len) + 5, p / p.sum())
        return np.log1p(X), y

    X, y_true = documents(n_train)
    X_val, y_val = documents(n_val)
    flip = rng.choice(n_train, size=n_train // 10, replace=False)
    y = y_true.copy()
    y[flip] = 1 - y[flip]
    flipped = np.zeros(n_train, dtype=bool)
    flipped[flip] = True
    t = torch.from_numpy
    return {
        "train": (t(X), t(y)),
        "val": (t(X_val), t(y_val)),
        "flipped": flipped,
        "vocab": vocab,
        "nonzero_per_doc": float((X > 0).sum(1).mean()),
        "tokens_per_doc": float(np.expm1(X).sum(1).mean()),
    }


def part_b(args: argparse.Namespace) -> dict[str, Any]:
    data = bag_of_words()
    n = len(data["train"][1])
    print(
        f"\n(b) bag of words: {n} training documents, {data['vocab']} words (features > examples), "
        f"{data['nonzero_per_doc']:.0f} distinct words / {data['tokens_per_doc']:.0f} tokens per document, "
        f"{int(data['flipped'].sum())} flipped labels; binary logistic regression, exact Hessian"
    )
    print("    fraction of flips found in the top 5 / 10 / 20% (AUC):")
    out: dict[str, Any] = {
        "n_train": n,
        "vocab": data["vocab"],
        "nonzero_per_doc": data["nonzero_per_doc"],
        "runs": [],
    }
    flipped = torch.from_numpy(data["flipped"])
    for wd in (1e-2,) if args.quick else (1e-2, 1e-3, 1e-4):
        task = datatrace.ClassificationTask(weight_decay=wd)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = nn.Linear(data["vocab"], 1).double()
        start = time.perf_counter()
        model = fit_full_batch(model, task, data["train"], max_iter=2000, tolerance_grad=1e-10)
        train_seconds = time.perf_counter() - start
        with torch.no_grad():
            pred = (model(data["train"][0]).reshape(-1) > 0).long()
        correct = pred == data["train"][1]
        start = time.perf_counter()
        inf = datatrace.InfluenceFunction(model, task, progress=False).fit(data["train"])
        result = debug_data(inf, validation=data["val"])
        seconds = time.perf_counter() - start
        table = summarise(detection_summary(result, data["flipped"], FRACTIONS))
        run = {
            "weight_decay": wd,
            "train_seconds": train_seconds,
            "influence_seconds": seconds,
            "train_accuracy": float(correct.double().mean()),
            "flipped_labels_fitted": float(correct[flipped].double().mean()),
            "val_accuracy": accuracy(model, data["val"]),
            **table,
        }
        out["runs"].append(run)
        print(
            f"    weight decay {wd:g}: flips fitted {run['flipped_labels_fitted']:.2f}, val acc "
            f"{run['val_accuracy']:.3f}, influence {seconds:.1f} s"
        )
        for label, key in (
            ("self-influence", "self_influence"),
            ("training loss", "training_loss"),
            ("validation harm", "validation_harm"),
            ("random", "random"),
        ):
            r = table[key]
            print(
                f"      {label:<18} {r['top_5pct']:.2f} / {r['top_10pct']:.2f} / {r['top_20pct']:.2f}  "
                f"(AUC {r['auc']:.3f})"
            )
    return out


# --------------------------------------------------------------------------------------------------------------
# (c) removal check
# --------------------------------------------------------------------------------------------------------------
def part_c(data: dict[str, Any], fitted: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kinds = ("logreg",) if args.quick else ("logreg", "mlp")
    print(
        "\n(c) removal check: retrain without the k most harmful (by validation influence) vs k random (3 draws)"
    )
    for kind in kinds:
        model, task, result = fitted[kind]
        _, _, settings = build(kind)
        # warm starts from the trained weights; the MLP gets 1,000 L-BFGS iterations per retrain (the same for the
        # harmful and the random removals), which keeps the check to a few minutes on two shared cores
        budget = min(settings["max_iter"], 1000)
        train_fn = WarmStart(model, task, budget, settings["tolerance_grad"])
        out[kind] = []
        for k in (50, 100):
            metric = Accuracies(data["val"], data["test"])
            start = time.perf_counter()
            check = removal_check(
                train_fn,
                data["train"],
                metric,
                result.harmful_order,
                k=k,
                n_random=3,
                random_state=SEED,
                metric_before=accuracy(model, data["val"]),
            )
            seconds = time.perf_counter() - start
            test_before = accuracy(model, data["test"])
            test_harmful, test_random = metric.test_log[0], metric.test_log[1:]
            flips_removed = int(data["flipped"][check.removed].sum())
            row = {
                "k": k,
                "flipped_among_removed": flips_removed,
                "val_before": check.metric_before,
                "val_after_harmful": check.metric_after_harmful,
                "val_after_random": check.metric_after_random,
                "test_before": test_before,
                "test_after_harmful": test_harmful,
                "test_after_random": test_random,
                "predicted_val_loss_change": float(result.validation_influence[check.removed].sum()),
                "retrain_max_iter": budget,
                "seconds": seconds,
            }
            out[kind].append(row)
            print(
                f"    {kind:<6} k={k:<3} ({flips_removed} of them flipped): validation acc {check.metric_before:.3f} -> "
                f"{check.metric_after_harmful:.3f} (random: {np.mean(check.metric_after_random):.3f} "
                f"[{min(check.metric_after_random):.3f}, {max(check.metric_after_random):.3f}]); test acc "
                f"{test_before:.3f} -> {test_harmful:.3f} (random: {np.mean(test_random):.3f}); {seconds:.0f} s"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--all-routes", action="store_true", help="also Arnoldi on the MLP")
    parser.add_argument("--no-cache", action="store_true", help="retrain the base models")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("datatrace.verification.training").setLevel(
        logging.ERROR
    )  # convergence is measured and reported
    start = time.perf_counter()
    data = digits()
    print(
        "Sign convention: score[q, i] ~ f_q(theta without i) - f_q(theta_hat); self-influence = estimated rise of "
        "example i's own loss if removed; validation influence = estimated change of the TOTAL validation loss "
        "if removed (negative = harmful)."
    )
    a, fitted = part_a(data, args)
    b = part_b(args)
    c = part_c(data, fitted, args)
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f} s")
    payload = {
        "benchmark": "bench_debug",
        "description": __doc__,
        "quick": args.quick,
        "digits": a,
        "bag_of_words": b,
        "removal_check": c,
        "total_seconds": total,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "datatrace": datatrace.__version__,
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("debug_quick.json" if args.quick else "debug.json")
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
