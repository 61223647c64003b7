"""Every route of datatrace, and its peers, on the realistic-model catalogue (``realistic.py``), against retraining.

For each catalogue problem (float32 models trained by Adam on minibatches for a fixed budget, none at a minimum)
and each method: the linear datamodeling score (LDS, Park et al. 2023) against ``--n-subsets`` random half subsets
retrained from scratch with ``--n-seeds`` seeds (cached; the split-half noise ceiling beside it), the wall time of
fit + scoring every query against every training example (in a fresh process, after the imports), the pooled
Pearson r and least-squares slope on the dense Gauss-Newton route's scores where that route ran (are the scores in
leave-one-out units?), and the share of queries with a score below minus the query's own loss (impossible for a
removal: a loss cannot go below zero).

Usage::

    python benchmarks/bench_catalogue.py                          # everything
    python benchmarks/bench_catalogue.py --problems mlp-small,cnn --methods "gauss-newton*,ekfac,kronfluence-*"
    python benchmarks/bench_catalogue.py --list                   # methods and problems
    python benchmarks/bench_catalogue.py --markdown-from benchmarks/results/catalogue.json

Scores are cached per (problem, method, datatrace version) under ``results/cache/<problem>/scores`` with
``--reuse``; the JSON ``results/catalogue.json`` is rewritten with every row of the run merged into what it held.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import datatrace
import realistic as catalogue
from datatrace.verification import metrics

RESULTS = Path(__file__).resolve().parent / "results"


Method = common.Method


METHODS = [
    Method("auto", "influence", {"curvature": "auto"}, "the default"),
    Method("exact", "influence", {"curvature": "exact"}, "Hessian, damping auto", max_params=3000),
    Method("gauss-newton", "influence", {"curvature": "gauss-newton"}, "damping auto", max_params=5000),
    Method("gauss-newton-1e-3", "influence", {"curvature": "gauss-newton", "damping": 1e-3}, max_params=3000),
    Method("arnoldi-gn-100", "influence", {"curvature": "arnoldi", "matrix": "gauss-newton", "rank": 100},
           max_params=10000),
    Method("cg-gn", "influence", {"curvature": "cg", "matrix": "gauss-newton"}, max_params=3000),
    Method("ekfac", "influence", {"curvature": "ekfac"}),
    Method("kfac", "influence", {"curvature": "kfac"}),
    Method("diagonal", "influence", {"curvature": "diagonal"}),
    Method("identity", "influence", {"curvature": "identity"}, "gradient dot product"),
    Method("projected", "projected", {}, "ProjectedInfluence defaults"),
    Method("trak-4", "trak", {"members": 4}, "4 models trained with other seeds"),
    Method("kronfluence-ekfac-default", "kronfluence", {"strategy": "ekfac", "damping": 1e-8}, "shipped"),
    Method("kronfluence-ekfac-heuristic", "kronfluence", {"strategy": "ekfac", "damping": None}),
    Method("kronfluence-ekfac", "kronfluence", {"strategy": "ekfac", "damping": "wd"}),
    Method("pydvl-ekfac", "pydvl", {"target": "ekfac", "hessian_regularization": "wd", "update_diagonal": True}),
]  # fmt: skip


# ==============================================================================================================
# Runners: each returns (n_query, n_train) scores in datatrace units and sign
# ==============================================================================================================
def run_influence(method: Method, ctx: dict[str, Any]) -> dict[str, Any]:
    options = dict(method.options)
    curvature = options.pop("curvature")
    params = options.pop("params", None)
    damping = options.pop("damping", "auto")
    if options:
        curvature = datatrace.curvature.make_curvature(curvature, damping=damping, **options)
        damping = "auto"
    influence = datatrace.InfluenceFunction(
        ctx["model"], ctx["task"], curvature=curvature, damping=damping, params=params, progress=False
    )
    return {**_fit_and_score(influence, ctx), "info": influence.curvature_.info}


def _fit_and_score(attributor: Any, ctx: dict[str, Any]) -> dict[str, Any]:
    """Fit ``attributor`` on the training data (timed) and score the test set."""
    start = time.perf_counter()
    attributor.fit(ctx["train"])
    fit = time.perf_counter() - start
    scores = attributor.score(ctx["test"])
    return {"scores": scores.values, "fit_seconds": fit, "meta": scores.metadata}


def run_projected(method: Method, ctx: dict[str, Any]) -> dict[str, Any]:
    options = dict(method.options)
    if options.get("projector") == "factorized":
        options["projector"] = datatrace.FactorizedProjector()
    attributor = datatrace.ProjectedInfluence(ctx["model"], ctx["task"], progress=False, **options)
    return _fit_and_score(attributor, ctx)


def run_trak(method: Method, ctx: dict[str, Any]) -> dict[str, Any]:
    problem = ctx["problem"]
    models = [ctx["model"]] + [
        catalogue.trained(problem, seed=s) for s in range(1, method.options["members"])
    ]
    attributor = datatrace.TRAK(models, ctx["task"], progress=False)
    return {**_fit_and_score(attributor, ctx), "note": "time excludes training the extra models"}


def _peer_ctx(ctx: dict[str, Any]) -> dict[str, Any]:
    """bench_curvature's peer runners read model/train/test/weight_decay/workdir from the context."""
    return {**ctx, "weight_decay": ctx["problem"].recipe.weight_decay}


