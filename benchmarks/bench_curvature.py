"""Scalable curvature: every inverse-curvature route of datatrace, and its peers, against actual retraining.

Two problems, identical for every method (``benchmarks/common.py`` builds them):

* **logreg** - multinomial logistic regression (``nn.Linear(64, 10)``, float64) with L2 ``1e-3`` on sklearn digits
  (``X / 16``, seeded split, 1,000 train / 200 test), trained to a tight minimum with full-batch L-BFGS. Accuracy
  = Pearson correlation between estimated and actual leave-one-out (LOO) changes of the 200 test losses, for
  ``--n-loo`` random training examples actually left out (warm-started L-BFGS retraining).
* **mlp** - ``Linear(64, 32) -> tanh -> Linear(32, 10)`` (float64, L2 ``1e-3``), same data. Accuracy = linear
  datamodeling score (LDS, Park et al. 2023) against ``--n-subsets`` random half subsets, each retrained from a
  seeded random init ``--n-seeds`` times (two seeds give the noise ceiling).

Ground truth is cached under ``benchmarks/results/cache/`` (named after a hash of the data and training protocol),
so reruns only pay for the methods. Each method runs in a fresh subprocess that measures: wall time of fit + score
(all 200 queries x all training examples), peak resident memory, and - in the same process - the median time of
ONE plain forward+backward pass of the mean loss over the whole training set, whose ratio to the method's time is
reported. Scores of every library are converted to datatrace's units and sign before any metric:
``score[q, i] ~ f_q(theta_{-i}) - f_q(theta_hat)``, the change of test example ``q``'s loss when training example
``i`` is removed (positive: ``i`` helped ``q``).

Usage::

    python benchmarks/bench_curvature.py                      # everything (~20 min on 2 quiet cores, less cached)
    python benchmarks/bench_curvature.py --quick              # CI-sized smoke run (small data, in-process)
    python benchmarks/bench_curvature.py --routes exact,ekfac,kronfluence-ekfac --problems mlp
    python benchmarks/bench_curvature.py --skip-peers --mlp-damping 1e-3
    python benchmarks/bench_curvature.py --list               # which methods are available here

Writes ``benchmarks/results/curvature.json`` (``curvature_quick.json`` with ``--quick``) and prints the tables.
Methods, one line each, are in ``ROUTES`` and ``PEERS`` below; a method whose library or route is missing is
reported as "not available" with the reason, never a crash.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import importlib
import inspect
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import datatrace
from common import Measure, Problem
from datatrace.verification import metrics


# ==============================================================================================================
# Configuration: one line per method
# ==============================================================================================================
@dataclass(frozen=True)
class Method:
    """A method to benchmark. ``library`` picks the runner; ``target`` is the datatrace route name or the peer's
    solver; ``options`` go to its constructor. ``damping`` for datatrace routes comes from the command line."""

    label: str
    library: str
    target: str
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


ROUTES = [
    Method("auto", "datatrace", "auto"),
    Method("exact", "datatrace", "exact"),
    Method("gauss-newton", "datatrace", "gauss-newton"),
    Method("cg", "datatrace", "cg"),
    Method("lissa", "datatrace", "lissa"),
    Method("cg-ekfac", "datatrace", "cg", {"preconditioner": "ekfac"}, "EK-FAC-preconditioned"),
    Method("cg-gn", "datatrace", "cg", {"matrix": "gauss-newton"}, "Gauss-Newton products"),
    Method(
        "cg-gn-ekfac",
        "datatrace",
        "cg",
        {"matrix": "gauss-newton", "preconditioner": "ekfac"},
        "Gauss-Newton, EK-FAC-preconditioned",
    ),
    Method("arnoldi-200", "datatrace", "arnoldi", {"rank": 200}),
    Method("arnoldi-50", "datatrace", "arnoldi", {"rank": 50}),
    Method("block-diagonal", "datatrace", "block-diagonal"),
    Method("diagonal", "datatrace", "diagonal"),
    Method("identity", "datatrace", "identity"),
    Method("kfac", "datatrace", "kfac"),
    Method("ekfac", "datatrace", "ekfac"),
    Method("kfac-weighted", "datatrace", "kfac", {"input_factor": "weighted"}, "weighted input factor"),
    Method("ekfac-mean", "datatrace", "ekfac", {"input_factor": "mean"}, "classic mean input factor"),
]

# Peers: float64 wherever the library allows it; their regulariser set to the model's L2 strength in their own
# units (all of them see the Hessian/Fisher of the *mean* loss without the L2 term, so "+ weight_decay * I" makes it
# the curvature of the training objective); everything else as their docs ship it. "wd" stands for weight_decay.
PEERS = [
    Method("kronfluence-ekfac", "kronfluence", "ekfac", {"damping": "wd"}, "damping_factor = weight decay"),
    Method("kronfluence-kfac", "kronfluence", "kfac", {"damping": "wd"}, "damping_factor = weight decay"),
    Method(
        "kronfluence-ekfac-default", "kronfluence", "ekfac", {"damping": 1e-8}, "shipped damping_factor=1e-8"
    ),
    Method(
        "kronfluence-ekfac-heuristic",
        "kronfluence",
        "ekfac",
        {"damping": None},
        "damping 0.1 x mean eigenvalue",
    ),
    Method("dattri-explicit", "dattri", "explicit", {"regularization": "wd"}),
    Method("dattri-cg", "dattri", "cg", {"regularization": "wd"}, "shipped max_iter=10"),
    Method(
        "dattri-arnoldi",
        "dattri",
        "arnoldi",
        {"regularization": "wd", "proj_dim": 200, "max_iter": 300},
        "max_iter > proj_dim: with max_iter = proj_dim it returns NaN",
    ),
    Method(
        "dattri-lissa",
        "dattri",
        "lissa",
        {"damping": "wd/scaling"},
        "defaults: batch 1, depth 5000, scale 50",
    ),
    Method("dattri-datainf", "dattri", "datainf", {"regularization": "wd"}),
    Method("dattri-ekfac", "dattri", "ekfac", {"damping": "wd"}, "empirical Fisher (its target function)"),
    Method("pydvl-direct", "pydvl", "direct", {"regularization": "wd"}),
    Method("pydvl-cg", "pydvl", "cg", {"regularization": "wd", "solve_simultaneously": True}, "block CG"),
    Method("pydvl-arnoldi", "pydvl", "arnoldi", {"regularization": "wd", "rank": 200}),
    Method("pydvl-lissa", "pydvl", "lissa", {"regularization": "wd"}),
    Method("pydvl-ekfac", "pydvl", "ekfac", {"hessian_regularization": "wd", "update_diagonal": True}),
    Method("pydvl-kfac", "pydvl", "ekfac", {"hessian_regularization": "wd", "update_diagonal": False}),
]

# How each library's raw pairwise score maps to datatrace's (derived from its docs and code; each is checked
# empirically on logistic regression against datatrace's exact scores: see "slope vs exact" in the tables).
CONVERSIONS = {
    "datatrace": "none",
    "kronfluence": "raw / n_train (raw = grad f_q^T (F + damping)^-1 grad l_i, no 1/n, same sign)",
    "dattri": "raw.T / n_train (raw[i, q] = grad l_i^T (H + reg)^-1 grad f_q, train-major, no 1/n, same sign)",
    "pydvl": "raw / n_train (influences(mode='up') = grad f_q^T (H + reg)^-1 grad l_i as its docstring says, "
    "no 1/n, same sign)",
}
SIGN = {"datatrace": 1.0, "kronfluence": 1.0, "dattri": 1.0, "pydvl": 1.0}

DEFAULT_DAMPING_GRID = "0,1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1"
#: label -> (route, options) for the damping study on the MLP
GRID_ROUTES = {
    "exact": ("exact", {}),
    "exact-abs": ("exact", {"negative": "abs"}),
    "gauss-newton": ("gauss-newton", {}),
    "ekfac": ("ekfac", {}),
    "kfac": ("kfac", {}),
}

PEER_PACKAGES = {"kronfluence": "kronfluence", "dattri": "dattri", "pydvl": "pyDVL"}


# ==============================================================================================================
# datatrace routes
# ==============================================================================================================
class Unavailable(RuntimeError):
    """The method cannot run here (library or route missing); the message says why."""


_ROUTE_MODULES = (
    "dense",
    "auto",
    "cg",
    "lissa",
    "arnoldi",
    "diagonal",
    "block_diagonal",
    "identity",
    "kfac",
)


def resolve_curvature(name: str, damping: Any, options: dict[str, Any]) -> Any:
    """A datatrace curvature for route ``name``: the registry first, then any ``Curvature`` subclass with that
    ``name`` in the modules ``datatrace.curvature.<_ROUTE_MODULES>`` (routes written but not registered)."""
    from datatrace import curvature as registry

    if name in registry.available():
        try:
            return registry.make_curvature(name, damping=damping, **options)
        except TypeError as error:
            raise Unavailable(f"route {name!r} rejected options {options}: {error}") from None
    found, missing = None, []
    for module_name in _ROUTE_MODULES:
        try:
            module = importlib.import_module(f"datatrace.curvature.{module_name}")
        except ImportError as error:
            missing.append(f"{module_name} ({error.__class__.__name__}: {error})")
            continue
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, registry.Curvature)
                and getattr(obj, "name", None) == name
                and not inspect.isabstract(obj)
            ):
                found = obj
                break
        if found is not None:
            break
    if found is None:
        raise Unavailable(
            f"no datatrace route named {name!r}: registered {registry.available()}, and no Curvature subclass "
            f"with name={name!r} in datatrace.curvature modules"
            + (f" (not importable: {', '.join(missing)})" if missing else "")
        )
    params = inspect.signature(found).parameters
    kwargs = dict(options)
    if "damping" in params:
        kwargs["damping"] = damping
    elif damping != "auto":
        raise Unavailable(f"{found.__name__} takes no damping, but damping={damping!r} was asked for")
    try:
        return found(**kwargs)
    except TypeError as error:
        raise Unavailable(f"{found.__name__}{inspect.signature(found)} rejected {kwargs}: {error}") from None


def run_datatrace(method: Method, ctx: dict[str, Any]) -> dict[str, Any]:
    curvature = resolve_curvature(method.target, ctx["damping"], method.options)
    start = time.perf_counter()
    influence = datatrace.InfluenceFunction(ctx["model"], ctx["task"], curvature=curvature, progress=False)
    influence.fit(ctx["train"])
    fit_seconds = time.perf_counter() - start
    scores = influence.score(ctx["test"]).values
    return {
        "raw": scores.detach().to(torch.float64).numpy(),
        "fit_seconds": fit_seconds,
        "info": influence.curvature_.info,
        "settings": {"curvature": repr(curvature), "damping": ctx["damping"]},
    }


# ==============================================================================================================
# Peers
# ==============================================================================================================
def _wd(value: Any, weight_decay: float, scale: float = 1.0) -> Any:
    if value == "wd":
        return weight_decay
    if value == "wd/scaling":
        return weight_decay / scale
    return value


def _in_container(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy; a bare ``nn.Linear`` (logistic regression) goes inside ``nn.Sequential`` (same function and
    parameters), because kronfluence and dattri's EK-FAC only find *sub*modules (a bare root Linear recurses or
    is missed)."""
    model = copy.deepcopy(model)
    return torch.nn.Sequential(model) if isinstance(model, torch.nn.Linear) else model


