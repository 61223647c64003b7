"""Influence on the catalogue's language model (``realistic.py``, problem ``lm``): LDS, time and memory per token.

The problem: a small GPT-2 (``transformers.GPT2LMHeadModel`` from a config) trained by AdamW on minibatches of
32-token windows of the standard library's docstrings; the task is ``datatrace.hf.CausalLMTask()`` (each
sequence's summed next-token negative log-likelihood, in nats) and the measurement is each held-out sequence's
loss. Scores are in datatrace's units: ``score[q, i] ~ f_q(theta_{-i}) - f_q(theta_hat)``.

For every method: the linear datamodeling score (LDS) against ``--n-subsets`` random half subsets retrained from
scratch with ``--n-seeds`` seeds (``realistic.ground_truth``, cached; the split-half noise ceiling beside it), the
wall time of fit + scoring every query against every training sequence, and the peak memory the method needed
above the loaded model and data, both per training token and as a multiple of ONE plain forward + backward pass of
the summed loss over the same training sequences (measured in its own process, the same device). Each method runs
in a fresh process. On CUDA the memory is ``torch.cuda.max_memory_allocated`` above what was allocated before; on
CPU it is the resident-set high-water mark above the resident set before (``common.Measure``).

Query compression: when ``datatrace.InfluenceFunction`` takes ``query_rank`` (a per-layer rank-r SVD of the
preconditioned query gradients), the ``ekfac-sampled-qr*`` rows give the Pearson correlation of their scores with
the full-rank ``ekfac-sampled`` scores, and their times; otherwise they are reported as not available.

Usage::

    python benchmarks/bench_lm.py                              # every method (CPU unless --device cuda)
    python benchmarks/bench_lm.py --methods "ekfac*,kronfluence*" --device cuda
    python benchmarks/bench_lm.py --list
    python benchmarks/bench_lm.py --markdown-from benchmarks/results/lm.json

Writes ``results/lm.json`` (rows of the run merged into what it held, keyed by device).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import inspect
import json
import logging
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
from datatrace.verification import metrics, retrain

RESULTS = Path(__file__).resolve().parent / "results"
PROBLEM = "lm"


Method = common.Method


METHODS = [
    Method("auto", "influence", {"curvature": "auto"}, "InfluenceFunction's default"),
    Method("ekfac-sampled", "influence", {"curvature": "ekfac", "fisher": "sampled"},
           "EKFAC(fisher='sampled'): one next token drawn per position"),
    Method("ekfac-sampled-streamed", "influence",
           {"curvature": "ekfac", "fisher": "sampled", "keep_gradients": False},
           "keep_gradients=False: training gradients recomputed per score call, never held"),
    Method("ekfac-sampled-batch64", "influence", {"curvature": "ekfac", "fisher": "sampled", "batch_size": 64},
           "batch_size=64 (the default batch is the data's own or 256)"),
    Method("ekfac-ggn", "influence", {"curvature": "ekfac", "fisher": "ggn"}, "exact output Hessian"),
    Method("kfac-sampled", "influence", {"curvature": "kfac", "fisher": "sampled"}),
    Method("identity", "influence", {"curvature": "identity"}, "gradient dot product"),
    Method("projected-factorized", "projected", {"ggn_samples": 1},
           "ProjectedInfluence, FactorizedProjector, GGN sketched by 1 Rademacher sample"),
    Method("projected-factorized-empirical", "projected", {"fisher": "empirical"},
           "ProjectedInfluence, FactorizedProjector, empirical Fisher"),
    Method("trak-4", "trak", {"members": 4, "fisher": "empirical"},
           "TRAK, 4 models trained with seeds 0-3, empirical Fisher of the projected gradients"),
    Method("trak-4-default", "trak", {"members": 4}, "TRAK defaults (fisher='ggn'), 4 models"),
    Method("kronfluence-ekfac", "kronfluence", {"damping": None, "modules": "blocks"},
           "the blocks' Linear layers (datatrace's EK-FAC scope), damping heuristic (0.1 x mean eigenvalue)"),
    Method("kronfluence-ekfac-default", "kronfluence", {"damping": 1e-8, "modules": "blocks"},
           "the blocks' Linear layers, shipped damping 1e-8"),
    Method("kronfluence-ekfac-all", "kronfluence", {"damping": None, "modules": "all"},
           "every Linear layer (its default scope: with lm_head, the tied embedding), damping heuristic"),
    *(
        Method(f"ekfac-sampled-qr{r}", "influence", {"curvature": "ekfac", "fisher": "sampled", "query_rank": r},
               f"query_rank={r}", reference="ekfac-sampled")
        for r in (8, 16, 32)
    ),
]  # fmt: skip


# ==============================================================================================================
# Runners: each returns (n_query, n_train) scores in datatrace units and sign
# ==============================================================================================================
class Unavailable(Exception):
    """The method cannot run here (a library or an argument missing): reported, not a failure."""


def run_influence(method: Method, ctx: dict[str, Any]) -> dict[str, Any]:
    from datatrace.curvature.kfac import EKFAC, KFAC

    options = dict(method.options)
    curvature: Any = options.pop("curvature")
    fisher = options.pop("fisher", None)
    if fisher is not None:
        curvature = {"ekfac": EKFAC, "kfac": KFAC}[curvature](fisher=fisher)
    if (
        "query_rank" in options
        and "query_rank" not in inspect.signature(datatrace.InfluenceFunction).parameters
    ):
        raise Unavailable("this datatrace's InfluenceFunction has no query_rank argument")
    influence = datatrace.InfluenceFunction(ctx["model"], ctx["task"], curvature=curvature, progress=False,
                                            **options)  # fmt: skip
    out = _fit_and_score(influence, ctx)
    info = influence.curvature_.info
    return {**out, "route": info.get("auto_choice") or getattr(influence.curvature_, "name", None),
            "info": {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}}  # fmt: skip


def _fit_and_score(attributor: Any, ctx: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    attributor.fit(ctx["train"])
    fit = time.perf_counter() - start
    scores = attributor.score(ctx["test"])
    meta = getattr(scores, "metadata", None) or {}
    kept = {k: meta[k] for k in ("query_rank", "query_rank_energy_min") if k in meta}
    return {"scores": scores.values, "fit_seconds": fit, **kept}


def run_projected(method: Method, ctx: dict[str, Any]) -> dict[str, Any]:
    attributor = datatrace.ProjectedInfluence(
        ctx["model"], ctx["task"], projector=datatrace.FactorizedProjector(), progress=False, **method.options
    )
    return {**_fit_and_score(attributor, ctx), "route": attributor.route}


def run_trak(method: Method, ctx: dict[str, Any]) -> dict[str, Any]:
    members = [ctx["model"]] + [
        catalogue.trained(ctx["problem"], seed=s).to(ctx["device"])
        for s in range(1, method.options["members"])
    ]
    options = {k: v for k, v in method.options.items() if k != "members"}
    attributor = datatrace.TRAK(members, ctx["task"], progress=False, **options)
    return {**_fit_and_score(attributor, ctx), "note": "time excludes training the extra models"}


def conv1d_as_linear(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every ``transformers`` ``Conv1D`` (``y = x W + b``, ``W`` of shape ``(in, out)``)
    replaced by the equal ``nn.Linear`` (weight ``W^T``): kronfluence hooks ``nn.Linear`` and ``nn.Conv2d`` only."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                weight = child.weight.detach()
                linear = torch.nn.Linear(
                    weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype
                )
                with torch.no_grad():
                    linear.weight.copy_(weight.T)
                    linear.bias.copy_(child.bias.detach())
                setattr(module, child_name, linear)
    return model


def run_kronfluence(method: Method, ctx: dict[str, Any]) -> dict[str, Any]:
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task as KronfluenceTask
    except ImportError as error:
        raise Unavailable(f"kronfluence not importable here: {error}") from None
    import torch.nn.functional as F

    model = conv1d_as_linear(ctx["model"])
    blocks = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".h." in f".{n}"]
    tracked = blocks if method.options["modules"] == "blocks" else None

    def summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")

    class CausalLM(KronfluenceTask):
        """Summed next-token NLL; ``sample=True`` draws each next token from the model (the true Fisher)."""

        def compute_train_loss(
            self, batch: Any, model: torch.nn.Module, sample: bool = False
        ) -> torch.Tensor:
            ids = batch["input_ids"]
            logits = model(input_ids=ids).logits[:, :-1]
            if sample:
                with torch.no_grad():
                    targets = torch.distributions.Categorical(logits=logits.detach()).sample()
            else:
                targets = ids[:, 1:]
            return summed_nll(logits, targets)

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            ids = batch["input_ids"]  # the query's own summed NLL, as datatrace measures
            return summed_nll(model(input_ids=ids).logits[:, :-1], ids[:, 1:])

        def get_influence_tracked_modules(self) -> list[str] | None:
            return tracked

    class Rows(torch.utils.data.Dataset):
        def __init__(self, ids: torch.Tensor) -> None:
            self.ids = ids

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i]}

    train_set, test_set = Rows(ctx["train"]["input_ids"]), Rows(ctx["test"]["input_ids"])
    f64 = torch.float64
    torch.manual_seed(0)  # the sampled tokens of the true Fisher
    start = time.perf_counter()
    task = CausalLM()
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name="lm", model=model, task=task, cpu=ctx["device"].type == "cpu",
                        disable_tqdm=True, output_dir=ctx["workdir"])  # fmt: skip
    factor_args = FactorArguments(strategy="ekfac", activation_covariance_dtype=f64, gradient_covariance_dtype=f64,
                                  per_sample_gradient_dtype=f64, lambda_dtype=f64, eigendecomposition_dtype=f64)  # fmt: skip
    batch = ctx["batch_size"]
    analyzer.fit_all_factors(factors_name="factors", dataset=train_set, per_device_batch_size=batch,
                             factor_args=factor_args, overwrite_output_dir=True)  # fmt: skip
    fit_seconds = time.perf_counter() - start
    score_args = ScoreArguments(damping_factor=method.options["damping"], query_gradient_svd_dtype=f64,
                                per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64)  # fmt: skip
    analyzer.compute_pairwise_scores(scores_name="scores", factors_name="factors", query_dataset=test_set,
                                     train_dataset=train_set, per_device_query_batch_size=len(test_set),
                                     per_device_train_batch_size=batch, score_args=score_args,
                                     overwrite_output_dir=True)  # fmt: skip
    raw = analyzer.load_pairwise_scores(scores_name="scores")["all_modules"]
    # kronfluence's pairwise score is g_q^T (G + damping)^{-1} g_i on summed losses: datatrace's units are raw / n
    return {
        "scores": raw.detach().to(torch.float64).cpu() / len(train_set),
        "fit_seconds": fit_seconds,
        "route": f"kronfluence EK-FAC over {len(blocks) if tracked else 'all'} Linear modules",
        "settings": {"damping_factor": method.options["damping"], "tracked_modules": tracked or "all Linear",
                     "fisher": "true Fisher (tokens sampled from the model)", "dtypes": "float64 factors and scores",
                     "batch_size": batch},
    }  # fmt: skip


RUNNERS = {
    "influence": run_influence,
    "projected": run_projected,
    "trak": run_trak,
    "kronfluence": run_kronfluence,
}


# ==============================================================================================================
# One method in this process (a fresh one per method, so that the peak memory is its own)
# ==============================================================================================================
def load_context(device: torch.device, workdir: str, batch_size: int, scale: str = "full") -> dict[str, Any]:
    problem = catalogue.problem(PROBLEM, scale)
    train, test = problem.data()
    model = catalogue.trained(problem).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    return {"problem": problem, "train": train, "test": test, "model": model, "task": problem.task(),
            "device": device, "workdir": workdir, "batch_size": batch_size}  # fmt: skip


class DeviceMeasure:
    """Seconds and the peak memory a block needed above what was in use before it (CUDA: allocated bytes;
    CPU: the resident set, :class:`common.Measure`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> DeviceMeasure:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.start = time.perf_counter()
        else:
            self.inner = common.Measure().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.seconds = time.perf_counter() - self.start
            self.extra_bytes = torch.cuda.max_memory_allocated(self.device) - self.before
        else:
            self.inner.__exit__(*exc)
            self.seconds = self.inner.seconds
            self.extra_bytes = self.inner.extra_peak_mib * 2**20


def forward_backward(ctx: dict[str, Any], repeats: int = 5) -> dict[str, float]:
    """ONE plain forward + backward pass of the summed loss over all training sequences (one batch): median
    seconds over ``repeats`` after a warm-up, and the peak memory of the first pass (the process is as fresh as a
    method's, whose peak is measured on its first and only run)."""
    model, task = ctx["model"], ctx["task"]
    batch = {k: v.to(ctx["device"]) for k, v in ctx["train"].items()}
    model.eval()
    seconds, extra = [], None
    for r in range(repeats + 1):
        for p in model.parameters():
            p.grad = None
        with DeviceMeasure(ctx["device"]) as m:
            task.loss(model, batch).sum().backward()
        extra = m.extra_bytes if extra is None else extra
        if r:
            seconds.append(m.seconds)
    for p in model.parameters():
        p.grad = None
    return {"seconds": float(np.median(seconds)), "extra_bytes": float(extra)}


def worker(label: str, out_path: str, device: str, threads: int, batch_size: int, scale: str) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("datatrace.curvature.auto").setLevel(
        logging.INFO
    )  # the choice, even if it then times out
    result: dict[str, Any] = {"status": "ok"}
    with tempfile.TemporaryDirectory() as workdir:
        try:
            ctx = load_context(torch.device(device), workdir, batch_size, scale)
            if label == "forward-backward":
                result.update(forward_backward(ctx))
            else:
                method = next(m for m in METHODS if m.label == label)
                with DeviceMeasure(ctx["device"]) as m:
                    out = RUNNERS[method.kind](method, ctx)
                scores = torch.as_tensor(out.pop("scores")).detach().cpu().to(torch.float64).numpy()
                expected = (ctx["problem"].n_test, ctx["problem"].n_train)
                if scores.shape != expected:
                    raise ValueError(f"scores have shape {scores.shape}, expected {expected}")
                np.save(out_path + ".npy", scores)
                result.update(seconds=m.seconds, extra_bytes=m.extra_bytes, **out)
        except Exception as error:  # reported, never a crash of the whole run
            unavailable = isinstance(error, Unavailable)
            result = {"status": "not available" if unavailable else "failed",
                      "reason": f"{type(error).__name__}: {error}"[:600],
                      "trace": "" if unavailable else traceback.format_exc()[-2000:]}  # fmt: skip
    Path(out_path + ".json").write_text(json.dumps(common.to_jsonable(result), default=str))


def run_in_subprocess(label: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        cmd = [sys.executable, __file__, "--worker", label, out, "--device", args.device,
               "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--scale", args.scale]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired as error:
            stderr = error.stderr.decode() if isinstance(error.stderr, bytes) else (error.stderr or "")
            chose = [line for line in stderr.splitlines() if "curvature='auto' chose" in line]
            return {"status": "timeout", "reason": f"more than {args.timeout:.0f} s",
                    **({"route": chose[-1].split(" chose ")[1].split(":")[0].strip("'"),
                        "auto_reason": chose[-1].split("chose ", 1)[1]} if chose else {})}  # fmt: skip
        if not os.path.exists(out + ".json"):
            return {"status": "failed", "reason": (proc.stderr or proc.stdout)[-1500:]}
        result = json.loads(Path(out + ".json").read_text())
        if result["status"] == "ok" and os.path.exists(out + ".npy"):
            result["scores"] = np.load(out + ".npy")
        return result


# ==============================================================================================================
# Main
# ==============================================================================================================
COLUMNS = [
    ("method", "method"),
    ("lds", "LDS"),
    ("seconds", "fit+score s"),
    ("x_fwd_bwd", "time x fwd+bwd"),
    ("kib_per_token", "peak KiB/token"),
    ("mem_x_fwd_bwd", "memory x fwd+bwd"),
    ("r_vs_reference", "r vs full rank"),
    ("route", "route"),
    ("status", "status"),
]


def print_tables(payload: dict[str, Any], markdown: bool = False) -> None:
    for device, entry in payload["devices"].items():
        fb = entry.get("forward_backward", {})
        print(f"\n### {entry['summary']}\n")
        print(
            f"device {device}; noise ceiling {common.fmt(entry.get('ceiling'))} (best LDS to hope for about "
            f"{common.fmt(entry.get('correlation_ceiling'))}); test perplexity {common.fmt(entry.get('perplexity'))}"
            f", next-token accuracy {common.fmt(entry.get('accuracy'))}; training {common.fmt(entry.get('train_seconds'))}"
            f" s; one forward + backward over the {entry.get('train_tokens')} training tokens "
            f"{common.fmt(fb.get('seconds'))} s, {common.fmt(fb.get('kib_per_token'))} KiB/token\n"
        )
        rows = []
        for label, row in entry["methods"].items():
            r = {"method": label, **row}
            if row.get("status") != "ok":
                r["status"] = f"{row.get('status')}: {str(row.get('reason', ''))[:70]}"
            rows.append(r)
        rows.sort(key=lambda r: -(r.get("lds") if isinstance(r.get("lds"), float) else -9))
        print(common.table(rows, COLUMNS, markdown=markdown))


def train_seconds(problem: catalogue.Problem) -> float:
    """Wall time of one training run on the full training set (single-threaded, this process)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    problem.train_fn()(problem.data()[0], seed=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="*")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64, help="kronfluence's per-device batch")
    parser.add_argument("--n-subsets", type=int, default=50)
    parser.add_argument("--n-seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="parallel retrains for the ground truth")
    parser.add_argument("--scale", default="full", help="'ci': the test suite's small build (a smoke run)")
    parser.add_argument(
        "--output", default=None, help="default results/lm.json (results/lm_ci.json at --scale ci)"
    )
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--markdown-from")
    parser.add_argument("--worker", nargs=2)
    args = parser.parse_args()
    if args.worker:
        worker(
            *args.worker,
            device=args.device,
            threads=args.threads,
            batch_size=args.batch_size,
            scale=args.scale,
        )
        return
    if args.markdown_from:
        print_tables(json.loads(Path(args.markdown_from).read_text()), markdown=True)
        return
    problem = catalogue.problem(PROBLEM, args.scale)
    methods = [m for m in METHODS if any(fnmatch.fnmatch(m.label, p) for p in args.methods.split(","))]
    if args.list:
        print(problem.summary())
        for m in methods:
            print(f"{m.label:32s} {m.kind:12s} {m.options} {m.note}")
        return
    output = Path(args.output or RESULTS / ("lm.json" if args.scale == "full" else f"lm_{args.scale}.json"))
    payload = json.loads(output.read_text()) if output.exists() else {"devices": {}}
    payload["versions"] = common.versions(["datatrace", "torch", "transformers", "kronfluence"])
    payload["query_rank_available"] = (
        "query_rank" in inspect.signature(datatrace.InfluenceFunction).parameters
    )
    truth = catalogue.ground_truth(problem, args.n_subsets, args.n_seeds, n_jobs=args.jobs)
    train, test = problem.data()
    model = catalogue.trained(problem)
    losses = retrain.evaluator(problem.task(), test)(model)
    noise = np.random.default_rng(0).normal(size=(problem.n_test, problem.n_train))
    ceiling = metrics.lds(noise, truth.masks, truth.outputs)
    tokens = int(train["input_ids"].numel())
    entry = payload["devices"].setdefault(args.device, {"methods": {}})
    entry.update(
        summary=problem.summary(),
        perplexity=catalogue.perplexity(model, test),
        train_perplexity=catalogue.perplexity(model, train),
        accuracy=catalogue.accuracy(model, test),
        mean_query_loss=float(np.mean(losses)),
        train_seconds=train_seconds(problem),
        ceiling=ceiling.noise_ceiling,
        correlation_ceiling=ceiling.correlation_ceiling,
        n_subsets=args.n_subsets,
        n_seeds=args.n_seeds,
        train_tokens=tokens,
        threads=args.threads,
    )
    fb = run_in_subprocess("forward-backward", args)
    if fb.get("status") != "ok":
        raise RuntimeError(f"the forward + backward reference failed: {fb.get('reason')}")
    fb["kib_per_token"] = fb["extra_bytes"] / tokens / 1024
    entry["forward_backward"] = fb
    scores_dir = catalogue.CACHE_DIR / problem.key() / f"scores-{args.device}"
    scores_dir.mkdir(parents=True, exist_ok=True)
    computed: dict[str, np.ndarray] = {}  # this run's scores: a row's reference is taken from here first
    for method in methods:
        print(f"[lm] {method.label} ...", end=" ", flush=True)
        row = run_in_subprocess(method.label, args)
        row["note"] = method.note
        if row.get("status") == "ok":
            scores = row.pop("scores")
            np.save(scores_dir / f"{method.label}.npy", scores)
            computed[method.label] = scores
            if not np.isfinite(scores).all():
                row["status"] = "non-finite"
            else:
                row["lds"] = float(metrics.lds(scores, truth.masks, truth.outputs).mean)
                row["below_minus_loss"] = float((scores < -losses[:, None] - 1e-6).any(axis=1).mean())
                row["fwd_bwd_seconds"], row["fwd_bwd_bytes"] = fb["seconds"], fb["extra_bytes"]  # this run's
                row["x_fwd_bwd"] = row["seconds"] / fb["seconds"]
                row["kib_per_token"] = row["extra_bytes"] / tokens / 1024
                row["mem_x_fwd_bwd"] = row["extra_bytes"] / fb["extra_bytes"]
                reference = computed.get(method.reference) if method.reference else None
                path = scores_dir / f"{method.reference}.npy"
                if reference is None and method.reference and path.exists():
                    reference = np.load(path)
                if reference is not None:
                    row["r_vs_reference"] = float(np.corrcoef(reference.ravel(), scores.ravel())[0, 1])
        else:
            row.pop("trace", None) if row.get("status") == "not available" else None
        entry["methods"][method.label] = row
        print(row.get("status"), common.fmt(row.get("lds")), common.fmt(row.get("seconds")), flush=True)
        common.write_json(output, payload)
    print_tables(payload)


if __name__ == "__main__":
    main()