def run_kronfluence(method: Method, ctx: dict[str, Any]) -> dict[str, Any]:
    import bench_curvature

    peer = bench_curvature.Method(method.label, "kronfluence", method.options["strategy"],
                                  {"damping": method.options["damping"]})  # fmt: skip
    out = bench_curvature.run_kronfluence(peer, _peer_ctx(ctx))
    return {
        "scores": out["raw"] / len(ctx["train"][0]),
        "fit_seconds": out["fit_seconds"],
        "settings": out["settings"],
    }


def run_pydvl(method: Method, ctx: dict[str, Any]) -> dict[str, Any]:
    import bench_curvature

    options = dict(method.options)
    peer = bench_curvature.Method(method.label, "pydvl", options.pop("target"), options)
    # pyDVL's EK-FAC allocates its factors in the default dtype (float64 in its runner): give it a float64 copy
    ctx = {**ctx, "model": copy.deepcopy(ctx["model"]).double()}
    ctx["train"] = tuple(t.double() if t.is_floating_point() else t for t in ctx["train"])
    ctx["test"] = tuple(t.double() if t.is_floating_point() else t for t in ctx["test"])
    out = bench_curvature.run_pydvl(peer, _peer_ctx(ctx))
    return {
        "scores": out["raw"] / len(ctx["train"][0]),
        "fit_seconds": out["fit_seconds"],
        "settings": out["settings"],
    }


RUNNERS = {
    "influence": run_influence,
    "projected": run_projected,
    "trak": run_trak,
    "kronfluence": run_kronfluence,
    "pydvl": run_pydvl,
}


# ==============================================================================================================
# One method on one problem, in this process
# ==============================================================================================================
def load_context(problem: catalogue.Problem, workdir: str) -> dict[str, Any]:
    train, test = problem.data()
    model = catalogue.trained(problem)
    for p in model.parameters():
        p.requires_grad_(True)
    return {"problem": problem, "train": train, "test": test, "model": model, "task": problem.task(),
            "workdir": workdir}  # fmt: skip


def worker(problem_name: str, label: str, out_path: str, threads: int) -> None:
    torch.set_num_threads(threads)
    method = next(m for m in METHODS if m.label == label)
    problem = catalogue.problem(problem_name)
    result: dict[str, Any] = {"status": "ok"}
    with tempfile.TemporaryDirectory() as workdir:
        try:
            ctx = load_context(problem, workdir)
            fb = common.forward_backward_seconds(ctx["model"], ctx["task"], ctx["train"])
            start = time.perf_counter()
            out = RUNNERS[method.kind](method, ctx)
            seconds = time.perf_counter() - start
            scores = torch.as_tensor(out.pop("scores")).detach().to(torch.float64).numpy()
            if scores.shape != (problem.n_test, problem.n_train):
                raise ValueError(
                    f"scores have shape {scores.shape}, expected {(problem.n_test, problem.n_train)}"
                )
            np.save(out_path + ".npy", scores)
            result.update(
                seconds=seconds, fwd_bwd_seconds=fb, **{k: v for k, v in out.items() if k != "meta"}
            )
            meta = out.get("meta") or {}
            result["route"] = meta.get("curvature_info", {}).get("auto_choice") or meta.get("curvature")
            result["units"] = meta.get("units")
        except Exception as error:  # reported, never a crash of the whole run
            unavailable = type(error).__name__ == "Unavailable"
            result = {"status": "not available" if unavailable else "failed",
                      "reason": f"{type(error).__name__}: {error}"[:600],
                      "trace": "" if unavailable else traceback.format_exc()[-2000:]}  # fmt: skip
    Path(out_path + ".json").write_text(json.dumps(common.to_jsonable(result), default=str))


def run_in_subprocess(
    problem: catalogue.Problem, method: Method, timeout: float, threads: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            problem.name,
            method.label,
            out,
            "--threads",
            str(threads),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "reason": f"more than {timeout:.0f} s"}
        if not os.path.exists(out + ".json"):
            return {"status": "failed", "reason": (proc.stderr or proc.stdout)[-1500:]}
        result = json.loads(Path(out + ".json").read_text())
        if result["status"] == "ok":
            result["scores"] = np.load(out + ".npy")
        return result


# ==============================================================================================================
# Metrics
# ==============================================================================================================
def evaluate(scores: np.ndarray, truth: Any, base_losses: np.ndarray, reference: np.ndarray | None) -> dict:
    out: dict[str, Any] = {}
    if not np.isfinite(scores).all():
        return {"status": "non-finite"}
    result = metrics.lds(scores, truth.masks, truth.outputs)
    out["lds"] = float(result.mean)
    below = (scores < -base_losses[:, None] - 1e-6).any(axis=1)
    out["below_minus_loss"] = float(below.mean())
    if reference is not None:
        x, y = reference.ravel(), scores.ravel()
        out["r_vs_gn"] = float(np.corrcoef(x, y)[0, 1])
        out["slope_vs_gn"] = float((x @ y) / (x @ x))
    return out


