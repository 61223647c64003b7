"""Does `datatrace.verification.verify` give the verdict that the full benchmarks measure?

For the two problems of `bench_curvature.py` (logistic regression and the tanh MLP on digits, float64, L-BFGS) and
three routes each (exact, EK-FAC, identity = gradient dot products), runs `verify()` with its defaults
(60 retrains, `train_fn` = L-BFGS from a seeded init, so the method choice is the one a user gets) and prints the
verdict beside the route's LOO Pearson / LDS from `results/curvature.json` (100 LOO retrains / 60 half subsets x 2
seeds). Writes `results/verify.json`.

    python benchmarks/bench_verify.py            # about 5 minutes on 2 cores (retrains cached per problem)
    python benchmarks/bench_verify.py --catalogue mlp-small,tabular,mlp-large

``--catalogue`` does the same on problems of the realistic catalogue (``realistic.py``: float32, Adam for a
budget), with the default route (``curvature="auto"``), EK-FAC and identity, against the LDS that
``bench_catalogue.py`` measured (``results/catalogue.json``, 50 half subsets x 2 seeds); ``train_fn`` is the
problem's own recipe from a seeded init. Writes ``results/verify_catalogue.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import common
import datatrace
import realistic
from datatrace.verification import verify

ROUTES = ("exact", "ekfac", "identity")


def measured(curvature: dict[str, Any], problem: str, route: str) -> str:
    """The route's number in the full benchmark: LOO mean Pearson (logreg) or LDS (mlp)."""
    for row in curvature.get("results", []):
        if row.get("problem") == problem and row.get("method") == route:
            if problem == "logreg" and row.get("loo_mean_pearson") is not None:
                return f"LOO r {row['loo_mean_pearson']:.3f}"
            if row.get("lds") is not None:
                return f"LDS {row['lds']:.3f}"
    return "not in curvature.json"


def catalogue_cases(names: str, routes: tuple[str, ...]) -> list[dict[str, Any]]:
    """The realistic catalogue's problems: model, data, recipe, and each route's LDS from catalogue.json."""
    path = common.RESULTS_DIR / "catalogue.json"
    full = json.loads(path.read_text())["problems"] if path.exists() else {}
    cases = []
    for name in names.split(","):
        problem = realistic.problem(name)
        train, test = problem.data()
        methods = full.get(name, {}).get("methods", {})
        for route in routes:
            row = methods.get(route, {})
            cases.append(
                {
                    "problem": name,
                    "route": route,
                    "model": realistic.trained(problem),
                    "task": problem.task(),
                    "train": train,
                    "test": test,
                    "train_fn": problem.train_fn(),
                    "cache": realistic.CACHE_DIR / problem.key() / "verify",
                    "benchmark": f"LDS {row['lds']:.3f}" if row.get("lds") is not None else "not measured",
                }
            )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-retrains", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--catalogue", default=None, help="comma-separated problems of realistic.py")
    args = parser.parse_args()
    if args.catalogue:
        args.output = args.output or common.RESULTS_DIR / "verify_catalogue.json"
        run(catalogue_cases(args.catalogue, ("auto", "ekfac", "identity")), args)
        return
    args.output = args.output or common.RESULTS_DIR / "verify.json"
    curvature_json = common.RESULTS_DIR / "curvature.json"
    curvature = json.loads(curvature_json.read_text()) if curvature_json.exists() else {}
    problems = {
        "logreg": common.Problem("logreg"),
        "mlp": common.Problem("mlp", retrain_tolerance=1e-9),
    }
    cases = []
    for name, problem in problems.items():
        train, test = problem.data()
        model = common.trained_model(problem, train)
        for route in ROUTES:
            cases.append(
                {
                    "problem": name,
                    "route": route,
                    "model": model,
                    "task": problem.task(),
                    "train": train,
                    "test": test,
                    "train_fn": common.FromSeed(problem),
                    "cache": common.CACHE_DIR / problem.retrain_key() / f"verify-{args.n_retrains}",
                    "benchmark": measured(curvature, name, route),
                }
            )
    run(cases, args)


def run(cases: list[dict[str, Any]], args: argparse.Namespace) -> None:
    rows = []
    for case in cases:
        name, route = case["problem"], case["route"]
        start = time.perf_counter()
        influence = datatrace.InfluenceFunction(case["model"], case["task"], curvature=route, progress=False)
        influence.fit(case["train"])
        result = verify(
            influence,
            case["train"],
            case["train_fn"],
            case["test"],
            n_retrains=args.n_retrains,
            n_jobs=args.jobs,
            cache_dir=case["cache"],
            progress=False,
        )
        agreement = result.agreement
        if result.method == "leave-one-out":
            got = f"LOO r {agreement['mean_pearson']:.3f}, slope {agreement['calibration_slope']:.2f}"
        else:
            got = f"LDS {agreement['lds']:.3f} (ceiling {agreement['correlation_ceiling']:.3f})"
        rows.append(
            {
                "problem": name,
                "route": route
                if route != "auto"
                else f"auto ({influence.curvature_.info.get('auto_choice')})",
                "benchmark": case["benchmark"],
                "verify_method": result.method,
                "verify_agreement": got,
                "verdict": result.verdict,
                "seconds": round(time.perf_counter() - start, 1),
                "details": result.to_dict(),
            }
        )
        print(f"{name:9s} {route:9s} {case['benchmark']:22s} {result.method:14s} {got:38s} {result.verdict}")
    columns = [
        ("problem", "problem"),
        ("route", "route"),
        ("benchmark", "full benchmark"),
        ("verify_method", "verify method"),
        ("verify_agreement", "verify agreement"),
        ("verdict", "verdict"),
        ("seconds", "s"),
    ]
    print()
    print(common.table(rows, columns, markdown=True))
    common.write_json(args.output, {"benchmark": "verify", "n_retrains": args.n_retrains, "rows": rows})
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