def run_kronfluence(method: Method, ctx: dict[str, Any]) -> dict[str, Any]:
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task as KronfluenceTask
    except ImportError as error:
        raise Unavailable(f"kronfluence not importable here: {error}") from None

    class DigitsTask(KronfluenceTask):
        """As kronfluence's docs: summed training loss; ``sample=True`` draws labels from the model (true Fisher)."""

        def compute_train_loss(
            self, batch: Any, model: torch.nn.Module, sample: bool = False
        ) -> torch.Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.distributions.Categorical(logits=logits.detach()).sample()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            x, y = batch  # the query's own loss, as datatrace measures
            return F.cross_entropy(model(x), y, reduction="sum")

    train_x, train_y = ctx["train"]
    test_x, test_y = ctx["test"]
    train_set = torch.utils.data.TensorDataset(train_x, train_y)
    test_set = torch.utils.data.TensorDataset(test_x, test_y)
    damping = _wd(method.options.get("damping", "wd"), ctx["weight_decay"])
    f64 = torch.float64
    torch.manual_seed(0)  # the sampled labels of the true Fisher
    start = time.perf_counter()
    task = DigitsTask()
    model = prepare_model(_in_container(ctx["model"]), task)
    analyzer = Analyzer(
        analysis_name="bench", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=ctx["workdir"]
    )
    factor_args = FactorArguments(
        strategy=method.target,
        activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64,
        per_sample_gradient_dtype=f64,
        lambda_dtype=f64,
        eigendecomposition_dtype=f64,
    )
    analyzer.fit_all_factors(
        factors_name="factors",
        dataset=train_set,
        per_device_batch_size=len(train_set),
        factor_args=factor_args,
        overwrite_output_dir=True,
    )
    fit_seconds = time.perf_counter() - start
    score_args = ScoreArguments(
        damping_factor=damping,
        query_gradient_svd_dtype=f64,
        per_sample_gradient_dtype=f64,
        precondition_dtype=f64,
        score_dtype=f64,
    )
    analyzer.compute_pairwise_scores(
        scores_name="scores",
        factors_name="factors",
        query_dataset=test_set,
        train_dataset=train_set,
        per_device_query_batch_size=len(test_set),
        per_device_train_batch_size=len(train_set),
        score_args=score_args,
        overwrite_output_dir=True,
    )
    raw = analyzer.load_pairwise_scores(scores_name="scores")["all_modules"]
    return {
        "raw": raw.detach().to(torch.float64).numpy(),
        "fit_seconds": fit_seconds,
        "settings": {
            "strategy": method.target,
            "damping_factor": damping,
            "fisher": "true Fisher (labels sampled from the model; kronfluence default)",
            "dtypes": "float64 everywhere (factor and score arguments)",
        },
    }


