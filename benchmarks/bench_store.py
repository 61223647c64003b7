"""Influence at scale: the projected-gradient store's cost against n, and projected influence's accuracy against k.

**Part 1 - scale** (``--part scale``). Synthetic 10-class data (32 features, labels from a random teacher), a
float32 MLP ``32 -> 128 -> ReLU -> 128 -> ReLU -> 10`` (p = 22,026), ``ProjectedInfluence`` with the factorised
LoGra projection (``FactorizedProjector(width, width)``, default width 24: k = 1,392) and the exact projected
Gauss-Newton curvature, features written to a :class:`~datatrace.projection.store.GradientStore` on disk. For each training
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

**Part 3 - peers** (``--part peers``; ``--skip-peers`` to leave it out, ``--peers`` to choose). TRAK as MadryLab's
``traker`` ships it (``TRAKer`` on CPU: its ``BasicProjector``, Gaussian; the CUDA projector needs ``fast_jl``),
dattri's ``TRAKAttributor``, dattri's ``LoGraAttributor`` and kronfluence's EK-FAC (``Analyzer``:
``fit_all_factors`` then ``compute_pairwise_scores``, unprojected, damping = the weight decay), each in its own
subprocess (``--peer-timeout``, a missing library is "not available", a failure is reported with its error). On
the scale problem, at ``--peer-sizes`` and at datatrace's k (kronfluence: k = p): fit (featurize + finalize /
cache / factors), scoring a query set, scoring a SECOND query set on the fitted state (the TRAK and LoGra peers do
not recompute training gradients there; kronfluence's pairwise scores recompute all n of them for every new query
set, its issue #40), peak RSS, the ratio to one forward+backward pass, and per-query Pearson r with datatrace's
scores. On the digits MLP of part 2 (hidden 32, the cached ground truth of ``bench_curvature.py``): LDS of
single-model TRAK against ``ProjectedInfluence`` with a Gaussian projection of the same k (``--peer-dims``), with
TRAK's shipped ridge 0 and with a ridge matched to the model's L2 (peers in ``LDS_PEERS``; kronfluence's LDS is in
``bench_curvature.py``; with no such peer chosen the LDS table is not run). Peers' scores are converted to
datatrace's units and sign first (``CONVERSIONS``). Writes ``benchmarks/results/store_peers.json``
(``store_peers_quick.json`` with ``--quick``), MERGING into the file's rows: a run replaces the rows of the
libraries and n it ran and keeps all others, so ``--peers kronfluence`` adds kronfluence's rows (and refreshes
datatrace's) without losing the traker / dattri rows.

Units and sign are datatrace's: ``score[q, i] ~ f_q(theta_{-i}) - f_q(theta_hat)`` (positive: i helped q).

Usage::

    python benchmarks/bench_store.py                       # all parts (~15 min on 2 quiet cores + peers)
    python benchmarks/bench_store.py --quick               # smoke run (small sizes, hidden 32 only)
    python benchmarks/bench_store.py --part scale --sizes 1000,10000,100000 --width 32
    python benchmarks/bench_store.py --part lds --hidden 32
    python benchmarks/bench_store.py --part peers --peers traker,dattri-trak --peer-sizes 1000,10000
    python benchmarks/bench_store.py --part peers --peers kronfluence --peer-sizes 1000,10000,100000
    python benchmarks/bench_store.py --skip-peers          # parts 1 and 2 only

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
from datatrace.attributors.projected import ProjectedInfluence
from datatrace.projection import FactorizedProjector, RandomProjector
from datatrace.verification import metrics

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
            top = inf.proponents_opponents_features(qf, args.top_k)
        with Measure() as m_reuse:
            again = ProjectedInfluence(model, task, store_dir=store_dir, **kwargs).fit(train)
            again_top = again.proponents_opponents_features(qf, args.top_k)
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
# Part 3: peers (TRAK as traker ships it, dattri's TRAK and LoGra) on the identical model and data
# ==============================================================================================================
#: peer label -> (pip distribution, module to import, what is run)
PEERS = {
    "traker": (
        "traker",
        "trak",
        "TRAKer(task='image_classification', device='cpu'): its BasicProjector (Gaussian, blocks of 100 "
        "columns regenerated per batch), float32 (use_half_precision=False), featurize + finalize_features, "
        "then start_scoring_checkpoint / score / finalize_scores per query set",
    ),
    "dattri-trak": (
        "dattri",
        "dattri.algorithm.trak",
        "dattri TRAKAttributor (single checkpoint) with its CPU 'normal' random_project, cache() then "
        "attribute(query loader) per query set",
    ),
    "dattri-logra": (
        "dattri",
        "dattri.algorithm.logra",
        "dattri LoGraAttributor (per-layer factorised Gaussian projection w x w, eFIM block-diagonal "
        "curvature, shipped damping), cache() then attribute() per query set",
    ),
    "kronfluence": (
        "kronfluence",
        "kronfluence.analyzer",
        "kronfluence Analyzer (cpu=True), unprojected: fit_all_factors(FactorArguments(strategy='ekfac'), shipped "
        "float32 dtypes, true Fisher) once, then compute_pairwise_scores(ScoreArguments(damping_factor = weight "
        "decay 1e-4)) + load_pairwise_scores per query set, which recomputes every training gradient for each new "
        "query set (its issue #40); scale part only (its LDS is in bench_curvature.py)",
    ),
}
#: peers that also take part in the LDS table of the peers part (kronfluence's LDS is in bench_curvature.py)
LDS_PEERS = ("traker", "dattri-trak", "dattri-logra")

# How each library's raw scores become datatrace's ``score[q, i] ~ f_q(theta_{-i}) - f_q(theta_hat)`` (query
# loss change on removing i, positive = i helped q). p_q = softmax probability of query q's label under the model.
CONVERSIONS = {
    "datatrace": "none",
    "traker": "score[q, i] = (1 - p_q) * raw[i, q]. raw (train-major) = (1 - p_i) * phi_q^T (Phi^T Phi + lambda I)^-1 "
    "phi_i on margin gradients phi = P^T grad m / sqrt(p), m = log(p/(1-p)) (its 'image_classification' output): "
    "~ -(change of query q's margin when i is removed), higher = more helpful, so the sign is kept (+1) and the "
    "chain rule d loss_q / d m_q = -(1 - p_q) turns a margin change into a loss change. The absolute scale is NOT "
    "datatrace's: BasicScoreComputer divides (Phi^T Phi)^-1 by its mean absolute entry, so only scale-free metrics "
    "(LDS, Pearson r, sign) are comparable; the least-squares slope on datatrace's scores is reported for reference",
    "dattri-trak": "score[q, i] = (1 - p_q) * raw[i, q], same derivation as traker (its loss_func is the margin "
    "log(p/(1-p)), its Q = 1 - p_i); no rescaling of the inverse, and Phi^T Phi is a sum over the n examples, so "
    "no 1/n: this is datatrace's unit up to the curvature (unweighted margin-gradient Gram matrix instead of the "
    "Gauss-Newton of the loss + L2)",
    "dattri-logra": "score[q, i] = raw[i, q] * n_query_batch / n_train (raw = g_q^T (mean eFIM + damping)^-1 g_i "
    "of loss gradients; its test gradients come from a hard-coded MEAN cross-entropy per query batch, hence the "
    "batch size; same sign)",
    "kronfluence": "score[q, i] = raw[q, i] / n_train (raw = grad f_q^T (EK-FAC of the mean true Fisher + damping)^-1 "
    "grad l_i with summed losses, query-major; no 1/n, same sign), as in bench_curvature.py. A different estimator "
    "from datatrace's (unprojected EK-FAC against the projected exact Gauss-Newton), so r is not expected near 1",
}
SIGN = {"datatrace": 1.0, "traker": 1.0, "dattri-trak": 1.0, "dattri-logra": 1.0, "kronfluence": 1.0}


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (library missing); the message says why."""


