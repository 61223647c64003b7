"""Worker for tests/scale/test_distributed_store.py: one rank of a 2-process gloo group on 127.0.0.1 (CPU only).

Every rank runs the same program (SPMD): ProjectedInfluence in memory and through a GradientStore, a store filled
directly, a failure on rank 1 (in memory and mid-store), and the resumption of the interrupted store. Each rank
writes what it got to ``outdir/rank{r}.safetensors`` (tensors) and ``outdir/rank{r}.json`` (counts and error
messages); the stores themselves stay in ``outdir`` for the test to read. The test compares everything with a
single-process computation made by the same functions (:func:`fit_all`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from _gloo import run_rank
from torch import nn

from datatrace import ClassificationTask
from datatrace.attributors.projected import ProjectedInfluence
from datatrace.distributed import all_reduce_sum, barrier, world
from datatrace.projection import FactorizedProjector, RandomProjector
from datatrace.projection.scoring import score_against_store, top_k_against_store
from datatrace.projection.store import GradientStore

N_TRAIN = 41  # odd: in-memory shards of whole batches hold 24 and 17 examples
BATCH = 8
CHUNK = 5  # 9 chunks: rank 0 writes chunks 0, 2, 4, 6, 8 (21 rows), rank 1 chunks 1, 3, 5, 7 (20 rows)
FAIL_ROW = 27  # in chunk 5 (rank 1, third round) and in rank 1's in-memory shard (rows 24-40)
PLAIN_N, PLAIN_DIM, PLAIN_CHUNK = 23, 5, 4  # a store filled directly: 6 chunks, the last one short


class FailOn(ClassificationTask):
    """A ClassificationTask that raises on any batch holding the training input ``fail_row`` (if set)."""

    def __init__(self, fail_row: torch.Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_row = fail_row

    def outputs(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        x = batch[0]
        # shape[0] > 1: not the per-example calls inside torch.func transforms
        if self.fail_row is not None and x.shape[0] > 1 and bool((x == self.fail_row).all(dim=1).any()):
            raise ValueError("simulated failure at a marked training example")
        return super().outputs(model, batch)

    def __repr__(self) -> str:  # the same fingerprint, failing or not
        return f"FailOn(weight_decay={self.weight_decay!r})"


def problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The same tiny float64 problem on every rank (and in the test process): model, train, query."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N_TRAIN, 3, generator=g, dtype=torch.float64)
    y = torch.arange(N_TRAIN) % 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    Xq = torch.randn(7, 3, generator=g, dtype=torch.float64)
    return model, (X, y), (Xq, torch.arange(7) % 3)


def plain_features() -> torch.Tensor:
    return torch.randn(PLAIN_N, PLAIN_DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _common() -> dict[str, Any]:
    return {"dtype": torch.float64, "batch_size": BATCH, "progress": False}


def _projector() -> RandomProjector:
    return RandomProjector(dim=12, random_state=0)


def _outputs(prefix: str, inf: ProjectedInfluence, query: tuple, out: dict, facts: dict) -> None:
    out[f"{prefix}_curvature"] = inf.curvature_matrix_
    out[f"{prefix}_gradient_norm"] = torch.tensor([inf.gradient_norm_], dtype=torch.float64)
    out[f"{prefix}_scores"] = inf.score(query).values
    top = inf.proponents_opponents(query, 5)
    out[f"{prefix}_top_pos_i"], out[f"{prefix}_top_pos_v"] = top.proponents.indices, top.proponents.values
    out[f"{prefix}_top_neg_i"], out[f"{prefix}_top_neg_v"] = top.opponents.indices, top.opponents.values
    out[f"{prefix}_self"] = inf.self_influence()
    facts[f"{prefix}_processed"] = inf.info["train_examples_processed"]


def fit_all(outdir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every computation of the test, run under whatever process group is active (none in the test process)."""
    rank = world()[0]
    model, train, query = problem()
    task = ClassificationTask(weight_decay=0.05)
    out: dict[str, torch.Tensor] = {}
    facts: dict[str, Any] = {}

    # in memory: exact GGN, and a sketched GGN with 16-bit features through the factorised projection
    memory = ProjectedInfluence(model, task, projector=_projector(), **_common()).fit(train)
    out["memory_features"] = memory.train_features_
    out["memory_query_features"] = memory.query_features(query)
    _outputs("memory", memory, query, out, facts)
    sketched = ProjectedInfluence(
        model,
        task,
        projector=FactorizedProjector(3, 3),
        ggn_samples=2,
        feature_dtype=torch.float16,
        **_common(),
    ).fit(train)
    out["sketched_features"] = sketched.train_features_
    out["sketched_scores"] = sketched.score(query).values
    facts["sketched_processed"] = sketched.info["train_examples_processed"]

    # through a store, then reused
    kwargs = {"projector": _projector(), "chunk_size": CHUNK, **_common()}
    stored = ProjectedInfluence(model, task, store_dir=outdir / "store", **kwargs).fit(train)
    out["store_features"] = stored.store_.to_tensor()  # every rank reads the whole store
    out["store_ggn"] = stored.store_.accumulator("ggn")
    _outputs("store", stored, query, out, facts)
    again = ProjectedInfluence(model, task, store_dir=outdir / "store", **kwargs).fit(train)
    facts["reuse_processed"] = again.info["train_examples_processed"]

    # a store filled directly, without accumulators: count the chunks every rank computes
    feats = plain_features()
    calls: list[int] = []

    def compute(start: int, stop: int) -> torch.Tensor:
        calls.append(start)
        return feats[start:stop]

    plain = GradientStore.create(
        outdir / "plain", n=PLAIN_N, dim=PLAIN_DIM, chunk_size=PLAIN_CHUNK, fingerprints={"model": "m"}
    ).fill(compute, progress=False)
    facts["plain_calls"] = calls
    out["plain_features"] = plain.to_tensor()
    out["plain_scores"] = score_against_store(feats[:3], plain)
    top = top_k_against_store(feats[:3], plain, 4)
    out["plain_top_i"], out["plain_top_v"] = top.proponents.indices, top.proponents.values
    top = top_k_against_store(feats[:3], plain, 100)  # k > n: every score, ranked
    out["plain_all_i"], out["plain_all_v"] = top.opponents.indices, top.opponents.values

    # a failure mid-store on rank 1 only (multi-process runs); then the store is resumed
    resume = {"store_dir": outdir / "resume", **kwargs}
    if world()[2]:
        failing = FailOn(train[0][FAIL_ROW], weight_decay=0.05)
        facts["store_error"] = _error(lambda: ProjectedInfluence(model, failing, **resume).fit(train))
        facts["missing_after_failure"] = GradientStore(outdir / "resume").missing_chunks()
        facts["memory_error"] = _error(
            lambda: ProjectedInfluence(model, failing, projector=_projector(), **_common()).fit(train)
        )
    resumed = ProjectedInfluence(model, FailOn(None, weight_decay=0.05), **resume).fit(train)
    facts["resume_processed"] = resumed.info["train_examples_processed"]
    out["resume_scores"] = resumed.score(query).values
    # still in step after the failures: later collectives work
    barrier()
    out["after_errors"] = all_reduce_sum(torch.ones(1, dtype=torch.float64))
    facts["rank"] = rank
    return out, facts


def _error(call: Any) -> str | None:
    try:
        call()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def run(rank: int, world_size: int, port: int, outdir: str) -> None:
    run_rank(rank, world_size, port, outdir, lambda: fit_all(Path(outdir)))
