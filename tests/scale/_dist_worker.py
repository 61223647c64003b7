"""Worker for tests/scale/test_distributed.py: one rank of a 2-process gloo group on 127.0.0.1 (CPU only).

Every rank runs the same program (SPMD), calls datatrace.distributed with FunctionalModel methods on its own shard
and writes what it got to ``outdir/rank{r}.safetensors`` (tensors) and ``outdir/rank{r}.json`` (facts and error
messages). The test compares both ranks with a single-process computation.
"""

from __future__ import annotations

import torch
from _gloo import run_rank
from torch import nn

from datatrace import ClassificationTask
from datatrace.attributors.tracin import TracIn
from datatrace.data import as_data_source
from datatrace.distributed import (
    all_gather_rows,
    all_reduce_sum,
    distributed_per_example,
    distributed_sum,
    local_only,
    shard_indices,
    world,
)
from datatrace.gradients.functional import FunctionalModel, prepare_model

QUERY = 5  # the first QUERY training examples are the queries of the curvature routes below

N_TRAIN = 41  # odd: the two shards differ in size (21 and 20)
BATCH = 8


def problem() -> tuple[nn.Module, ClassificationTask, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The same tiny float64 classification problem on every rank (and in the test process)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N_TRAIN, 3, generator=g, dtype=torch.float64)
    y = torch.arange(N_TRAIN) % 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    p = sum(v.numel() for v in model.parameters())
    vectors = torch.randn(2, p, generator=g, dtype=torch.float64)
    return model, ClassificationTask(weight_decay=0.05), (X, y), vectors


def sums_by_methods(fmodel: FunctionalModel, vectors: torch.Tensor, n: int):
    """Per-batch partial sums written with FunctionalModel's own methods applied to one batch at a time.

    On a batch of b examples ``objective_grad`` is ``(1/b) sum grad l + reg * theta`` and ``hvp`` is
    ``(1/b) sum H_j v + reg * v``; removing the regulariser and rescaling by ``b / n`` gives the batch's share of
    the full-data quantity, whose sum over all batches (plus the regulariser once) is the full-data value.
    """

    # local_only: the methods shard over the process group themselves; here each applies to one local batch
    def grad_part(batch):
        b = len(batch[0])
        with local_only():
            return (fmodel.objective_grad(as_data_source(batch)) - fmodel.regularizer * fmodel.theta) * b / n

    def hvp_part(batch):
        b = len(batch[0])
        with local_only():
            return (fmodel.hvp(vectors, as_data_source(batch)) - vectors * fmodel.regularizer) * b / n

    def ggn_part(batch):
        b = len(batch[0])
        with local_only():
            return (fmodel.dense_gauss_newton(as_data_source(batch)) - torch.diag(fmodel.regularizer)) * b / n

    return grad_part, hvp_part, ggn_part


def run(rank: int, world_size: int, port: int, outdir: str) -> None:
    run_rank(rank, world_size, port, outdir, lambda: _checks(rank, world_size))


def _checks(rank: int, world_size: int) -> tuple[dict[str, torch.Tensor], dict]:
    out: dict[str, torch.Tensor] = {}
    facts: dict = {"world": list(world()), "shard_7": shard_indices(7).tolist()}
    with local_only():
        facts["world_local_only"] = list(world())

    # -- collectives -------------------------------------------------------------------------------------------
    mine = torch.arange(6, dtype=torch.float64).reshape(2, 3) * (rank + 1) + 0.25
    summed = all_reduce_sum(mine)
    facts["all_reduce_left_input_alone"] = bool(
        torch.equal(mine, torch.arange(6.0).reshape(2, 3) * (rank + 1) + 0.25)
    )
    out["all_reduce"] = summed
    rows = torch.full((3 if rank == 0 else 1, 2, 2), float(rank + 1), dtype=torch.float64)
    rows[:, 0, 0] = torch.arange(rows.shape[0], dtype=torch.float64)
    out["gather_unequal"] = all_gather_rows(rows)
    out["gather_int"] = all_gather_rows(torch.arange(rank + 1, dtype=torch.long) + 10 * rank)
    out["gather_none"] = all_gather_rows(None if rank == 1 else torch.ones(2, 5, dtype=torch.float32))
    out["gather_zero_rows"] = all_gather_rows(torch.zeros(0, 4) if rank == 0 else torch.ones(3, 4))
    try:
        all_gather_rows(torch.zeros(2, 3 if rank == 0 else 4))
        facts["mismatch_error"] = None
    except ValueError as err:
        facts["mismatch_error"] = str(err)

    # -- FunctionalModel methods on this rank's shard ----------------------------------------------------------
    model, task, data, vectors = problem()
    fmodel = FunctionalModel(prepare_model(model, torch.float64), task)
    source = as_data_source(data, "train", batch_size=BATCH)
    n = len(source)
    out["per_example_grads"] = distributed_per_example(fmodel.per_example_grads, source)
    out["per_example_grads_bs5"] = distributed_per_example(fmodel.per_example_grads, source, batch_size=5)
    grad_part, hvp_part, ggn_part = sums_by_methods(fmodel, vectors, n)
    out["objective_grad"] = distributed_sum(grad_part, source) + fmodel.regularizer * fmodel.theta
    out["hvp"] = distributed_sum(hvp_part, source) + vectors * fmodel.regularizer
    out["ggn"] = distributed_sum(ggn_part, source) + torch.diag(fmodel.regularizer)
    # the methods themselves shard over the ranks and reduce (datatrace.gradients.functional uses datatrace.distributed)
    out["objective_grad_integrated"] = fmodel.objective_grad(source)
    out["hvp_integrated"] = fmodel.hvp(vectors, source)
    out["ggn_integrated"] = fmodel.dense_gauss_newton(source)
    out["index_sum"] = distributed_sum(lambda idx, batch: idx.double().sum(), source, with_indices=True)

    # a data set smaller than the world: rank 1's shard is empty
    one = as_data_source((data[0][:1], data[1][:1]), "one")
    out["tiny_rows"] = distributed_per_example(fmodel.per_example_grads, one)
    out["tiny_sum"] = distributed_sum(grad_part, one)

    # a failure on one rank reaches every rank instead of leaving the other one waiting
    def flaky(idx, batch):
        if rank == 1:
            raise ValueError("boom on rank 1")
        return fmodel.per_example_grads(batch)

    for name, call in (
        ("rows", lambda: distributed_per_example(flaky, source, with_indices=True)),
        ("sum", lambda: distributed_sum(lambda i, b: flaky(i, b).sum(0), source, with_indices=True)),
    ):
        try:
            call()
            facts[f"error_{name}"] = None
        except Exception as err:
            facts[f"error_{name}"] = f"{type(err).__name__}: {err}"
    # still in step after the failures: a later collective works
    out["after_errors"] = all_reduce_sum(torch.ones(1, dtype=torch.float64))

    # -- an attributor built on the helpers: TracIn shards its gradients over the ranks -----------------------
    ckpts = [{k: v.detach().clone() + 0.1 * s for k, v in model.state_dict().items()} for s in range(2)]
    tracin = TracIn(model, task, ckpts, [0.1, 0.05], batch_size_train=4, batch_size=BATCH, progress=False)
    out["tracin"] = tracin.fit(data).score((data[0][:5], data[1][:5])).values

    # -- curvature routes shard their passes over the data (K-FAC factors, EK-FAC eigenvalues, GGN products,
    # diagonals); the influence scores then equal the single process's
    out.update(curvature_scores(model, task, data))
    out.update(tiny_influence(model, task, data))

    # an InfluenceFunction fitted sharded refuses to be used by one rank alone (it holds a shard)
    from datatrace import InfluenceFunction

    inf = InfluenceFunction(model, task, curvature="identity", progress=False).fit(data)
    with local_only():
        try:
            inf.self_influence()
            facts["local_only_error"] = None
        except RuntimeError as err:
            facts["local_only_error"] = str(err)
    out["after_local_only"] = inf.self_influence()  # still usable by all ranks together
    return out, facts