def ridge_for(library: str, n: int, weight_decay: float, k: int) -> float:
    """The peer's ridge on its k x k Gram matrix that equals the model's L2 term ``weight_decay * I`` (per example)
    seen through the projection, in the peer's own units: traker projects with N(0, 1) entries and divides by
    sqrt(p), so P^T P / p ~ I and the ridge is n * wd; dattri's 'normal' projection is scaled by 1/sqrt(k), so
    P^T P / p ~ I / k and the ridge is n * wd / k."""
    if library == "traker":
        return n * weight_decay
    if library == "dattri-trak":
        return n * weight_decay / k
    raise ValueError(library)


def correct_probability(model: nn.Module, data: tuple) -> np.ndarray:
    with torch.no_grad():
        logits = model(data[0])
        return torch.softmax(logits.double(), dim=1)[torch.arange(len(data[1])), data[1]].numpy()


def to_datatrace_units(
    library: str, raw: np.ndarray, p_query: np.ndarray, n_train: int, batch: int
) -> np.ndarray:
    """A peer's raw (n_train, n_query) scores to datatrace's (n_query, n_train) units and sign (``CONVERSIONS``)."""
    raw = np.asarray(raw, dtype=np.float64).T
    if library in ("traker", "dattri-trak"):
        return SIGN[library] * (1.0 - p_query)[:, None] * raw
    if library == "dattri-logra":
        return SIGN[library] * raw * batch / n_train
    if library == "kronfluence":  # _run_peer hands its query-major scores over train-major, as the others
        return SIGN[library] * raw / n_train
    raise ValueError(library)