def run_dattri(method: Method, ctx: dict[str, Any]) -> dict[str, Any]:
    try:
        from dattri.algorithm import influence_function as dif
        from dattri.task import AttributionTask
    except ImportError as error:
        raise Unavailable(f"dattri not importable here: {error}") from None
    classes = {
        "explicit": "IFAttributorExplicit",
        "cg": "IFAttributorCG",
        "arnoldi": "IFAttributorArnoldi",
        "lissa": "IFAttributorLiSSA",
        "datainf": "IFAttributorDataInf",
        "ekfac": "IFAttributorEKFAC",
    }
    cls = getattr(dif, classes[method.target], None)
    if cls is None:
        raise Unavailable(f"dattri {dif.__name__} has no {classes[method.target]}")
    options = {key: _wd(value, ctx["weight_decay"], scale=50.0) for key, value in method.options.items()}
    dtype = getattr(torch, options.pop("dtype", "float64"))
    torch.set_default_dtype(dtype)  # dattri allocates its score matrix with the default dtype
    model = _in_container(ctx["model"]).to(dtype)
    train = (ctx["train"][0].to(dtype), ctx["train"][1])
    test = (ctx["test"][0].to(dtype), ctx["test"][1])

    def loss_func(params: Any, data_target_pair: tuple) -> torch.Tensor:
        # mean loss, as dattri's README; labels cast with .long() as its examples do, and inputs cast back to the
        # model's dtype, because its LiSSA sampler casts every data tensor to float32 (X/16 is exact in float32)
        x, y = data_target_pair
        return F.cross_entropy(torch.func.functional_call(model, params, x.to(dtype)), y.long())

    train_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*train), batch_size=len(train[0]), shuffle=False
    )
    test_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*test), batch_size=len(test[0]), shuffle=False
    )
    start = time.perf_counter()
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    attributor = cls(task=task, device="cpu", **options)
    attributor.cache(train_loader)
    fit_seconds = time.perf_counter() - start
    with torch.no_grad():  # as dattri's README does around attribute()
        raw = attributor.attribute(train_loader, test_loader)
    return {
        "raw": raw.detach().to(torch.float64).numpy().T,  # dattri is (n_train, n_test)
        "fit_seconds": fit_seconds,
        "settings": {
            "attributor": cls.__name__,
            **options,
            "batches": "the whole training set as one batch (as dattri's README), queries as one batch",
            "dtype": f"{dtype} model and default dtype",
        },
    }