def tiny_influence(model: nn.Module, task: ClassificationTask, data: tuple) -> dict[str, torch.Tensor]:
    """Fewer training examples than ranks: rank 1 holds no training gradient (EK-FAC solves zero rows there)."""
    from datatrace import InfluenceFunction
    from datatrace.curvature.kfac import EKFAC

    two = (data[0][:1], data[1][:1])
    inf = InfluenceFunction(model, task, curvature=EKFAC(), progress=False).fit(two)
    return {"tiny_self": inf.self_influence(), "tiny_scores": inf.score((data[0][:3], data[1][:3])).values}


def curvature_routes() -> dict:
    """name -> a fresh curvature object, for the worker and for the single-process reference."""
    from datatrace.curvature import CG, Diagonal
    from datatrace.curvature.kfac import EKFAC, KFAC

    return {
        "kfac": lambda: KFAC(),
        "ekfac": lambda: EKFAC(),
        "ekfac_empirical": lambda: EKFAC(fisher="empirical"),
        "cg_gauss_newton": lambda: CG(matrix="gauss-newton", rtol=1e-12),
        "diagonal_ggn": lambda: Diagonal(),
        "diagonal_empirical": lambda: Diagonal(matrix="empirical-fisher"),
    }


def curvature_scores(model: nn.Module, task: ClassificationTask, data: tuple) -> dict[str, torch.Tensor]:
    from datatrace import InfluenceFunction

    out = {}
    for name, make in curvature_routes().items():
        inf = InfluenceFunction(model, task, curvature=make(), batch_size=BATCH, progress=False).fit(data)
        out[f"scores_{name}"] = inf.score((data[0][:QUERY], data[1][:QUERY])).values
        out[f"self_{name}"] = inf.self_influence()
        picked = [40, 3, 20, 3]  # both shards, unordered, a repeat (params_change only: removal takes a set)
        out[f"params_{name}"] = torch.cat([v.reshape(4, -1) for v in inf.params_change(picked).values()], 1)
        out[f"removal_{name}"] = torch.cat([v.reshape(-1) for v in inf.removal_params(picked[:3]).values()])
        out[f"local_rows_{name}"] = torch.tensor([len(inf.local_grads_)])
        out[f"train_grads_{name}"] = inf.train_grads_
        if hasattr(inf.curvature_, "layers_"):  # examples counted over all ranks: n, not n per rank
            info = inf.curvature_.info
            out[f"examples_{name}"] = torch.tensor([info["examples"], info["examples_this_rank"]])
    # streamed training gradients (never kept): each rank recomputes its shard in every call
    make = curvature_routes()["ekfac"]
    inf = InfluenceFunction(
        model, task, curvature=make(), batch_size=BATCH, progress=False, keep_gradients=False
    ).fit(data)
    out["streamed_scores"] = inf.score((data[0][:QUERY], data[1][:QUERY])).values
    out["streamed_self"] = inf.self_influence()
    picked = [40, 3, 20, 3]
    out["streamed_params"] = torch.cat([v.reshape(4, -1) for v in inf.params_change(picked).values()], 1)
    out["streamed_removal"] = torch.cat([v.reshape(-1) for v in inf.removal_params(picked[:3]).values()])
    return out
