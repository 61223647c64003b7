"""Influence at scale: the projected-gradient store's cost against n, and projected influence's accuracy against k.

**Part 1 - scale** (``--part scale``). Synthetic 10-class data (32 features, labels from a random teacher), a
float32 MLP ``32 -> 128 -> ReLU -> 128 -> ReLU -> 10`` (p = 22,026), ``ProjectedInfluence`` with the factorised
LoGra projection (``FactorizedProjector(width, width)``, default width 24: k = 1,392) and the exact projected
Gauss-Newton curvature, features written to a :class:`~datatrace.store.GradientStore` on disk. For each training
set size n (default 1k, 3k, 10k, 30k, 100k), in a fresh subprocess:

* ``fit``: projected training gradients + curvature into the store (one pass, 1 + 10 backward columns per batch);
  its ratio to ONE plain forward+backward pass over the same data in the same batches (the floor of any gradient
  method, fastest of 5, measured in the same process, in wall and in process CPU time), and its throughput in
  examples per second. For this small MLP the ratio is dominated by accumulating the k x k projected Gauss-Newton
  matrix (n (1 + 10) k^2 multiply-adds, hundreds of times the flops of the forward+backward pass);
  ``--ggn-samples 1`` sketches the output Hessian with one column and cuts that part about six-fold;
* ``query``: projected gradients of 100 queries; ``dense``: the (100, n) score matrix from the store;
  ``top-k``: streaming top-10 proponents and opponents (never holds 100 x n);
* ``reuse``: a new ``ProjectedInfluence`` on the existing store (must run no training pass: checked);
* peak resident memory of the process and the store's size on disk.

Scoring time should grow linearly in n (reported per query per 1,000 training examples) and memory should stay
bounded (features are read chunk by chunk from memory-mapped files).

**Part 2 - accuracy** (``--part lds``). The digits MLP of ``benchmarks/common.py`` (``Linear(64, h) -> tanh ->
Linear(h, 10)``, float64, L2 1e-3, 1,000 train / 200 test), linear datamodeling score (LDS) against models
retrained from random inits on random half subsets. Hidden width 32 (p = 2,410) reuses the 60 subsets x 2 seeds
cached by ``bench_curvature.py``; hidden width 128 (p = 9,610) uses 50 subsets x 1 seed computed here (cached;
about 10 minutes on two cores the first time). Methods: unprojected ``InfluenceFunction(curvature=
"gauss-newton")`` (the reference), ``ProjectedInfluence`` with Gaussian ``RandomProjector(dim=k)`` and
``FactorizedProjector(w, w)`` at several k, and the literal projected-model regulariser for comparison. Reported:
LDS, Pearson correlation with the unprojected scores, k, seconds. Acceptance: projected influence with a few
thousand dimensions (Gaussian, k = 2,048) is within 0.05 LDS of unprojected.

Units and sign are datatrace's: ``score[q, i] ~ f_q(theta_{-i}) - f_q(theta_hat)`` (positive: i helped q).

Usage::

    python benchmarks/bench_store.py                       # both parts (~15 min on 2 quiet cores, less cached)
    python benchmarks/bench_store.py --quick               # smoke run (small sizes, hidden 32 only)
    python benchmarks/bench_store.py --part scale --sizes 1000,10000,100000 --width 32
    python benchmarks/bench_store.py --part lds --hidden 32

Writes ``benchmarks/results/store.json`` (``store_quick.json`` with ``--quick``) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import datatrace
from common import Measure, Problem
from datatrace import metrics
from datatrace.projected import ProjectedInfluence
from datatrace.projection import FactorizedProjector, RandomProjector

RESULTS = Path(__file__).resolve().parent / "results"


# ==============================================================================================================
# Part 1: scale
# ==============================================================================================================
def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of 32 standard-normal features labelled by a random two-layer teacher (10 classes)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 32, generator=g)
    W1, W2 = torch.randn(32, 64, generator=g), torch.randn(64, 10, generator=g)
    y = (torch.tanh(X @ W1) @ W2).argmax(dim=1)
    return X, y


def scale_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def batched_forward_backward(
    model: nn.Module, task: datatrace.Task, data: tuple, batch: int
) -> tuple[float, float]:
    """ONE forward+backward pass of the loss over all of ``data`` in batches: the fastest of 5 after one warm-up
    (the floor; on a shared machine the median is noisy), as ``(wall seconds, process CPU seconds)``."""
    X, y = data
    walls, cpus = [], []
    for r in range(6):
        start, cpu = time.perf_counter(), time.process_time()
        for s in range(0, len(X), batch):
            model.zero_grad(set_to_none=True)
            task.loss(model, (X[s : s + batch], y[s : s + batch])).sum().backward()
        if r:
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
    model.zero_grad(set_to_none=True)
    return float(min(walls)), float(min(cpus))


def scale_child(args: argparse.Namespace) -> dict[str, Any]:
    """One training-set size, in its own process (so that its peak memory is its own)."""
    logging.getLogger("datatrace").setLevel(
        logging.ERROR
    )  # the synthetic model is untrained: no minimum warning
    n, n_query, batch = args.child_scale, args.n_query, args.batch_size
    X, y = synthetic(n + n_query, seed=0)
    train, query = (X[:n], y[:n]), (X[n:], y[n:])
    model = scale_model(seed=0)
    task = datatrace.ClassificationTask(weight_decay=1e-4)
    feature_dtype = getattr(torch, args.feature_dtype)
    base_rss = common.current_rss_bytes() / 2**20
    fb, fb_cpu = batched_forward_backward(model, task, train, batch)
    kwargs: dict[str, Any] = {
        "projector": FactorizedProjector(args.width, args.width),
        "batch_size": batch,
        "feature_dtype": feature_dtype,
        "ggn_samples": args.ggn_samples,
        "progress": False,
    }
    row: dict[str, Any] = {"n_train": n, "n_query": n_query, "width": args.width}
    with tempfile.TemporaryDirectory(dir=args.store_root) as root:
        store_dir = Path(root) / "store"
        cpu = time.process_time()
        with Measure() as m_fit:
            inf = ProjectedInfluence(model, task, store_dir=store_dir, **kwargs).fit(train)
        fit_cpu = time.process_time() - cpu
        with Measure() as m_query:
            qf = inf.query_features(query)
        with Measure() as m_dense:
            dense = inf.score_features(qf).values
        with Measure() as m_top:
            top = inf.top_k_features(qf, args.top_k)
        with Measure() as m_reuse:
            again = ProjectedInfluence(model, task, store_dir=store_dir, **kwargs).fit(train)
            again_top = again.top_k_features(qf, args.top_k)
        store_bytes = sum(p.stat().st_size for p in store_dir.iterdir())
        check_topk = bool(torch.equal(top.proponents.indices, torch.topk(dense, args.top_k, dim=1).indices))
        row.update(
            dim=inf.dim_,
            num_params=inf.fmodel_.num_params,
            chunks=inf.store_.n_chunks,
            chunk_size=inf.store_.chunk_size,
            seconds_forward_backward=fb,
            seconds_fit=m_fit.seconds,
            fit_over_forward_backward=m_fit.seconds / fb,
            cpu_seconds_forward_backward=fb_cpu,
            cpu_seconds_fit=fit_cpu,
            fit_over_forward_backward_cpu=fit_cpu / fb_cpu,
            fit_examples_per_second=n / m_fit.seconds,
            seconds_query_features=m_query.seconds,
            seconds_dense_score=m_dense.seconds,
            seconds_top_k=m_top.seconds,
            dense_us_per_query_per_1k_train=1e6 * m_dense.seconds / n_query / (n / 1000),
            top_k_us_per_query_per_1k_train=1e6 * m_top.seconds / n_query / (n / 1000),
            seconds_reuse_fit=m_reuse.seconds,
            reuse_train_examples_processed=again.info["train_examples_processed"],
            reuse_same_top_k=bool(torch.equal(again_top.proponents.indices, top.proponents.indices)),
            top_k_equals_dense=check_topk,
            store_mib=store_bytes / 2**20,
            rss_before_mib=base_rss,
            peak_rss_mib=common.peak_rss_bytes() / 2**20,
            fit_extra_peak_mib=m_fit.extra_peak_mib,
            dense_extra_peak_mib=m_dense.extra_peak_mib,
            top_k_extra_peak_mib=m_top.extra_peak_mib,
        )
    return row


def run_scale(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--child-scale", str(n)]
        for flag in ("width", "n_query", "top_k", "batch_size", "feature_dtype", "ggn_samples", "store_root"):
            value = getattr(args, flag)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        print(f"[scale] n={n:,} ...", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            rows.append(
                {"n_train": n, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
            )
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"        fit {row['seconds_fit']:.1f} s ({row['fit_over_forward_backward']:.1f}x forward+backward), "
            f"dense {row['seconds_dense_score']:.2f} s, top-k {row['seconds_top_k']:.2f} s, "
            f"peak RSS {row['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    return rows


# ==============================================================================================================
# Part 2: LDS against projection dimension
# ==============================================================================================================
LDS_PROBLEMS = {
    32: (Problem("mlp", retrain_tolerance=1e-9), 60, 2),  # shared with bench_curvature.py
    128: (Problem("mlp", hidden=128, retrain_tolerance=1e-9), 50, 1),
}


def row_pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double().numpy()
    b = b.double().numpy()
    return float(np.nanmean([np.corrcoef(a[i], b[i])[0, 1] for i in range(a.shape[0])]))


def run_lds(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for hidden in args.hidden:
        problem, n_subsets, n_seeds = LDS_PROBLEMS[hidden]
        if args.quick:
            problem, n_subsets, n_seeds = (
                Problem("mlp", n_train=200, n_test=40, hidden=16, base_max_iter=1000, retrain_max_iter=300),
                12,
                1,
            )
        train, test = problem.data()
        print(
            f"[lds] {problem.describe()}; ground truth {n_subsets} subsets x {n_seeds} seed(s) ...",
            flush=True,
        )
        model = common.trained_model(problem, train)
        truth = common.subset_truth(problem, n_subsets, n_seeds, n_jobs=args.jobs, progress=False)
        task = problem.task()
        p = sum(q.numel() for q in model.parameters())

        def lds_of(values: torch.Tensor, truth: Any = truth) -> tuple[float, float | None]:
            res = metrics.lds(values.numpy(), truth.masks, truth.outputs)
            return float(res.mean), (None if res.noise_ceiling is None else float(res.noise_ceiling))

        base = {"hidden": problem.hidden, "num_params": p, "n_subsets": n_subsets, "n_seeds": n_seeds}
        # the reference: no projection (k = p), i.e. exactly the unprojected Gauss-Newton influence (tested to 1e-8
        # against InfluenceFunction(curvature="gauss-newton")), with a Cholesky solve instead of an eigh
        start = time.perf_counter()
        ref = ProjectedInfluence(
            model, task, projector=RandomProjector(kind="identity"), dtype=torch.float64, progress=False
        ).fit(train)
        ref_values = ref.score(test).values
        ref_seconds = time.perf_counter() - start
        ref_lds, ceiling = lds_of(ref_values)
        rows.append(
            {
                **base,
                "method": "unprojected Gauss-Newton (ProjectedInfluence, identity)",
                "dim": p,
                "lds": ref_lds,
                "noise_ceiling": ceiling,
                "corr_unprojected": 1.0,
                "seconds": ref_seconds,
            }
        )
        print(f"      unprojected GN: LDS {ref_lds:.4f} ({ref_seconds:.0f} s)", flush=True)
        if p <= args.max_dense_p:  # cross-check with the dense eigendecomposition route
            start = time.perf_counter()
            dense = datatrace.InfluenceFunction(model, task, curvature="gauss-newton", progress=False).fit(
                train
            )
            values = dense.score(test).values
            rows.append(
                {
                    **base,
                    "method": "unprojected Gauss-Newton (InfluenceFunction, dense eigh)",
                    "dim": p,
                    "lds": lds_of(values)[0],
                    "lds_minus_unprojected": lds_of(values)[0] - ref_lds,
                    "corr_unprojected": row_pearson(values, ref_values),
                    "seconds": time.perf_counter() - start,
                }
            )
            print(f"      InfluenceFunction GN: LDS {rows[-1]['lds']:.4f}", flush=True)
        methods: list[tuple[str, Any, str]] = [
            (f"Gaussian k={d}", RandomProjector(dim=d), "rescaled") for d in args.dims if d < p
        ]
        methods += [(f"LoGra {w}x{w}", FactorizedProjector(w, w), "rescaled") for w in args.widths]
        methods += [
            (f"Gaussian k={d}, regularizer=projected", RandomProjector(dim=d), "projected")
            for d in args.dims
            if d < p and d in (512, 2048)
        ]
        for label, projector, regularizer in methods:
            start = time.perf_counter()
            inf = ProjectedInfluence(
                model, task, projector=projector, regularizer=regularizer, dtype=torch.float64, progress=False
            ).fit(train)
            values = inf.score(test).values
            seconds = time.perf_counter() - start
            lds, _ = lds_of(values)
            rows.append(
                {
                    **base,
                    "method": f"ProjectedInfluence {label}",
                    "dim": inf.dim_,
                    "regularizer": regularizer,
                    "lds": lds,
                    "lds_minus_unprojected": lds - ref_lds,
                    "corr_unprojected": row_pearson(values, ref_values),
                    "seconds": seconds,
                }
            )
            print(
                f"      {label}: k={inf.dim_}, LDS {lds:.4f}, corr {rows[-1]['corr_unprojected']:.3f}",
                flush=True,
            )
    return rows


# ==============================================================================================================
# Main
# ==============================================================================================================
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", default="scale,lds", help="scale, lds or both (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, a tiny LDS problem")
    parser.add_argument("--sizes", default="1000,3000,10000,30000,100000", help="training set sizes (scale)")
    parser.add_argument("--width", type=int, default=24, help="FactorizedProjector side width (scale)")
    parser.add_argument("--n-query", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--feature-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--ggn-samples", type=int, default=None, help="Rademacher sketch of the output Hessian"
    )
    parser.add_argument("--store-root", default=None, help="where the temporary stores go (default: $TMPDIR)")
    parser.add_argument("--hidden", default="32,128", help="hidden widths of the LDS problems (32, 128)")
    parser.add_argument("--dims", default="128,256,512,1024,2048,4096", help="Gaussian projection dims (lds)")
    parser.add_argument("--widths", default="8,16,32,64", help="LoGra side widths (lds)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel retrains for missing ground truth")
    parser.add_argument(
        "--max-dense-p", type=int, default=4000, help="also run InfluenceFunction(gauss-newton) up to this p"
    )
    parser.add_argument("--child-scale", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_scale is not None:
        print(json.dumps(common.to_jsonable(scale_child(args))))
        return
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.hidden = [int(h) for h in args.hidden.split(",")]
    args.dims = [int(d) for d in args.dims.split(",")]
    args.widths = [int(w) for w in args.widths.split(",")]
    if args.quick:
        args.sizes, args.hidden, args.dims, args.widths = [500, 2000], [32], [64, 128], [4, 8]
    parts = set(args.part.split(","))
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "projected-gradient store at scale, and projected influence LDS against dimension",
        "meaning": datatrace.scores.MEANING,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "child_scale"},
        "note": "wall times from a shared 2-core machine (see load_average_at_start); ratios are measured in one "
        "process against a forward+backward pass taken minutes apart, so they carry that noise",
    }
    if "scale" in parts:
        rows = run_scale(args)
        result["scale"] = rows
        print()
        print(
            "Part 1 - scale: FactorizedProjector width", args.width, "- exact projected GGN - store on disk"
        )
        print(
            common.table(
                rows,
                [
                    ("n_train", "n"),
                    ("dim", "k"),
                    ("seconds_fit", "fit s"),
                    ("fit_over_forward_backward", "fit/fb"),
                    ("fit_examples_per_second", "ex/s"),
                    ("seconds_dense_score", "dense s"),
                    ("dense_us_per_query_per_1k_train", "us/q/1k"),
                    ("seconds_top_k", "top-k s"),
                    ("seconds_reuse_fit", "reuse s"),
                    ("peak_rss_mib", "peak MiB"),
                    ("store_mib", "store MiB"),
                ],
            )
        )
        ok = [r for r in rows if "error" not in r]
        if len(ok) >= 2:
            ns = np.array([r["n_train"] for r in ok], dtype=float)
            for key in ("seconds_fit", "seconds_dense_score", "seconds_top_k"):
                slope = np.polyfit(np.log(ns), np.log([max(r[key], 1e-9) for r in ok]), 1)[0]
                result.setdefault("scaling_exponents", {})[key] = float(slope)
            print("log-log slope of time against n:", json.dumps(result["scaling_exponents"]))
    if "lds" in parts:
        rows = run_lds(args)
        result["lds"] = rows
        print()
        print("Part 2 - LDS against projection dimension (digits MLP)")
        print(
            common.table(
                rows,
                [
                    ("hidden", "h"),
                    ("num_params", "p"),
                    ("method", "method"),
                    ("dim", "k"),
                    ("lds", "LDS"),
                    ("lds_minus_unprojected", "dLDS"),
                    ("corr_unprojected", "corr GN"),
                    ("seconds", "s"),
                ],
            )
        )
        checks = []
        for hidden in args.hidden:
            mine = [r for r in rows if r["method"].endswith("Gaussian k=2048")]
            mine = [r for r in mine if r["hidden"] == hidden]
            if mine:
                gap = mine[0]["lds_minus_unprojected"]
                checks.append(
                    {
                        "hidden": hidden,
                        "check": "Gaussian k=2048 within 0.05 LDS of unprojected",
                        "gap": gap,
                        "pass": bool(gap >= -0.05),
                    }
                )
        result["acceptance"] = checks
        for c in checks:
            print(
                f"{'PASS' if c['pass'] else 'FAIL'}: h={c['hidden']} {c['check']} (LDS difference {c['gap']:+.4f})"
            )
    result["seconds_total"] = time.perf_counter() - started
    name = "store_quick.json" if args.quick else "store.json"
    previous = RESULTS / name
    if previous.exists():  # running one part keeps the other part's last results
        try:
            old = json.loads(previous.read_text())
        except ValueError:
            old = {}
        for key in ("scale", "scaling_exponents", "lds", "acceptance"):
            if key in old and key not in result:
                result[key] = old[key]
    common.write_json(RESULTS / name, result)
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