def run_pydvl(method: Method, ctx: dict[str, Any]) -> dict[str, Any]:
    try:
        from pydvl.influence import InfluenceMode
        from pydvl.influence import torch as pit
    except ImportError as error:
        raise Unavailable(f"pyDVL's influence module not importable here: {error}") from None
    classes = {
        "direct": "DirectInfluence",
        "cg": "CgInfluence",
        "arnoldi": "ArnoldiInfluence",
        "lissa": "LissaInfluence",
        "ekfac": "EkfacInfluence",
    }
    cls = getattr(pit, classes[method.target], None)
    if cls is None:
        raise Unavailable(f"pyDVL has no {classes[method.target]}")
    torch.set_default_dtype(torch.float64)  # pyDVL's EK-FAC allocates its factors with the default dtype
    model = copy.deepcopy(ctx["model"])
    options = {k: _wd(v, ctx["weight_decay"]) for k, v in method.options.items()}
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*ctx["train"]), batch_size=len(ctx["train"][0]), shuffle=False
    )
    start = time.perf_counter()
    if method.target == "ekfac":
        influence = cls(model, **options)
    else:
        influence = cls(model, F.cross_entropy, **options)
    influence = influence.fit(loader)
    fit_seconds = time.perf_counter() - start
    (x_test, y_test), (x_train, y_train) = ctx["test"], ctx["train"]
    raw = influence.influences(x_test, y_test, x_train, y_train, mode=InfluenceMode.Up)
    return {
        "raw": torch.as_tensor(raw).detach().to(torch.float64).numpy(),
        "fit_seconds": fit_seconds,
        "settings": {"class": cls.__name__, **options, "loss": "F.cross_entropy (mean)", "mode": "up"},
    }


RUNNERS = {
    "datatrace": run_datatrace,
    "kronfluence": run_kronfluence,
    "dattri": run_dattri,
    "pydvl": run_pydvl,
}


def to_datatrace_units(library: str, raw: np.ndarray, n_train: int) -> np.ndarray:
    """Convert a library's (n_query, n_train) raw scores to datatrace's units and sign (see ``CONVERSIONS``)."""
    if library == "datatrace":
        return raw
    return SIGN[library] * raw / n_train


# ==============================================================================================================
# Worker: one method in one fresh process
# ==============================================================================================================
def load_context(problem: Problem, damping: Any, workdir: str) -> dict[str, Any]:
    train, test = problem.data()
    model = common.trained_model(problem, train)
    return {
        "problem": problem,
        "train": train,
        "test": test,
        "model": model,
        "task": problem.task(),
        "weight_decay": problem.weight_decay,
        "damping": damping,
        "workdir": workdir,
    }


def _import_library(library: str) -> None:
    """Import the library up front, so that its import memory is not counted as the method's."""
    names = {
        "kronfluence": ["kronfluence.analyzer"],
        "dattri": ["dattri.algorithm.influence_function"],
        "pydvl": ["pydvl.influence.torch"],
        "datatrace": ["datatrace.curvature"],
    }[library]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise Unavailable(f"{library} is not installed or not importable here ({error})") from None
    if library == "datatrace":
        for module_name in _ROUTE_MODULES:
            try:
                importlib.import_module(f"datatrace.curvature.{module_name}")
            except ImportError:
                pass


def run_one(method: Method, problem: Problem, damping: Any, workdir: str) -> dict[str, Any]:
    """Run ``method`` on ``problem`` in this process: returns scores in datatrace units plus measurements."""
    out: dict[str, Any] = {"status": "ok"}
    try:
        _import_library(method.library)
        ctx = load_context(problem, damping, workdir)
        fb = common.forward_backward_seconds(ctx["model"], ctx["task"], ctx["train"])
        # the forward-backward above and the imports set the baseline; run the method
        with Measure() as measured:
            result = RUNNERS[method.library](method, ctx)
        scores = to_datatrace_units(method.library, result.pop("raw"), problem.n_train)
        if scores.shape != (problem.n_test, problem.n_train):
            raise ValueError(
                f"scores have shape {scores.shape}, expected {(problem.n_test, problem.n_train)}"
            )
        if not np.isfinite(scores).all():
            out["status"] = "non-finite"
            out["reason"] = f"{int((~np.isfinite(scores)).sum())} scores are NaN or inf"
        out.update(
            scores=scores,
            seconds=measured.seconds,
            fit_seconds=result.get("fit_seconds"),
            score_seconds=(measured.seconds - result["fit_seconds"]) if result.get("fit_seconds") else None,
            fb_seconds=fb,
            ratio_to_fb=measured.seconds / fb,
            peak_rss_mib=measured.peak_rss_mib,
            extra_peak_mib=measured.extra_peak_mib,
            peak_set_in_block=measured.peak_was_set_in_block,
            info=result.get("info"),
            settings=result.get("settings"),
        )
    except Unavailable as error:
        out = {"status": "not available", "reason": str(error)}
    except Exception as error:  # a peer (or a route) that fails as shipped is a result too
        tb = traceback.format_exc(limit=6)
        out = {
            "status": "failed",
            "reason": f"{type(error).__name__}: {error}"[:1500],
            "traceback": tb[-3000:],
        }
    return out


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    logging.basicConfig(level=logging.WARNING)
    problem = Problem(**spec["problem"])
    method = Method(**spec["method"])
    out = run_one(method, problem, spec["damping"], spec["workdir"])
    scores = out.pop("scores", None)
    if scores is not None:
        np.save(Path(spec["workdir"]) / "scores.npy", scores)
    (Path(spec["workdir"]) / "result.json").write_text(json.dumps(common.to_jsonable(out)))