def _loader(data: tuple, batch: int) -> Any:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=batch, shuffle=False)


def _run_peer(
    library: str,
    model: nn.Module,
    train: tuple,
    queries: list[tuple],
    k: int,
    ridge: float | None,
    batch: int,
    workdir: Path,
    width: int,
) -> dict[str, Any]:
    """Fit ``library`` on ``train`` and score every query set in turn; returns raw scores and timings."""
    n = len(train[0])
    out: dict[str, Any] = {"query_seconds": [], "raw": []}
    if library == "traker":
        from trak import TRAKer

        save_dir = workdir / f"trak-{k}-{ridge}"
        save_dir.mkdir(parents=True, exist_ok=True)  # its MmapSaver does not create it
        with Measure() as m_fit:
            traker = TRAKer(
                model=model,
                task="image_classification",
                train_set_size=n,
                save_dir=str(save_dir),
                load_from_save_dir=True,  # the default; False breaks scoring (no experiments.json)
                device="cpu",
                proj_dim=k,
                use_half_precision=False,
                logging_level=logging.ERROR,
                lambda_reg=float(ridge or 0.0),
            )
            traker.load_checkpoint(model.state_dict(), model_id=0)
            for s in range(0, n, batch):
                part = (train[0][s : s + batch], train[1][s : s + batch])
                traker.featurize(batch=part, num_samples=len(part[0]))
            traker.finalize_features()
        workaround = None
        projector = traker.projector
        if getattr(projector, "num_blocks", 0) == 1 and not getattr(projector, "proj_matrix_available", True):
            # traker 0.3.2 bug: finalize_features() frees BasicProjector's matrix and a one-block projector
            # (proj_dim <= 100) never regenerates it ("no attribute 'proj_matrix'" in score); regenerate it
            projector.generate_sketch_matrix(projector.generator_states[0])
            workaround = "regenerated the one-block BasicProjector matrix after finalize_features"
        for j, query in enumerate(queries):
            start = time.perf_counter()
            traker.start_scoring_checkpoint(
                exp_name=f"q{j}", checkpoint=model.state_dict(), model_id=0, num_targets=len(query[0])
            )
            for s in range(0, len(query[0]), batch):
                part = (query[0][s : s + batch], query[1][s : s + batch])
                traker.score(batch=part, num_samples=len(part[0]))
            raw = np.array(traker.finalize_scores(exp_name=f"q{j}"))
            out["query_seconds"].append(time.perf_counter() - start)
            out["raw"].append(raw)
        out["settings"] = {
            "projector": f"{type(traker.projector).__name__} ({traker.projector.proj_type}, "
            f"block_size {getattr(traker.projector, 'block_size', None)})",
            "proj_dim": k,
            "lambda_reg": float(ridge or 0.0),
            "workaround": workaround,
            "dtype": "float32",
            "batch": batch,
        }
    elif library == "dattri-trak":
        import torch.nn.functional as F
        from dattri.algorithm.trak import TRAKAttributor
        from dattri.task import AttributionTask

        def margin(params: Any, data: tuple) -> torch.Tensor:  # dattri's TRAK example: log(p / (1 - p))
            x, y = data
            logp = -F.cross_entropy(torch.func.functional_call(model, params, x), y)
            return logp - torch.log(1 - torch.exp(logp))

        def prob(params: Any, data: tuple) -> torch.Tensor:
            x, y = data
            logits = torch.func.functional_call(model, params, x.unsqueeze(0))
            return torch.exp(-F.cross_entropy(logits, y.unsqueeze(0)))

        with Measure() as m_fit:
            task = AttributionTask(loss_func=margin, model=model, checkpoints=model.state_dict())
            attributor = TRAKAttributor(
                task=task,
                correct_probability_func=prob,
                device="cpu",
                projector_kwargs={"proj_dim": k, "proj_type": "normal", "device": "cpu", "proj_seed": 0},
                regularization=float(ridge or 0.0),
            )
            attributor.cache(_loader(train, batch))
        for query in queries:
            start = time.perf_counter()
            with torch.no_grad():
                raw = attributor.attribute(_loader(query, batch))
            out["query_seconds"].append(time.perf_counter() - start)
            out["raw"].append(raw.detach().double().numpy())
        out["settings"] = {
            "projector": "dattri random_project normal (CPU)",
            "proj_dim": k,
            "regularization": float(ridge or 0.0),
            "batch": batch,
        }
    elif library == "dattri-logra":
        import torch.nn.functional as F
        from dattri.algorithm.logra import LoGraAttributor
        from dattri.task import AttributionTask

        def loss(
            model_: nn.Module, data: tuple, device: Any
        ) -> torch.Tensor:  # summed: per-example gradients
            x, y = data
            return F.cross_entropy(model_(x.to(device)), y.to(device), reduction="sum")

        with Measure() as m_fit:
            task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
            attributor = LoGraAttributor(task=task, device="cpu", proj_dim=width * width, offload="cpu")
            attributor.cache(_loader(train, batch))
        for query in queries:
            start = time.perf_counter()
            raw = attributor.attribute(_loader(train, batch), _loader(query, batch))
            out["query_seconds"].append(time.perf_counter() - start)
            out["raw"].append(raw.detach().double().numpy())
        out["settings"] = {"proj_dim": width * width, "hessian": "eFIM", "damping": "shipped (None)"}
    elif library == "kronfluence":
        import copy

        import torch.nn.functional as F
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task as KronfluenceTask

        class ScaleTask(KronfluenceTask):
            """As kronfluence's docs: summed training loss; ``sample=True`` draws labels from the model (the true
            Fisher, its default); the measurement is the query's own loss, as datatrace measures."""

            def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
                x, y = batch
                logits = model(x)
                if sample:
                    with torch.no_grad():
                        y = torch.distributions.Categorical(logits=logits.detach()).sample()
                return F.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
                x, y = batch
                return F.cross_entropy(model(x), y, reduction="sum")

        damping = (
            1e-4  # the model's weight decay (datatrace's L2 term), as bench_curvature.py's kronfluence-ekfac
        )
        torch.manual_seed(0)  # the sampled labels of the true Fisher
        with Measure() as m_fit:
            kf_task = ScaleTask()
            kf_model = prepare_model(
                copy.deepcopy(model), kf_task
            )  # wraps each Linear in place: work on a copy
            analyzer = Analyzer(
                analysis_name="bench",
                model=kf_model,
                task=kf_task,
                cpu=True,
                disable_tqdm=True,
                log_level=logging.ERROR,
                output_dir=str(workdir / "kronfluence"),
            )
            analyzer.fit_all_factors(
                factors_name="ekfac",
                dataset=torch.utils.data.TensorDataset(*train),
                per_device_batch_size=batch,
                factor_args=FactorArguments(strategy="ekfac"),
                overwrite_output_dir=True,
            )
        score_args = ScoreArguments(damping_factor=damping)
        for j, query in enumerate(queries):
            start = time.perf_counter()
            analyzer.compute_pairwise_scores(
                scores_name=f"q{j}",
                factors_name="ekfac",
                query_dataset=torch.utils.data.TensorDataset(*query),
                train_dataset=torch.utils.data.TensorDataset(*train),
                per_device_query_batch_size=len(query[0]),  # one query batch: one pass over the training set
                per_device_train_batch_size=batch,
                score_args=score_args,
                overwrite_output_dir=True,
            )
            raw = analyzer.load_pairwise_scores(scores_name=f"q{j}")["all_modules"]
            out["query_seconds"].append(time.perf_counter() - start)
            out["raw"].append(raw.detach().double().numpy().T)  # train-major, as the other peers
        out["dim"] = sum(param.numel() for param in model.parameters())  # unprojected
        out["settings"] = {
            "strategy": "ekfac",
            "damping_factor": damping,
            "damping": "= weight decay 1e-4 (kronfluence's shipped default is 1e-8)",
            "fisher": "true Fisher (labels sampled from the model; kronfluence default)",
            "dtypes": "kronfluence's shipped FactorArguments / ScoreArguments dtypes (float32 covariances, "
            "lambdas, gradients and scores; float64 eigendecomposition)",
            "query_batch": len(queries[0][0]),
            "train_batch": batch,
        }
    else:
        raise ValueError(library)
    out.update(seconds_fit=m_fit.seconds, fit_extra_peak_mib=m_fit.extra_peak_mib)
    return out


