"""Speed-up of datatrace's passes over the training data under ``torchrun`` (gloo on CPU, or NCCL on GPUs).

For each world size (default 1 and 2 processes, one torch thread each) the script starts itself under
``python -m torch.distributed.run --standalone --nproc-per-node N`` and, on every rank, times on the same synthetic
problem (a float32 MLP on random data, the same on every rank):

* ``ekfac_fit``: ``EKFAC`` statistics (two passes over the data: factors, then eigenvalues);
* ``train_gradients``: ``InfluenceFunction`` fit with the identity curvature, i.e. the per-example training
  gradients (computed per shard, then all-gathered);
* ``ggn_products``: 20 Gauss-Newton-vector products (``ggn_vp``) over the whole training set;
* ``store_fill``: ``ProjectedInfluence`` writing its on-disk store (chunks dealt round-robin).

Each is the slowest rank's wall time (a collective finishes with its slowest member). Speed-up = time at 1 process /
time at N. The ideal is N on N idle cores; this machine has 2 cores shared with other jobs, so read the numbers
as a lower bound. Scores at every world size are compared with the 1-process ones (max relative difference).

    python benchmarks/bench_distributed.py                       # 1 and 2 processes, n = 20,000
    python benchmarks/bench_distributed.py --world-sizes 1,2,4 --n-train 50000
    python benchmarks/bench_distributed.py --quick               # n = 2,000

Writes ``benchmarks/results/distributed.json`` (``distributed_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import common
import datatrace
from datatrace.curvature.kfac import EKFAC
from datatrace.data import as_data_source
from datatrace.distributed import all_reduce_sum, is_main_process, world
from datatrace.gradients.functional import FunctionalModel, prepare_model
from datatrace.gradients.products import ggn_vp
from datatrace.projection import RandomProjector

COLUMNS = [
    ("world_size", "processes"),
    ("ekfac_fit", "EK-FAC fit s"),
    ("ekfac_fit_speedup", "x"),
    ("train_gradients", "train grads s"),
    ("train_gradients_speedup", "x"),
    ("ggn_products", "20 GGN-v s"),
    ("ggn_products_speedup", "x"),
    ("store_fill", "store fill s"),
    ("store_fill_speedup", "x"),
    ("max_rel_diff_scores", "max rel. diff of scores vs 1 process"),
]
TASKS = ("ekfac_fit", "train_gradients", "ggn_products", "store_fill")


def problem(n: int, width: int) -> tuple[nn.Module, datatrace.ClassificationTask, tuple, tuple]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    query = (X[:16], y[:16])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10))
    return model, datatrace.ClassificationTask(weight_decay=1e-3), (X, y), query


def slowest(seconds: float) -> float:
    """The largest of every rank's ``seconds`` (a max through a sum of one-hot rows)."""
    rank, size, _ = world()
    row = torch.zeros(size, dtype=torch.float64)
    row[rank] = seconds
    return float(all_reduce_sum(row).max())


def timed(fn):
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    out = fn()
    return out, slowest(time.perf_counter() - start)


def worker(out: Path, n: int, width: int) -> None:
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    try:
        model, task, train, query = problem(n, width)
        times, scores = {}, {}
        ekfac, times["ekfac_fit"] = timed(
            lambda: datatrace.InfluenceFunction(
                model, task, curvature=EKFAC(), dtype=torch.float32, batch_size=512, progress=False
            ).fit(train)
        )
        scores["ekfac"] = ekfac.score(query).values
        _, times["train_gradients"] = timed(
            lambda: datatrace.InfluenceFunction(
                model, task, curvature="identity", dtype=torch.float32, batch_size=512, progress=False
            ).fit(train)
        )
        fmodel = FunctionalModel(prepare_model(model, torch.float32), task)
        v = torch.randn(20, fmodel.num_params, generator=torch.Generator().manual_seed(1))
        scores["ggn"], times["ggn_products"] = timed(
            lambda: ggn_vp(fmodel, v, as_data_source(train, batch_size=512))
        )
        projected, times["store_fill"] = timed(
            lambda: datatrace.ProjectedInfluence(
                model,
                task,
                projector=RandomProjector(dim=256),
                store_dir=out / "store",  # the same (fresh) directory on every rank
                batch_size=512,
                progress=False,
            ).fit(train)
        )
        scores["projected"] = projected.score(query).values
        if is_main_process():
            torch.save({k: t.detach().clone() for k, t in scores.items()}, out / "scores.pt")
            (out / "times.json").write_text(json.dumps({"world_size": world()[1], **times}))
        if dist.is_initialized():
            dist.barrier()  # leave together: a rank tearing down while another works can abort inside gloo
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(world_size: int, out: Path, n: int, width: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    script = [str(Path(__file__).resolve()), "--worker", str(out), "--n-train", str(n), "--width", str(width)]
    if world_size == 1:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world_size}",
        ]
        command += script
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"world size {world_size} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads((out / "times.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-sizes", default="1,2", help="comma-separated process counts (default 1,2)")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    parser.add_argument("--quick", action="store_true", help="n = 2,000")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(Path(args.worker), args.n_train, args.width)
        return
    n = 2000 if args.quick else args.n_train
    sizes = [int(s) for s in args.world_sizes.split(",")]
    if sizes[0] != 1:
        sizes = [1, *sizes]
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            out = Path(tmp) / f"w{size}"
            row = launch(size, out, n, args.width)
            scores = torch.load(out / "scores.pt", weights_only=True)
            if reference is None:
                reference, base = scores, row
            row["max_rel_diff_scores"] = max(
                float((scores[k] - reference[k]).abs().max() / reference[k].abs().max()) for k in reference
            )
            for task in TASKS:
                row[f"{task}_speedup"] = base[task] / row[task]
            rows.append(row)
            print(common.table(rows[-1:], COLUMNS), flush=True)
    print()
    print(common.table(rows, COLUMNS))
    payload = {
        "benchmark": "speed-up of datatrace's passes over the training data under torchrun (bench_distributed.py)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "torch_threads_per_rank": 1,
        },
        "versions": {"torch": torch.__version__, **common.versions(["datatrace"])},
        "problem": f"MLP 64-{args.width}-10 float32, {n} random training examples, 16 queries, batches of 512",
        "rows": rows,
    }
    name = "distributed_quick.json" if args.quick else "distributed.json"
    common.write_json(common.RESULTS_DIR / name, payload)
    print(f"wrote {common.RESULTS_DIR / name}")


if __name__ == "__main__":
    main()