def run_isolated(method: Method, problem: Problem, damping: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Run one method in a fresh subprocess (its own memory high-water mark); in-process with ``--in-process``."""
    with tempfile.TemporaryDirectory(prefix="bench-curvature-") as workdir:
        if args.in_process:
            out = run_one(method, problem, damping, workdir)
            out["isolated"] = False
            return out
        spec = {
            "problem": asdict(problem),
            "method": asdict(method),
            "damping": damping,
            "threads": args.threads,
            "workdir": workdir,
        }
        spec_path = Path(workdir) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        env["PYTHONWARNINGS"] = "ignore"
        try:
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                capture_output=True,
                text=True,
                timeout=args.timeout,
                env=env,
            )
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "reason": f"did not finish within --timeout {args.timeout} s"}
        result_path = Path(workdir) / "result.json"
        if not result_path.exists():
            return {
                "status": "failed",
                "reason": f"worker exited with code {proc.returncode}: {proc.stderr[-1500:]}",
            }
        out = json.loads(result_path.read_text())
        scores_path = Path(workdir) / "scores.npy"
        if scores_path.exists():
            out["scores"] = np.load(scores_path)
        out["isolated"] = True
        return out


# ==============================================================================================================
# Metrics
# ==============================================================================================================
def agreement(scores: np.ndarray, reference: np.ndarray | None) -> dict[str, float | None]:
    """Pooled Pearson correlation with, and least-squares slope on, the reference (datatrace exact) scores."""
    if reference is None or scores is None:
        return {"corr_vs_exact": None, "slope_vs_exact": None}
    a, b = scores.ravel(), reference.ravel()
    denom = float(b @ b)
    corr = float(metrics.pearson(a, b)) if np.ptp(a) > 0 else float("nan")
    return {"corr_vs_exact": corr, "slope_vs_exact": float(a @ b) / denom if denom else None}


def score_row(problem_name: str, truth: Any, out: dict[str, Any], idx: np.ndarray | None) -> dict[str, Any]:
    scores = out.get("scores")
    row: dict[str, Any] = {}
    if scores is None or not np.isfinite(scores).all():
        return row
    if problem_name == "logreg":
        corr = metrics.loo_correlation(scores[:, idx], truth.changes)
        row.update(
            loo_mean_pearson=float(corr.mean_pearson),
            loo_pooled_pearson=float(corr.pooled_pearson),
            loo_mean_spearman=float(corr.mean_spearman),
        )
    else:
        result = metrics.lds(scores, truth.masks, truth.outputs)
        row.update(lds=float(result.mean))
    return row


# ==============================================================================================================
# Driver
# ==============================================================================================================
LOGREG_COLUMNS = [
    ("method", "method"),
    ("library", "library"),
    ("loo_mean_pearson", "LOO r (mean/query)"),
    ("loo_pooled_pearson", "LOO r (pooled)"),
    ("loo_mean_spearman", "LOO rho"),
    ("corr_vs_exact", "r vs exact"),
    ("slope_vs_exact", "slope vs exact"),
    ("seconds", "fit+score s"),
    ("ratio_to_fb", "x fwd+bwd"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("extra_peak_mib", "extra MiB"),
    ("status", "status"),
]
MLP_COLUMNS = [
    ("method", "method"),
    ("library", "library"),
    ("lds", "LDS"),
    ("corr_vs_exact", "r vs exact"),
    ("slope_vs_exact", "slope vs exact"),
    ("seconds", "fit+score s"),
    ("ratio_to_fb", "x fwd+bwd"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("extra_peak_mib", "extra MiB"),
    ("status", "status"),
]
GRID_COLUMNS = [
    ("problem", "problem"),
    ("route", "route"),
    ("damping", "damping"),
    ("damping_used", "damping used"),
    ("loo_mean_pearson", "LOO r (mean/query)"),
    ("loo_pooled_pearson", "LOO r (pooled)"),
    ("lds", "LDS"),
    ("seconds", "fit+score s"),
    ("status", "status"),
]


def parse_damping(text: str) -> Any:
    return "auto" if text == "auto" else float(text)


def select_methods(args: argparse.Namespace) -> list[Method]:
    methods = list(ROUTES) + ([] if args.skip_peers else list(PEERS))
    if args.routes:
        patterns = [p.strip() for p in args.routes.split(",") if p.strip()]
        pool = list(ROUTES) + list(PEERS)
        chosen = [m for m in pool if any(fnmatch.fnmatch(m.label, p) for p in patterns)]
        unknown = [p for p in patterns if not any(fnmatch.fnmatch(m.label, p) for m in pool)]
        if unknown:
            raise SystemExit(f"--routes: no method matches {unknown}; known: {[m.label for m in pool]}")
        methods = [m for m in chosen if not (args.skip_peers and m.library != "datatrace")]
    return methods


def make_problems(args: argparse.Namespace) -> dict[str, Problem]:
    if args.quick:
        return {
            "logreg": Problem("logreg", n_train=200, n_test=40, base_max_iter=2000, retrain_max_iter=500),
            "mlp": Problem(
                "mlp",
                n_train=200,
                n_test=40,
                hidden=16,
                base_max_iter=1000,
                retrain_max_iter=200,
                retrain_tolerance=1e-8,
            ),
        }
    return {
        "logreg": Problem("logreg"),
        "mlp": Problem("mlp", retrain_tolerance=1e-9, base_max_iter=args.mlp_base_iters),
    }


def test_accuracy(model: torch.nn.Module, test: tuple) -> float:
    with torch.no_grad():
        return float((model(test[0]).argmax(dim=1) == test[1]).double().mean())


def run_grid(name: str, problem: Problem, truth: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Accuracy of selected datatrace routes over a grid of damping values: LOO r on logreg, LDS on the MLP.

    Runs in this process (times are indicative only). Dense routes form their matrix once per route and reuse it
    for every damping value (only the eigendecomposition and the damped inverse are redone)."""
    values = (
        [parse_damping(v) for v in args.damping_grid.split(",") if v.strip()] if args.damping_grid else []
    )
    labels = [g.strip() for g in args.grid_routes.split(",") if g.strip()]
    if not values or not labels:
        return []
    rows = []
    train, test = problem.data()
    model = common.trained_model(problem, train)
    task = problem.task()
    for label in labels:
        if label not in GRID_ROUTES:
            rows.append(
                {
                    "problem": name,
                    "route": label,
                    "status": "not available",
                    "reason": f"unknown grid route {label!r}; known: {sorted(GRID_ROUTES)}",
                }
            )
            continue
        route, options = GRID_ROUTES[label]
        matrix = None
        for damping in ["auto", *values]:
            row: dict[str, Any] = {"problem": name, "route": label, "damping": damping}
            try:
                curvature = resolve_curvature(route, damping, options)
                if matrix is not None:
                    curvature._matrix = lambda fmodel, data, progress, m=matrix: m  # reuse the dense matrix
                start = time.perf_counter()
                influence = datatrace.InfluenceFunction(model, task, curvature=curvature, progress=False).fit(
                    train
                )
                scores = influence.score(test).values.numpy()
                row["seconds"] = time.perf_counter() - start
                if matrix is None and hasattr(influence.curvature_, "matrix_"):
                    matrix = influence.curvature_.matrix_
                info = influence.curvature_.info
                row["damping_used"] = info.get("damping")
                row["info"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}
                if not np.isfinite(scores).all():
                    row.update(status="non-finite")
                else:
                    row.update(
                        status="ok",
                        **score_row(name, truth, {"scores": scores}, getattr(truth, "indices", None)),
                    )
            except Unavailable as error:
                row.update(status="not available", reason=str(error))
                rows.append(row)
                break
            except Exception as error:
                row.update(status="failed", reason=f"{type(error).__name__}: {error}"[:800])
            rows.append(row)
            key = "loo_mean_pearson" if name == "logreg" else "lds"
            print(
                f"  damping study {name}: {label:<14} damping={common.fmt(damping):>8}  {key}="
                f"{common.fmt(row.get(key))}  ({row.get('status')})",
                flush=True,
            )
    return rows


def acceptance(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's acceptance targets, evaluated on this run (None where a number is missing)."""
    get = lambda problem, method, key: next(  # noqa: E731
        (r.get(key) for r in results if r["problem"] == problem and r["method"] == method), None
    )
    checks = []

    def check(name: str, ok: Any, detail: str) -> None:
        checks.append({"target": name, "met": ok, "measured": detail})

    def ge(a: Any, b: Any) -> bool | None:
        return None if a is None or b is None else bool(a >= b)

    e_lds, k_lds = get("mlp", "ekfac", "lds"), get("mlp", "kronfluence-ekfac", "lds")
    e_s, k_s = get("mlp", "ekfac", "seconds"), get("mlp", "kronfluence-ekfac", "seconds")
    check(
        "EK-FAC LDS (mlp) >= kronfluence EK-FAC",
        ge(e_lds, k_lds),
        f"{common.fmt(e_lds)} vs {common.fmt(k_lds)}",
    )
    check(
        "EK-FAC wall time (mlp) <= kronfluence EK-FAC",
        ge(k_s, e_s),
        f"{common.fmt(e_s)} s vs {common.fmt(k_s)} s",
    )
    e_loo, k_loo = (
        get("logreg", "ekfac", "loo_mean_pearson"),
        get("logreg", "kronfluence-ekfac", "loo_mean_pearson"),
    )
    check(
        "EK-FAC LOO r (logreg) >= kronfluence EK-FAC",
        ge(e_loo, k_loo),
        f"{common.fmt(e_loo)} vs {common.fmt(k_loo)}",
    )
    for method in ("cg", "arnoldi-200"):
        v = get("logreg", method, "loo_mean_pearson")
        check(f"{method} LOO r (logreg) >= 0.98", ge(v, 0.98), common.fmt(v))
    for method in ("auto", "exact"):
        v = get("logreg", method, "loo_mean_pearson")
        check(f"{method} LOO r (logreg) >= 0.99", ge(v, 0.99), common.fmt(v))
        v = get("mlp", method, "lds")
        check(f"{method} LDS (mlp) >= 0.72", ge(v, 0.72), common.fmt(v))
    return checks


def markdown_report(path: Path) -> str:
    """Markdown tables (for benchmarks/README.md) from a JSON written by this script; nothing is rerun."""
    report = json.loads(Path(path).read_text())
    parts = [
        f"Measured {report['date']} ({report['command']}); load average at start "
        f"{', '.join(f'{x:.1f}' for x in report['machine']['load_average_at_start'])} on "
        f"{report['machine']['cpu_count']} cores, {report['machine']['torch_threads_per_method']} torch "
        f"thread(s) per method; versions {report['versions']}."
    ]
    for name, columns in (("logreg", LOGREG_COLUMNS), ("mlp", MLP_COLUMNS)):
        rows = [r for r in report["results"] if r["problem"] == name]
        if not rows:
            continue
        info = report["problems"][name]
        truth = info["ground_truth"]
        parts.append(
            f"**{name}** - {info['description']}; test accuracy {info['test_accuracy']:.3f}; "
            f"ground truth: {json.dumps({k: v for k, v in truth.items() if 'seconds' not in k})}"
        )
        fb = [r["fb_seconds"] for r in rows if r.get("fb_seconds")]
        if fb:
            parts.append(
                f"one forward+backward over the training set: median {1e3 * float(np.median(fb)):.2f} ms"
            )
        parts.append(common.table(rows, columns, markdown=True))
    grid = report.get("damping_study") or []
    if grid:
        parts.append("**damping study** (datatrace routes, in one process)")
        parts.append(common.table(grid, GRID_COLUMNS, markdown=True))
    if report.get("acceptance"):
        parts.append(
            "\n".join(
                f"- [{'met' if c['met'] else ('n/a' if c['met'] is None else 'NOT met')}] "
                f"{c['target']}: {c['measured']}"
                for c in report["acceptance"]
            )
        )
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: small data, few retrains, in-process"
    )
    parser.add_argument("--routes", default="", help="comma-separated method labels or globs (default: all)")
    parser.add_argument("--skip-peers", action="store_true", help="only datatrace routes")
    parser.add_argument("--problems", default="logreg,mlp", help="logreg, mlp or both")
    parser.add_argument("--logreg-damping", default="auto", help="damping of datatrace routes on logreg")
    parser.add_argument("--mlp-damping", default="auto", help="damping of datatrace routes on the MLP")
    parser.add_argument(
        "--damping-grid",
        default=None,
        help=f"damping study values, comma-separated ('' to skip; default {DEFAULT_DAMPING_GRID})",
    )
    parser.add_argument(
        "--grid-routes",
        default="exact,exact-abs,gauss-newton,ekfac,kfac",
        help=f"routes of the damping study, from {sorted(GRID_ROUTES)}",
    )
    parser.add_argument("--grid-problems", default="logreg,mlp", help="problems of the damping study")
    parser.add_argument(
        "--mlp-base-iters",
        type=int,
        default=5000,
        help="L-BFGS iterations of the MLP's base model (fewer: stopped early, an indefinite Hessian); the subset "
        "ground truth does not depend on it and is shared",
    )
    parser.add_argument("--n-loo", type=int, default=None, help="LOO retrains on logreg (default 100)")
    parser.add_argument(
        "--n-subsets", type=int, default=None, help="half subsets for the MLP's LDS (default 60)"
    )
    parser.add_argument("--n-seeds", type=int, default=None, help="retrains per subset (default 2)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel retraining jobs for the ground truth")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per method process")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per method")
    parser.add_argument(
        "--in-process", action="store_true", help="no subprocess per method (memory not isolated)"
    )
    parser.add_argument("--output", default=None, help="JSON path (default results/curvature[_quick].json)")
    parser.add_argument("--list", action="store_true", help="list methods and whether they are available")
    parser.add_argument(
        "--markdown-from", default=None, help="print Markdown tables from a result JSON and exit"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    if args.markdown_from:
        print(markdown_report(Path(args.markdown_from)))
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.in_process = True
        args.n_loo = args.n_loo or 8
        args.n_subsets = args.n_subsets or 10
        args.n_seeds = args.n_seeds or 1
        if args.damping_grid is None:
            args.damping_grid = ""
        if not args.routes:
            args.routes = "exact,gauss-newton,cg,arnoldi-50,ekfac,kfac"
    args.n_loo = args.n_loo or 100
    args.n_subsets = args.n_subsets or 60
    args.n_seeds = args.n_seeds or 2
    if args.damping_grid is None:
        args.damping_grid = DEFAULT_DAMPING_GRID
    methods = select_methods(args)

    if args.list:
        for m in list(ROUTES) + list(PEERS):
            try:
                _import_library(m.library)
                if m.library == "datatrace":
                    resolve_curvature(m.target, "auto", m.options)
                status = "available"
            except Unavailable as error:
                status = f"not available: {error}"
            print(f"{m.label:<30} {m.library:<12} {status}")
        return

    problems = make_problems(args)
    wanted = [p.strip() for p in args.problems.split(",") if p.strip()]
    output = (
        Path(args.output)
        if args.output
        else common.RESULTS_DIR / ("curvature_quick.json" if args.quick else "curvature.json")
    )
    started = time.time()
    report: dict[str, Any] = {
        "benchmark": "inverse-curvature routes vs retraining (bench_curvature.py)",
        "convention": "score[q, i] ~ f_q(theta_{-i}) - f_q(theta_hat): change of test example q's loss when "
        "training example i is removed and the model retrained (positive: i helped q); peers converted to this",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads_per_method": args.threads,
            "load_average_at_start": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": {"torch": torch.__version__, **common.versions(["datatrace", *PEER_PACKAGES.values()])},
        "conversions": CONVERSIONS,
        "columns": {
            "loo_mean_pearson": "Pearson r between estimated and actual LOO changes, per test query over the "
            "left-out examples, averaged over queries",
            "loo_pooled_pearson": "one Pearson r over all (query, left-out example) pairs",
            "loo_mean_spearman": "Spearman rho per query, averaged",
            "lds": "linear datamodeling score: Spearman over subsets of predicted vs actual test loss, mean over "
            "queries",
            "corr_vs_exact": "pooled Pearson r of the method's scores with datatrace's exact-route scores",
            "slope_vs_exact": "least-squares slope of the method's scores on the exact-route scores (1 = same "
            "scale; catches sign and 1/n errors)",
            "seconds": "wall time of fit + score (all test queries x all training examples), one process",
            "fit_seconds": "the fit (curvature/factors) part of that",
            "fb_seconds": "median wall time of ONE forward+backward pass of the mean loss over the whole training "
            "set, measured in the same process",
            "ratio_to_fb": "seconds / fb_seconds",
            "peak_rss_mib": "the method process's resident-memory high-water mark (getrusage ru_maxrss): Python, "
            "torch, the library, data and the method",
            "extra_peak_mib": "that high-water mark minus the resident memory just before fit: what the method "
            "itself added at its peak",
        },
        "problems": {},
        "results": [],
        "damping_study": [],
    }
    n_done = 0
    for name in wanted:
        if name not in problems:
            raise SystemExit(f"--problems: unknown problem {name!r}; choose from {sorted(problems)}")
        problem = problems[name]
        damping = parse_damping(args.logreg_damping if name == "logreg" else args.mlp_damping)
        train, test = problem.data()
        t0 = time.perf_counter()
        model = common.trained_model(problem, train)
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        print(f"\n== {name}: {problem.describe()}", flush=True)
        if name == "logreg":
            truth = common.loo_truth(problem, model, args.n_loo, n_jobs=args.jobs, progress=True)
            idx = truth.indices
            truth_info = {
                "kind": "leave-one-out",
                "n_loo": args.n_loo,
                "mean_abs_change": float(np.abs(truth.changes).mean()),
            }
        else:
            truth = common.subset_truth(
                problem, args.n_subsets, args.n_seeds, n_jobs=args.jobs, progress=True
            )
            idx = None
            # the noise ceiling depends only on the retrained outputs; any non-constant scores will do
            dummy = np.tile(np.arange(problem.n_train, dtype=np.float64), (problem.n_test, 1))
            ceiling = metrics.lds(dummy, truth.masks, truth.outputs) if args.n_seeds >= 2 else None
            truth_info = {
                "kind": "random half subsets",
                "n_subsets": args.n_subsets,
                "n_seeds": args.n_seeds,
                "noise_ceiling": None if ceiling is None else ceiling.noise_ceiling,
                "correlation_ceiling": None if ceiling is None else ceiling.correlation_ceiling,
            }
        t_truth = time.perf_counter() - t0
        report["problems"][name] = {
            "description": problem.describe(),
            "config": asdict(problem),
            "test_accuracy": test_accuracy(model, test),
            "damping_for_datatrace_routes": damping,
            "ground_truth": {**truth_info, "seconds_this_run (0 if cached)": t_truth},
            "seconds_base_model (0 if cached)": t_base,
        }
        print(
            f"   test accuracy {report['problems'][name]['test_accuracy']:.3f}; ground truth: {truth_info}",
            flush=True,
        )

        reference = None
        ordered = sorted(
            methods, key=lambda m: m.label != "exact"
        )  # exact first: the reference for agreement
        rows = []
        for method in ordered:
            out = run_isolated(method, problem, damping, args)
            scores = out.pop("scores", None)
            out["scores"] = scores
            row = {
                "problem": name,
                "method": method.label,
                "library": method.library,
                "conversion": CONVERSIONS[method.library],
                "note": method.note,
            }
            row.update({k: v for k, v in out.items() if k != "scores"})
            row.update(score_row(name, truth, out, idx))
            if method.label == "exact" and scores is not None and np.isfinite(scores).all():
                reference = scores
            row.update(agreement(scores, reference) if scores is not None else {})
            rows.append(row)
            report["results"].append(row)
            n_done += 1
            key = "loo_mean_pearson" if name == "logreg" else "lds"
            print(
                f"   {method.label:<28} {row['status']:<14} {key}={common.fmt(row.get(key))}"
                f"  {common.fmt(row.get('seconds'))} s"
                + (f"  ({row.get('reason', '')[:150]})" if row["status"] != "ok" else ""),
                flush=True,
            )
            common.write_json(output, report)  # partial results survive an interruption
        print()
        print(common.table(rows, LOGREG_COLUMNS if name == "logreg" else MLP_COLUMNS))
        if args.damping_grid and name in [p.strip() for p in args.grid_problems.split(",")]:
            print(f"\n== damping study on {name} (datatrace routes)", flush=True)
            grid = run_grid(name, problem, truth, args)
            report["damping_study"].extend(grid)
            common.write_json(output, report)
            print(common.table(grid, GRID_COLUMNS))
    # the targets refer to the full-size problems; a --quick run only smoke-tests the machinery
    report["acceptance"] = [] if args.quick else acceptance(report["results"])
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["total_seconds"] = time.time() - started
    common.write_json(output, report)
    print(
        "\n== acceptance targets of the issue" + (" (not evaluated in a --quick run)" if args.quick else "")
    )
    for c in report["acceptance"]:
        print(
            f"   [{'met' if c['met'] else ('n/a' if c['met'] is None else 'NOT met')}] {c['target']}: {c['measured']}"
        )
    print(f"\nwrote {output} ({n_done} method runs, {report['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