def base_losses(problem: catalogue.Problem) -> np.ndarray:
    model = catalogue.trained(problem)
    _, test = problem.data()
    from datatrace.verification import retrain

    return retrain.evaluator(problem.task(), test)(model)


# ==============================================================================================================
# Main
# ==============================================================================================================
COLUMNS = [
    ("method", "method"),
    ("lds", "LDS"),
    ("seconds", "fit+score s"),
    ("x_fwd_bwd", "x fwd+bwd"),
    ("slope_vs_gn", "slope vs GN"),
    ("r_vs_gn", "r vs GN"),
    ("below_minus_loss", "share < -loss"),
    ("route", "route"),
    ("status", "status"),
]


def print_tables(payload: dict[str, Any], markdown: bool = False) -> None:
    for name, entry in payload["problems"].items():
        print(f"\n### {name}: {entry['summary']}")
        print(
            f"noise ceiling {common.fmt(entry.get('ceiling'))} (best LDS to hope for about "
            f"{common.fmt(entry.get('correlation_ceiling'))}), test accuracy {common.fmt(entry.get('accuracy'))}\n"
        )
        rows = []
        for label, row in entry["methods"].items():
            r = {"method": label, **row}
            if row.get("seconds") and row.get("fwd_bwd_seconds"):
                r["x_fwd_bwd"] = row["seconds"] / row["fwd_bwd_seconds"]
            if row.get("status") != "ok":
                r["status"] = f"{row.get('status')}: {str(row.get('reason', ''))[:60]}"
            rows.append(r)
        rows.sort(key=lambda r: -(r.get("lds") if isinstance(r.get("lds"), float) else -9))
        print(common.table(rows, COLUMNS, markdown=markdown))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # the language model has its own script (bench_lm.py: sampled-Fisher routes, kronfluence on GPT-2, memory)
    parser.add_argument("--problems", default=",".join(n for n in catalogue.CATALOGUE if n != "lm"))
    parser.add_argument("--methods", default="*")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-subsets", type=int, default=50)
    parser.add_argument("--n-seeds", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "catalogue.json"))
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--markdown-from")
    parser.add_argument("--worker", nargs=3)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, threads=args.threads)
        return
    if args.markdown_from:
        print_tables(json.loads(Path(args.markdown_from).read_text()), markdown=True)
        return
    problems = [catalogue.problem(n) for n in args.problems.split(",")]
    patterns = args.methods.split(",")
    methods = [m for m in METHODS if any(fnmatch.fnmatch(m.label, p) for p in patterns)]
    if args.list:
        for p in problems:
            print(p.summary())
        for m in methods:
            print(f"{m.label:32s} {m.kind:12s} {m.options} {m.note}")
        return
    output = Path(args.output)
    payload = json.loads(output.read_text()) if output.exists() else {"problems": {}}
    payload["versions"] = common.versions(["datatrace", "torch", "kronfluence", "pydvl", "dattri"])
    for problem in problems:
        truth = catalogue.ground_truth(problem, args.n_subsets, args.n_seeds)
        losses = base_losses(problem)
        noise = np.random.default_rng(0).normal(size=(problem.n_test, problem.n_train))
        ceiling = metrics.lds(noise, truth.masks, truth.outputs)
        entry = payload["problems"].setdefault(problem.name, {"methods": {}})
        entry.update(
            summary=problem.summary(),
            accuracy=catalogue.accuracy(catalogue.trained(problem), problem.data()[1]),
            ceiling=ceiling.noise_ceiling,
            correlation_ceiling=ceiling.correlation_ceiling,
            n_subsets=args.n_subsets,
            n_seeds=args.n_seeds,
        )
        reference_path = catalogue.CACHE_DIR / problem.key() / "scores-gauss-newton.npy"
        for method in methods:
            n_params = problem.num_params()
            if method.max_params is not None and n_params > method.max_params:
                entry["methods"][method.label] = {
                    "status": "skipped",
                    "reason": f"{n_params:,} parameters > {method.max_params:,} (predicted minutes)",
                }
                continue
            print(f"[{problem.name}] {method.label} ...", end=" ", flush=True)
            row = run_in_subprocess(problem, method, args.timeout, args.threads)
            if row.get("status") == "ok":
                scores = row.pop("scores")
                if method.label == "gauss-newton":
                    np.save(reference_path, scores)
                reference = np.load(reference_path) if reference_path.exists() else None
                row.update(evaluate(scores, truth, losses, reference))
            row.pop("trace", None) if row.get("status") == "ok" else None
            entry["methods"][method.label] = row
            print(row.get("status"), common.fmt(row.get("lds")), common.fmt(row.get("seconds")), flush=True)
            common.write_json(output, payload)
    print_tables(payload)


if __name__ == "__main__":
    main()
