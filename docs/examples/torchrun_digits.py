"""Influence on several processes with ``torchrun``: the same script runs alone or as N ranks.

    python docs/examples/torchrun_digits.py --out /tmp/dt_one                       # one process
    torchrun --nproc-per-node 2 docs/examples/torchrun_digits.py --out /tmp/dt_two   # two ranks (gloo on CPU)

On more than one node use ``torchrun --nnodes ... --rdzv-endpoint ...`` as usual and an ``--out`` directory on a
file system every node sees (the gradient store lives there). Every rank runs the same calls (SPMD); datatrace
splits each pass over the training data between the ranks (K-FAC/EK-FAC statistics, per-example gradients, the
projected features and the store's chunks) and combines the parts, so every rank ends with the answer a single
process would give. Rank 0 writes ``scores.safetensors`` and ``run.json`` (how many training examples each rank
processed, wall times). The model is trained identically on every rank (same seed, full-batch L-BFGS); a real job
would load the same checkpoint on every rank instead.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn

import datatrace
from datatrace.curvature.kfac import EKFAC
from datatrace.distributed import all_gather_rows, is_main_process, world
from datatrace.projection import RandomProjector
from datatrace.verification.training import fit_full_batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (shared by all ranks)")
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-query", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: join its process group
        dist.init_process_group("gloo")  # "nccl" when the model is on CUDA
    try:
        run(Path(args.out), args.n_train, args.n_query)
        if dist.is_initialized():
            # Every rank waits for the others before tearing down: a rank that leaves while another still works can
            # abort inside gloo's connection threads ("terminate called without an active exception").
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(out: Path, n_train: int, n_query: int) -> None:
    rank, world_size, _ = world()
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target)
    train, query = (X[:n_train], y[:n_train]), (X[-n_query:], y[-n_query:])
    task = datatrace.ClassificationTask(weight_decay=1e-3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    model = fit_full_batch(model, task, train, max_iter=300)

    start = time.perf_counter()
    influence = datatrace.InfluenceFunction(model, task, curvature=EKFAC(), progress=False).fit(train)
    ekfac_scores = influence.score(query).values
    ekfac_seconds = time.perf_counter() - start

    start = time.perf_counter()
    projected = datatrace.ProjectedInfluence(
        model, task, projector=RandomProjector(dim=512), store_dir=out / "store", progress=False
    ).fit(train)
    projected_scores = projected.score(query).values
    top = projected.proponents_opponents(query, k=5)
    projected_seconds = time.perf_counter() - start

    mine = torch.tensor(
        [[rank, influence.curvature_.info["examples_this_rank"], projected.info["train_examples_processed"]]]
    )
    per_rank = all_gather_rows(mine)  # every rank calls the collective; rank 0 writes
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "ekfac": ekfac_scores.contiguous(),
                "projected": projected_scores.contiguous(),
                "top_proponents": top.proponents.indices.contiguous(),
            },
            str(out / "scores.safetensors"),
        )
        facts = {
            "world_size": world_size,
            "n_train": n_train,
            "examples_per_rank": {
                "ekfac": {int(r): int(e) for r, e, _ in per_rank.tolist()},
                "projected_store": {int(r): int(p) for r, _, p in per_rank.tolist()},
            },
            "seconds": {"ekfac_fit_and_score": ekfac_seconds, "projected_fit_and_score": projected_seconds},
        }
        (out / "run.json").write_text(json.dumps(facts, indent=2))
        print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