def _run_datatrace(
    model: nn.Module,
    task: datatrace.Task,
    train: tuple,
    queries: list[tuple],
    projector: Any,
    batch: int,
    workdir: Path,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    out: dict[str, Any] = {"query_seconds": [], "raw": []}
    with Measure() as m_fit:
        inf = ProjectedInfluence(
            model,
            task,
            projector=projector,
            batch_size=batch,
            store_dir=workdir / "store",
            dtype=dtype,
            progress=False,
        ).fit(train)
    for query in queries:
        start = time.perf_counter()
        values = inf.score(query).values
        out["query_seconds"].append(time.perf_counter() - start)
        out["raw"].append(values.double().numpy())
    out.update(
        seconds_fit=m_fit.seconds,
        fit_extra_peak_mib=m_fit.extra_peak_mib,
        dim=inf.dim_,
        settings={"projector": repr(projector), "store": "on disk", "dtype": str(dtype)},
    )
    return out


def _import_peer(library: str) -> None:
    if library == "datatrace":
        return
    module = PEERS[library][1]
    try:
        __import__(module)
    except Exception as error:  # ImportError, or a peer that breaks on import
        raise PeerUnavailable(
            f"{PEERS[library][0]} not importable here ({type(error).__name__}: {error})"
        ) from None


def peer_child(args: argparse.Namespace) -> dict[str, Any]:
    """One library on one problem in this (fresh) process; scores go to ``args.child_workdir`` as .npy files."""
    import traceback

    logging.getLogger("datatrace").setLevel(logging.ERROR)
    library, workdir = args.child_peer, Path(args.child_workdir)
    out: dict[str, Any] = {"library": library, "status": "ok"}
    try:
        _import_peer(library)
        if args.child_problem == "scale":
            n, nq, batch = args.child_scale, args.n_query, args.batch_size
            X, y = synthetic(n + nq, seed=0)  # exactly the data of the scale part
            train, query = (X[:n], y[:n]), (X[n:], y[n:])
            query2 = synthetic(nq, seed=1)  # a second, fresh query set (timing)
            model = scale_model(seed=0)
            task = datatrace.ClassificationTask(weight_decay=1e-4)
            fb, _ = batched_forward_backward(model, task, train, batch)
            p_q = correct_probability(model, query)
            if library == "datatrace":
                res = _run_datatrace(
                    model,
                    task,
                    train,
                    [query, query2],
                    FactorizedProjector(args.width, args.width),
                    batch,
                    workdir,
                )
            else:
                ridge = (
                    ridge_for(library, n, 1e-4, args.peer_dim)
                    if library in ("traker", "dattri-trak")
                    else None
                )
                res = _run_peer(
                    library, model, train, [query, query2], args.peer_dim, ridge, batch, workdir, args.width
                )
            raws = res.pop("raw")
            scores = (
                raws[0] if library == "datatrace" else to_datatrace_units(library, raws[0], p_q, n, batch)
            )
            np.save(workdir / "scores.npy", scores.astype(np.float32))
            out.update(
                n_train=n,
                n_query=nq,
                dim=res.get("dim", args.peer_dim),
                seconds_forward_backward=fb,
                seconds_fit=res["seconds_fit"],
                fit_over_forward_backward=res["seconds_fit"] / fb,
                seconds_query_1=res["query_seconds"][0],
                seconds_query_2=res["query_seconds"][1],
                query_2_over_forward_backward=res["query_seconds"][1] / fb,
                fit_extra_peak_mib=res["fit_extra_peak_mib"],
                peak_rss_mib=common.peak_rss_bytes() / 2**20,
                settings=res.get("settings"),
                finite=bool(np.isfinite(scores).all()),
            )
        else:  # lds: the digits MLP, several projection dims, shipped and L2-matched ridge
            problem = Problem("mlp", retrain_tolerance=1e-9) if not args.quick else QUICK_LDS_PROBLEM
            train, test = problem.data()
            model = common.trained_model(problem, train)
            task = problem.task()
            p_q = correct_probability(model, test)
            n = len(train[0])
            runs = []
            for k in args.peer_dims:
                if library == "datatrace":
                    variants: list[tuple[str, Any]] = [("", None)]
                elif library == "dattri-logra":
                    variants = [("", None)]
                else:
                    variants = [
                        ("shipped ridge 0", 0.0),
                        ("ridge = L2", ridge_for(library, n, problem.weight_decay, k)),
                    ]
                for label, ridge in variants:
                    run: dict[str, Any] = {"k": k, "variant": label, "ridge": ridge}
                    try:
                        if library == "datatrace":
                            res = _run_datatrace(
                                model,
                                task,
                                train,
                                [test],
                                RandomProjector(dim=k),
                                n,
                                workdir / f"k{k}",
                                torch.float64,
                            )
                            scores = res["raw"][0]
                        else:
                            width = round(k**0.5)
                            res = _run_peer(library, model, train, [test], k, ridge, n, workdir, width)
                            scores = to_datatrace_units(library, res["raw"][0], p_q, n, n)
                        name = f"scores-k{k}-{len(runs)}.npy"
                        np.save(workdir / name, scores)
                        run.update(
                            file=name,
                            seconds_fit=res["seconds_fit"],
                            seconds_score=res["query_seconds"][0],
                            settings=res.get("settings"),
                        )
                    except Exception as error:
                        run.update(status="failed", reason=f"{type(error).__name__}: {error}"[:800])
                    runs.append(run)
            out["runs"] = runs
    except PeerUnavailable as error:
        out = {"library": library, "status": "not available", "reason": str(error)}
    except Exception as error:  # a peer that fails as shipped is a result too
        out = {
            "library": library,
            "status": "failed",
            "reason": f"{type(error).__name__}: {error}"[:1500],
            "traceback": traceback.format_exc(limit=8)[-3000:],
        }
    return out


QUICK_LDS_PROBLEM = Problem(
    "mlp", n_train=200, n_test=40, hidden=16, base_max_iter=1000, retrain_max_iter=300
)


def _spawn_peer(
    args: argparse.Namespace, library: str, problem: str, workdir: str, **extra: Any
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child-peer",
        library,
        "--child-problem",
        problem,
        "--child-workdir",
        workdir,
    ]
    for flag in ("width", "n_query", "batch_size"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    if args.quick:
        cmd.append("--quick")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=args.peer_timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {
            "library": library,
            "status": "timed out",
            "reason": f"over --peer-timeout {args.peer_timeout} s",
        }
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()
        return {
            "library": library,
            "status": "failed",
            "reason": tail[-1] if tail else f"exit {proc.returncode}",
        }
    return json.loads(lines[-1])


def _agreement(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Per-query Pearson r, pooled Pearson r and least-squares slope on the reference (datatrace) scores."""
    a, b = scores.astype(np.float64), reference.astype(np.float64)
    pooled = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    return {
        "corr_datatrace": row_pearson(torch.from_numpy(a), torch.from_numpy(b)),
        "corr_datatrace_pooled": pooled,
        "slope_on_datatrace": float(a.ravel() @ b.ravel() / (b.ravel() @ b.ravel())),
    }


def _factorized_dim(width: int) -> int:
    """k of ``FactorizedProjector(width, width)`` on the scale model: min(w, out) x min(w, in) per Linear."""
    return sum(
        min(width, m.out_features) * min(width, m.in_features)
        for m in scale_model(0)
        if isinstance(m, nn.Linear)
    )


def run_peers(args: argparse.Namespace) -> dict[str, Any]:
    libraries = ["datatrace", *args.peers]
    scale_rows: list[dict[str, Any]] = []
    for n in args.peer_sizes:
        reference, dim = None, None
        for library in libraries:
            with tempfile.TemporaryDirectory(dir=args.store_root, prefix="bench-store-peer-") as workdir:
                extra: dict[str, Any] = {"child_scale": n}
                if (
                    library != "datatrace"
                ):  # datatrace's k (FactorizedProjector on this model), else its formula
                    extra["peer_dim"] = dim or _factorized_dim(args.width)
                print(f"[peers] {library} n={n:,} ...", flush=True)
                row = _spawn_peer(args, library, "scale", workdir, **extra)
                row.setdefault("n_train", n)
                scores_path = Path(workdir) / "scores.npy"
                if row.get("status") == "ok" and scores_path.exists():
                    scores = np.load(scores_path)
                    if library == "datatrace":
                        reference, dim = scores, row["dim"]
                    elif reference is not None and row.get("finite"):
                        row.update(_agreement(scores, reference))
            scale_rows.append(row)
            print("        " + _peer_line(row), flush=True)
    lds_rows: list[dict[str, Any]] = []
    problem = QUICK_LDS_PROBLEM if args.quick else Problem("mlp", retrain_tolerance=1e-9)
    n_subsets, n_seeds = (12, 1) if args.quick else (60, 2)
    lds_libraries = ["datatrace", *(name for name in args.peers if name in LDS_PEERS)]
    result = {
        "scale": scale_rows,
        "lds": lds_rows,
        "lds_problem": problem.describe(),
        "lds_ground_truth": f"{n_subsets} random half subsets x {n_seeds} seed(s), cached (bench_curvature.py)",
    }
    if len(lds_libraries) == 1:  # no chosen peer takes part in the LDS table: keep the file's LDS rows
        print("[peers] LDS: none of the chosen peers is in LDS_PEERS; LDS rows left as they are", flush=True)
        return result
    print(f"[peers] LDS on {problem.describe()} ...", flush=True)
    truth = common.subset_truth(problem, n_subsets, n_seeds, n_jobs=args.jobs, progress=False)
    references: dict[int, np.ndarray] = {}
    for library in lds_libraries:
        with tempfile.TemporaryDirectory(prefix="bench-store-peer-") as workdir:
            dims = ",".join(str(d) for d in args.peer_dims)
            out = _spawn_peer(args, library, "lds", workdir, peer_dims=dims)
            if out.get("status") != "ok":
                lds_rows.append({"library": library, **out})
                print(f"      {library}: {out.get('status')}: {out.get('reason')}", flush=True)
                continue
            for run in out["runs"]:
                row = {"library": library, **{k: v for k, v in run.items() if k != "file"}}
                if run.get("file"):
                    scores = np.load(Path(workdir) / run["file"])
                    if not np.isfinite(scores).all():
                        row.update(status="non-finite")
                    else:
                        res = metrics.lds(scores, truth.masks, truth.outputs)
                        row.update(status="ok", lds=float(res.mean))
                        if library == "datatrace":
                            references[run["k"]] = scores
                        elif run["k"] in references:
                            row.update(_agreement(scores, references[run["k"]]))
                lds_rows.append(row)
                print(
                    f"      {library} k={run['k']} {run.get('variant', '')}: LDS {common.fmt(row.get('lds'))}, "
                    f"corr datatrace {common.fmt(row.get('corr_datatrace'))}",
                    flush=True,
                )
    return result


SCALE_PEER_COLUMNS = [
    ("library", "library"),
    ("n_train", "n"),
    ("dim", "k"),
    ("seconds_fit", "fit s"),
    ("fit_over_forward_backward", "fit/fb"),
    ("seconds_query_1", "query s"),
    ("seconds_query_2", "2nd query s"),
    ("query_2_over_forward_backward", "2nd q/fb"),
    ("peak_rss_mib", "peak MiB"),
    ("fit_extra_peak_mib", "fit extra MiB"),
    ("corr_datatrace", "r datatrace"),
    ("status", "status"),
]
LDS_PEER_COLUMNS = [
    ("library", "library"),
    ("variant", "ridge"),
    ("k", "k"),
    ("lds", "LDS"),
    ("corr_datatrace", "r datatrace"),
    ("slope_on_datatrace", "slope"),
    ("seconds_fit", "fit s"),
    ("seconds_score", "score s"),
    ("status", "status"),
]


def _order(row: dict[str, Any]) -> tuple:
    names = ["datatrace", *PEERS]
    library = row.get("library")
    return (names.index(library) if library in names else len(names), str(library))


def merge_peer_rows(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The file's previous peer results ``old`` updated with this run's ``new`` ones: a scale row replaces the old
    row of the same library and n (the others are kept); LDS rows are replaced per library (all of a library's
    rows when it ran here, none when the LDS table was not run). Returns the merged dict and what was kept."""
    merged = dict(new)
    kept: list[str] = []
    fresh = {(r.get("library"), r.get("n_train")) for r in new["scale"]}
    old_scale = [r for r in old.get("scale", []) if (r.get("library"), r.get("n_train")) not in fresh]
    kept += [f"scale {r.get('library')} n={r.get('n_train')}" for r in old_scale]
    merged["scale"] = sorted(old_scale + new["scale"], key=lambda r: (r.get("n_train") or 0, *_order(r)))
    ran = {r.get("library") for r in new["lds"]}
    old_lds = [r for r in old.get("lds", []) if r.get("library") not in ran]
    kept += sorted({f"lds {r.get('library')}" for r in old_lds})
    merged["lds"] = sorted(old_lds + new["lds"], key=_order)  # stable: a library's rows keep their order
    if not new["lds"]:
        for key in ("lds_problem", "lds_ground_truth"):
            if key in old:
                merged[key] = old[key]
    return merged, kept


def write_peers(args: argparse.Namespace, peers: dict[str, Any]) -> None:
    """Write ``store_peers.json`` (``store_peers_quick.json`` with ``--quick``) and print the two peer tables.

    Rows are MERGED into the file's existing ones (``merge_peer_rows``): a run of some peers or sizes replaces the
    rows of the same library and n and keeps every other row; ``settings`` is this run's, ``runs`` lists each run's
    settings and environment."""
    name = "store_peers_quick" if args.quick else "store_peers"
    path = RESULTS / f"{name}.json"
    old: dict[str, Any] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
    peers, kept = merge_peer_rows(old, peers)
    environment = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": 1,
        "load_average_at_start": os.getloadavg(),
        "versions": common.versions(["traker", "dattri", "kronfluence"]),
    }
    settings = {
        "peers": args.peers,
        "peer_sizes": args.peer_sizes,
        "peer_dims": args.peer_dims,
        "peer_timeout": args.peer_timeout,
        "width": args.width,
        "n_query": args.n_query,
        "batch_size": args.batch_size,
    }
    runs = old.get("runs") or (
        [{"settings": old["settings"], "environment": old.get("environment")}] if "settings" in old else []
    )
    runs = [*runs, {"settings": settings, "environment": environment, "kept_from_earlier_runs": kept}]
    result = {
        "benchmark": "projected-gradient store / projected influence against TRAK (traker, dattri), dattri LoGra "
        "and kronfluence EK-FAC",
        "meaning": datatrace.scores.MEANING,
        "environment": environment,
        "settings": settings,
        "runs": runs,
        "peers": {name: {"package": pkg, "run": what} for name, (pkg, _, what) in PEERS.items()},
        "conversions": CONVERSIONS,
        "notes": [
            "scale: the synthetic problem of part 1 (untrained MLP, p = 22,026), datatrace = ProjectedInfluence "
            "with FactorizedProjector(width, width) and the exact projected Gauss-Newton, store on disk; peers at "
            "datatrace's k with a Gaussian projection; each library and n in a fresh process (1 torch thread)",
            "scale: the TRAK ridge is matched to the model's L2 (ridge_for): with the shipped ridge 0, "
            "Phi^T Phi is singular whenever n < k",
            "scale: 'r datatrace' = per-query Pearson r with datatrace's scores of the same n (no ground truth on "
            "synthetic data); '2nd query s' = a second query set of the same size on the fitted state",
            "scale: kronfluence is unprojected (k = p) EK-FAC: its 'fit s' is fit_all_factors, each 'query s' one "
            "compute_pairwise_scores + load_pairwise_scores, which recomputes all n training gradients for every new "
            "query set (kronfluence issue #40); '2nd q/fb' = 2nd query s over one forward+backward pass",
            "lds: digits MLP of bench_curvature.py (p = 2,410), datatrace = ProjectedInfluence(RandomProjector(dim=k)) "
            "float64; 'r datatrace' against datatrace at the same k",
            "rows are merged across runs: each run replaces the rows of the libraries and n it ran (scale) or of "
            "the libraries it ran (LDS) and keeps the rest; datatrace's scores are deterministic (seeded data, model "
            "and projection), so a kept peer row's 'r datatrace' stays valid against a re-run datatrace row",
        ],
        **peers,
    }
    common.write_json(path, result)
    print()
    print("Peers - scale (synthetic MLP)")
    print(common.table(peers["scale"], SCALE_PEER_COLUMNS))
    print()
    print(f"Peers - LDS ({peers['lds_problem']})")
    print(common.table(peers["lds"], LDS_PEER_COLUMNS))
    print(f"wrote {RESULTS / f'{name}.json'}")


def _peer_line(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')}: {row.get('reason')}"
    return (
        f"fit {row['seconds_fit']:.1f} s ({row['fit_over_forward_backward']:.0f}x fwd+bwd), query "
        f"{row['seconds_query_1']:.2f} s, 2nd query {row['seconds_query_2']:.2f} s, peak {row['peak_rss_mib']:.0f} MiB"
        + (f", corr datatrace {row['corr_datatrace']:.3f}" if "corr_datatrace" in row else "")
    )


# ==============================================================================================================
# Main
# ==============================================================================================================
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part",
        default="scale,lds,peers",
        help="scale, lds and/or peers (comma-separated; peers: see --peers)",
    )
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
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"peer libraries of the peers part, comma-separated (of {', '.join(PEERS)}); missing ones are "
        "reported as not available",
    )
    parser.add_argument("--skip-peers", action="store_true", help="do not run the peers part")
    parser.add_argument("--peer-sizes", default="1000,10000,100000", help="training set sizes (peers, scale)")
    parser.add_argument("--peer-dims", default="128,256,512,1024,2048", help="projection dims (peers, LDS)")
    parser.add_argument("--peer-timeout", type=int, default=300, help="seconds allowed per peer run")
    parser.add_argument("--child-scale", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-peer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-problem", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peer-dim", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_peer is not None:
        torch.set_num_threads(1)
        args.peer_dims = [int(d) for d in args.peer_dims.split(",")]
        print(json.dumps(common.to_jsonable(peer_child(args))))
        return
    if args.child_scale is not None:
        print(json.dumps(common.to_jsonable(scale_child(args))))
        return
    args.peers = [name for name in args.peers.split(",") if name]
    unknown = [name for name in args.peers if name not in PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}; known: {list(PEERS)}")
    args.peer_sizes = [int(s) for s in args.peer_sizes.split(",")]
    args.peer_dims = [int(d) for d in args.peer_dims.split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.hidden = [int(h) for h in args.hidden.split(",")]
    args.dims = [int(d) for d in args.dims.split(",")]
    args.widths = [int(w) for w in args.widths.split(",")]
    if args.quick:
        args.sizes, args.hidden, args.dims, args.widths = [500, 2000], [32], [64, 128], [4, 8]
        args.peer_sizes, args.peer_dims = [500], [64]
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
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("child_") and k != "peer_dim"},
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
    if "peers" in parts and not args.skip_peers:
        write_peers(args, run_peers(args))
        if not parts & {"scale", "lds"}:
            return
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
