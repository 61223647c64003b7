"""Metagradient attribution on the realistic catalogue: LDS against single-model and seed-averaged retraining.

For each problem (``realistic.py``; float32, Adam on shuffled minibatches for a budget), the model is trained once
with :func:`datatrace.verification.training.fit_minibatch` and once more with ``record_to=`` (the recorder's
overhead is the ratio), then every route attributes the *recorded* final model on the first ``--queries`` test
examples:

* ``metagradient``: :class:`datatrace.attributors.metagradient.Metagradient` (reverse-mode through the run);
* ``auto`` and ``ekfac``: :class:`datatrace.InfluenceFunction` with the default curvature and with EK-FAC.

Problems are catalogue names or ``realistic.VARIANTS`` (``mlp-small-gelu``: mlp-small with GELU instead of ReLU, the
same data, initialisation and recipe; a ReLU run is not differentiable in its data weights,
:mod:`datatrace.run.smoothness`).

Ground truths (LDS, Park et al. 2023; ``metrics.lds``):

* **single-model**: the recorded run replayed with the left-out examples' loss terms removed (same initialisation,
  order, minibatches, dropout seeds; ``retrain.single_model_subsets``), for each ``--fractions`` kept share;
* **seed-averaged**: the catalogue's own ground truth (50 half subsets x 2 fresh seeds, cached by
  ``bench_catalogue.py``), with its split-half noise ceiling.

Time is reported as a multiple of one (unrecorded) training run on the same machine in the same process, for all
queries in one reverse pass and for one query alone (also with ``hold_graphs=False``, each step's graph rebuilt
in reverse order after a replay without graphs); memory as the largest number of training states the reverse
pass held times one state's bytes, plus a segment's autograd graphs when it held them (``graph_bytes``' estimate).
Writes ``results/metagradient.json``.

    python benchmarks/bench_metagradient.py --problems mlp-small,cnn --queries 50
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import common
import datatrace
import realistic
from datatrace.attributors.metagradient import Metagradient
from datatrace.run.recording import Recording
from datatrace.run.replay import Replay
from datatrace.verification import metrics, retrain
from datatrace.verification.training import fit_minibatch


def train(problem: realistic.Problem, record_to: Path | None) -> tuple[torch.nn.Module, float]:
    r = problem.recipe
    model = problem.build_model(0)
    train_data = problem.data()[0]
    start = time.perf_counter()
    trained = fit_minibatch(
        model,
        problem.task(),
        train_data,
        epochs=r.epochs,
        batch_size=r.batch_size,
        lr=r.lr,
        optimizer=r.optimizer,
        seed=0,
        record_to=record_to,
        checkpoint_every=100,
    )
    return trained, time.perf_counter() - start


def state_bytes(recording: Recording) -> int:
    return recording.state(recording.n_steps).nbytes()


def lds_result(scores: np.ndarray, truth: retrain.SubsetResult, n_query: int) -> metrics.LDSResult:
    return metrics.lds(scores, truth.masks, truth.outputs[..., :n_query])


def path_truth(
    problem: realistic.Problem,
    recording: Recording,
    train_data: Any,
    masks: np.ndarray,
    alpha: float,
    query: tuple,
) -> retrain.SubsetResult:
    """The recorded run replayed with the left-out examples' weights lowered to ``1 - alpha`` (not 0): the same
    directions as the subsets, ``alpha`` times as far (``alpha -> 0`` is where a derivative must be exact)."""
    replay = Replay(problem.build_model(0), problem.task(), recording, train_data)
    evaluate = retrain.evaluator(problem.task(), query)
    outputs = []
    for mask in masks:
        weights = torch.as_tensor(1.0 - alpha * (1.0 - mask.astype(np.float64)), dtype=replay.dtype)
        outputs.append(evaluate(replay.model_at(replay.run(replay.initial(), replay.n_steps, weights))))
    return retrain.SubsetResult(
        masks=masks, outputs=np.asarray(outputs)[:, None, :], seeds=np.zeros((len(masks), 1), dtype=np.int64)
    )


def run_problem(
    name: str, n_query: int, n_subsets: int, fractions: list[float], n_jobs: int, alphas: list[float]
) -> dict[str, Any]:
    problem = realistic.problem(name)
    train_data, test = problem.data()
    query = (test[0][:n_query], test[1][:n_query])
    task = problem.task()
    cache = realistic.CACHE_DIR / problem.key()
    folder = cache / "recording-seed0"
    train(problem, None)  # warm-up (first calls, allocator)
    plain_times, recorded_times = [], []
    for _ in range(2):
        plain_times.append(train(problem, None)[1])
        with tempfile.TemporaryDirectory() as tmp:
            recorded_times.append(train(problem, Path(tmp))[1])
    _, _ = train(problem, folder)
    t_train = min(plain_times)
    recording = Recording(folder)
    out: dict[str, Any] = {
        "problem": problem.summary(),
        "steps": recording.n_steps,
        "n_query": n_query,
        "train_seconds": t_train,
        "recorded_train_seconds": min(recorded_times),
        "recorder_overhead": min(recorded_times) / t_train - 1,
        "routes": {},
    }

    scores: dict[str, np.ndarray] = {}
    attributor = Metagradient(problem.build_model(0), task, recording, progress=False).fit(train_data)
    start = time.perf_counter()
    values = attributor.score(query).values
    seconds = time.perf_counter() - start
    scores["metagradient"] = values.double().numpy()
    run = attributor.last_run_
    out["routes"]["metagradient"] = {
        "seconds": seconds,
        "x_training": seconds / t_train,
        "max_states_held": run["max_states_held"],
        "segment": run["segment"],
        "held_graphs": run["held_graphs"],
        "held_bytes": run["max_states_held"] * state_bytes(recording)
        + (run["segment"] * run["graph_bytes_per_step"] if run["held_graphs"] else 0),
        "replay_relative_error": run["replay_relative_error"],
        "non_smooth_operations": attributor.metadata()["non_smooth_operations"],
    }
    one = (query[0][:1], query[1][:1])
    for key, hold in (("x_training_one_query", None), ("x_training_one_query_rebuilt", False)):
        timed = (
            attributor
            if hold is None
            else Metagradient(problem.build_model(0), task, recording, hold_graphs=hold, progress=False).fit(
                train_data
            )
        )
        start = time.perf_counter()
        timed.score(one)
        out["routes"]["metagradient"][key] = (time.perf_counter() - start) / t_train
    model = attributor.fitted_model
    for label, curvature in (("auto", "auto"), ("ekfac", "ekfac")):
        influence = datatrace.InfluenceFunction(model, task, curvature=curvature, progress=False)
        start = time.perf_counter()
        influence.fit(train_data)
        values = influence.score(query).values
        seconds = time.perf_counter() - start
        scores[label] = values.double().numpy()
        info = influence.curvature_.info
        out["routes"][label] = {
            "seconds": seconds,
            "x_training": seconds / t_train,
            "choice": info.get("auto_choice") or info.get("route"),
        }

    truths: dict[str, retrain.SubsetResult] = {}
    tag = recording.manifest["final"]["sha256"][:10]  # the ground truth belongs to this very run
    for fraction in fractions:
        truths[f"single-model, keep {fraction:g}"] = retrain.single_model_subsets(
            problem.build_model(0),
            task,
            recording,
            train_data,
            retrain.evaluator(task, query),
            n_subsets=n_subsets,
            fraction=fraction,
            n_jobs=n_jobs,
            cache_dir=cache / f"single-model-{n_query}q-{n_subsets}x-keep{fraction:g}-{tag}",
        )
    for alpha in alphas:  # along the keep-0.9 directions, a fraction alpha of the way
        base = truths[f"single-model, keep {0.9:g}"]
        truths[f"single-model, keep 0.9, weight 1-{alpha:g}"] = path_truth(
            problem, recording, train_data, base.masks, alpha, query
        )
    seed_averaged = realistic.ground_truth(problem, n_jobs=n_jobs)
    truths["seed-averaged, keep 0.5"] = seed_averaged
    # how far each truth moves the left-out examples' weights (removal: all the way; the paths: alpha)
    moved = {truth: 1.0 for truth in truths}
    moved.update({f"single-model, keep 0.9, weight 1-{alpha:g}": alpha for alpha in alphas})
    for label, values in scores.items():
        fits = {truth: lds_result(values, result, n_query) for truth, result in truths.items()}
        out["routes"][label]["lds"] = {truth: float(fit.mean) for truth, fit in fits.items()}
        # 1 when the scores are in the units of the changes they predict (the scores predict a removal, so a
        # path's predicted change is alpha times theirs; seed-averaged outputs are compared as they are)
        out["routes"][label]["calibration_slope"] = {
            truth: float(metrics.calibration_slope(moved[truth] * fit.predicted.T, fit.actual.T))
            for truth, fit in fits.items()
        }
    result = lds_result(scores["metagradient"], seed_averaged, n_query)
    ceiling, best = result.noise_ceiling, result.correlation_ceiling
    out["seed_averaged_noise_ceiling"] = None if ceiling is None else round(float(ceiling), 3)
    out["seed_averaged_correlation_ceiling"] = None if best is None else round(float(best), 3)
    return out


def print_table(payload: dict[str, Any]) -> None:
    for name, result in payload["problems"].items():
        print(f"\n{name}: {result['problem']}; {result['steps']} steps, {result['n_query']} queries")
        print(
            f"  training {result['train_seconds']:.1f} s; recorded {result['recorded_train_seconds']:.1f} s "
            f"(overhead {100 * result['recorder_overhead']:.0f}%); seed-averaged noise ceiling "
            f"{result['seed_averaged_noise_ceiling']} (best LDS to hope for "
            f"{result.get('seed_averaged_correlation_ceiling')})"
        )
        truths = list(next(iter(result["routes"].values()))["lds"])
        print("  | route | seconds | x training | " + " | ".join(f"LDS {t}" for t in truths) + " |")
        for label, row in result["routes"].items():
            slopes = row.get("calibration_slope", {})
            cells = " | ".join(
                f"{row['lds'][t]:.3f}" + (f" (slope {slopes[t]:.2f})" if t in slopes else "") for t in truths
            )
            print(f"  | {label} | {row['seconds']:.1f} | {row['x_training']:.1f} | {cells} |")
        mg = result["routes"]["metagradient"]
        if "x_training_one_query" in mg:
            rebuilt = mg.get("x_training_one_query_rebuilt")
            print(
                f"  metagradient for one query: {mg['x_training_one_query']:.1f} x training"
                + (
                    ""
                    if rebuilt is None
                    else f" ({rebuilt:.1f} x rebuilding each step's graph in reverse order)"
                )
            )
        graphs = " and a segment's graphs" if mg.get("held_graphs") else ""
        print(
            f"  metagradient held at most {mg['max_states_held']} states{graphs} ({mg['held_bytes'] / 2**20:.2f} "
            f"MiB; segment {mg['segment']}); replay vs recording {mg['replay_relative_error']:.2g}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", default="mlp-small,cnn")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--fractions", default="0.5,0.9")
    parser.add_argument(
        "--path-alphas",
        default="",
        help="also the keep-0.9 subsets' examples down-weighted to 1 - alpha instead of removed (needs 0.9 in "
        "--fractions), e.g. 0.01",
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "metagradient.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",")]
    alphas = [float(a) for a in args.path_alphas.split(",") if a]
    payload: dict[str, Any] = {"problems": {}, "versions": common.versions(["torch", "numpy"])}
    out = Path(args.out)
    if out.exists():
        import json

        payload["problems"] = json.loads(out.read_text()).get("problems", {})
    for name in args.problems.split(","):
        payload["problems"][name] = run_problem(
            name, args.queries, args.subsets, fractions, args.jobs, alphas
        )
        common.write_json(out, payload)
        print_table({"problems": {name: payload["problems"][name]}})


if __name__ == "__main__":
    main()
