"""datatrace.distributed: single-process identities, shard planning, and a real 2-process gloo group on 127.0.0.1.

The 2-process test spawns ranks with torch.multiprocessing (spawn); each rank calls the helpers with
FunctionalModel methods on its own shard (tests/scale/_dist_worker.py) and the results must equal the single-process
computation to 1e-10 in float64, on both ranks.
"""

from __future__ import annotations

import pytest
import torch
from _dist_worker import (
    BATCH,
    N_TRAIN,
    curvature_routes,
    curvature_scores,
    problem,
    run,
    sums_by_methods,
    tiny_influence,
)
from _gloo import load_ranks, spawn

from datatrace import ClassificationTask, InfluenceFunction
from datatrace.attributors.tracin import TracIn
from datatrace.data import as_data_source
from datatrace.distributed import (
    all_gather_rows,
    all_reduce_sum,
    distributed_per_example,
    distributed_sum,
    is_main_process,
    local_only,
    shard_bounds,
    shard_indices,
    world,
)
from datatrace.gradients.functional import FunctionalModel, prepare_model

TOL = {"rtol": 1e-10, "atol": 1e-10}

# -- single process: every helper is the identity ----------------------------------------------------------------


def test_single_process_is_the_identity(classification_data, make_mlp):
    assert world() == (0, 1, False)
    assert is_main_process()
    with local_only():
        assert world() == (0, 1, False)
    t = torch.randn(3, 2)
    assert all_reduce_sum(t) is t
    assert all_gather_rows(t) is t
    assert all_gather_rows(None) is None
    assert torch.equal(shard_indices(5), torch.arange(5))
    X, y = classification_data
    fmodel = FunctionalModel(prepare_model(make_mlp(), torch.float64), ClassificationTask())
    source = as_data_source((X, y), batch_size=7)
    direct = torch.cat([fmodel.per_example_grads(b) for _, b in source.batches()])
    torch.testing.assert_close(
        distributed_per_example(fmodel.per_example_grads, source), direct, rtol=0, atol=0
    )
    torch.testing.assert_close(
        distributed_sum(lambda b: fmodel.per_example_grads(b).sum(0), (X, y)), direct.sum(0), **TOL
    )
    seen = []
    distributed_per_example(lambda idx, b: seen.append(idx) or b[0], source, with_indices=True)
    assert torch.equal(torch.cat(seen), torch.arange(len(X)))


def test_single_process_errors_propagate_unchanged(classification_data):
    def bad(batch):
        raise KeyError("from fn")

    with pytest.raises(KeyError, match="from fn"):
        distributed_per_example(bad, classification_data)
    with pytest.raises(ValueError, match=r"fn returned a tensor of shape \(2,\) for a batch of 60 examples"):
        distributed_per_example(lambda b: torch.zeros(2), classification_data)
    with pytest.raises(ValueError, match=r"fn returned a float; it must return a tensor"):
        distributed_sum(lambda b: 1.0, classification_data)
    with pytest.raises(ValueError, match=r"every batch must give the same shape"):
        distributed_sum(lambda b: torch.zeros(len(b[0])), as_data_source(classification_data, batch_size=50))


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 100])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shards_are_contiguous_balanced_and_cover_everything(n, world_size):
    shards = [shard_indices(n, rank=r, world_size=world_size) for r in range(world_size)]
    assert torch.equal(torch.cat(shards), torch.arange(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger shards come first
    assert [(int(s[0]), int(s[-1]) + 1) for s in shards if len(s)] == [
        b for b in shard_bounds(n, world_size) if b[0] < b[1]
    ]
    assert all(
        torch.equal(a, b)
        for a, b in zip(shards, [shard_indices(n, r, world_size) for r in range(world_size)])
    )


def test_shard_arguments_are_checked():
    with pytest.raises(ValueError, match=r"rank=1.*together"):
        shard_indices(5, rank=1)
    with pytest.raises(ValueError, match=r"rank=2.*0 <= rank < world_size=2"):
        shard_indices(5, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"world_size=0"):
        shard_bounds(5, 0)
    with pytest.raises(ValueError, match=r"n=-1.*integer >= 0"):
        shard_bounds(-1, 2)
    with pytest.raises(ValueError, match=r"tensor=\[1, 2\].*torch.Tensor"):
        all_reduce_sum([1, 2])


# -- two gloo processes on 127.0.0.1 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    spawn(run, 2, str(outdir))
    tensors, facts = load_ranks(outdir, 2)
    return tensors, facts


@pytest.fixture(scope="module")
def reference():
    """The single-process answers, computed here with no process group."""
    model, task, data, vectors = problem()
    fmodel = FunctionalModel(prepare_model(model, torch.float64), task)
    source = as_data_source(data, "train", batch_size=BATCH)
    n = len(source)
    grad_part, hvp_part, ggn_part = sums_by_methods(fmodel, vectors, n)
    ckpts = [{k: v.detach().clone() + 0.1 * s for k, v in model.state_dict().items()} for s in range(2)]
    tracin = TracIn(model, task, ckpts, [0.1, 0.05], batch_size_train=4, batch_size=BATCH, progress=False)
    one = as_data_source((data[0][:1], data[1][:1]))
    return {
        "per_example_grads": torch.cat([fmodel.per_example_grads(b) for _, b in source.batches()]),
        "objective_grad": fmodel.objective_grad(source),
        "hvp": fmodel.hvp(vectors, source),
        "ggn": fmodel.dense_gauss_newton(source),
        "sum_of_parts": {
            "objective_grad": sum(grad_part(b) for _, b in source.batches())
            + fmodel.regularizer * fmodel.theta,
            "hvp": sum(hvp_part(b) for _, b in source.batches()) + vectors * fmodel.regularizer,
            "ggn": sum(ggn_part(b) for _, b in source.batches()) + torch.diag(fmodel.regularizer),
        },
        "tiny_rows": fmodel.per_example_grads(one.get([0])),
        "tiny_sum": grad_part(one.get([0])),
        **tiny_influence(model, task, data),
        "tracin": tracin.fit(data).score((data[0][:5], data[1][:5])).values,
        **curvature_scores(model, task, data),
    }


@pytest.mark.slow
def test_two_ranks_collectives(two_ranks):
    tensors, facts = two_ranks
    for rank in range(2):
        t, f = tensors[rank], facts[rank]
        assert f["world"] == [rank, 2, True]
        assert f["world_local_only"] == [0, 1, False]
        assert f["shard_7"] == ([0, 1, 2, 3] if rank == 0 else [4, 5, 6])
        assert f["all_reduce_left_input_alone"]
        expected_sum = torch.arange(6, dtype=torch.float64).reshape(2, 3) * 3 + 0.5
        torch.testing.assert_close(t["all_reduce"], expected_sum, rtol=0, atol=0)
        gathered = t["gather_unequal"]
        assert gathered.shape == (4, 2, 2) and gathered.dtype == torch.float64
        torch.testing.assert_close(gathered[:, 0, 0], torch.tensor([0.0, 1.0, 2.0, 0.0], dtype=torch.float64))
        torch.testing.assert_close(gathered[:, 1, 1], torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64))
        assert t["gather_int"].dtype == torch.int64
        assert t["gather_int"].tolist() == [0, 10, 11]
        assert t["gather_none"].dtype == torch.float32 and t["gather_none"].shape == (2, 5)
        assert t["gather_zero_rows"].shape == (3, 4)
        assert "ranks disagree on tensor" in f["mismatch_error"] and "(rows, *(4,))" in f["mismatch_error"]
        assert t["after_errors"].item() == 2.0


@pytest.mark.slow
def test_two_ranks_match_single_process_functional_model(two_ranks, reference):
    tensors, _ = two_ranks
    for rank in range(2):
        t = tensors[rank]
        assert t["per_example_grads"].shape == (N_TRAIN, reference["per_example_grads"].shape[1])
        torch.testing.assert_close(t["per_example_grads"], reference["per_example_grads"], **TOL)
        torch.testing.assert_close(t["per_example_grads_bs5"], reference["per_example_grads"], **TOL)
        torch.testing.assert_close(t["objective_grad"], reference["objective_grad"], **TOL)
        for key in ("objective_grad", "hvp", "ggn"):  # the per-batch shares add up to the full quantity
            torch.testing.assert_close(reference["sum_of_parts"][key], reference[key], **TOL)
        torch.testing.assert_close(t["hvp"], reference["hvp"], **TOL)
        for key in ("objective_grad", "hvp", "ggn"):
            torch.testing.assert_close(t[f"{key}_integrated"], reference[key], **TOL)
        torch.testing.assert_close(t["ggn"], reference["ggn"], **TOL)
        assert t["index_sum"].item() == sum(range(N_TRAIN))
        torch.testing.assert_close(t["tiny_rows"], reference["tiny_rows"], **TOL)
        torch.testing.assert_close(t["tiny_sum"], reference["tiny_sum"], **TOL)
        for key in ("tiny_self", "tiny_scores"):  # n = 1 < 2 ranks: rank 1 has an empty shard
            torch.testing.assert_close(t[key], reference[key], **TOL)
        torch.testing.assert_close(t["tracin"], reference["tracin"], **TOL)
    torch.testing.assert_close(
        tensors[0]["hvp"], tensors[1]["hvp"], rtol=0, atol=0
    )  # identical on both ranks


@pytest.mark.slow
@pytest.mark.parametrize("route", sorted(curvature_routes()))
def test_two_ranks_curvature_routes_match_single_process(two_ranks, reference, route):
    """K-FAC / EK-FAC factors, CG on Gauss-Newton products and the diagonal routes are fitted from shards (each
    rank passes over its own examples; the statistics are all-reduced) and score like one process."""
    tensors, _ = two_ranks
    expected = reference[f"scores_{route}"]
    assert expected.abs().max() > 0
    for rank in range(2):
        torch.testing.assert_close(tensors[rank][f"scores_{route}"], expected, **TOL)
        for what in ("self", "params", "removal", "train_grads"):
            torch.testing.assert_close(tensors[rank][f"{what}_{route}"], reference[f"{what}_{route}"], **TOL)
        # each rank keeps only its shard of the n x p training gradients
        shard = len(shard_indices(N_TRAIN, rank=rank, world_size=2))
        assert tensors[rank][f"local_rows_{route}"].item() == shard
        if f"examples_{route}" in reference:  # K-FAC passes: all n examples seen, each by one rank only
            assert reference[f"examples_{route}"].tolist() == [N_TRAIN, N_TRAIN]
            assert tensors[rank][f"examples_{route}"].tolist() == [N_TRAIN, shard]
    assert reference[f"local_rows_{route}"].item() == N_TRAIN


@pytest.mark.slow
def test_two_ranks_streamed_gradients_match_the_kept_ones_of_one_process(two_ranks, reference):
    """keep_gradients=False: each rank recomputes its shard's gradients in every call; the gathered scores,
    self-influence and parameter changes are those of one process keeping all the gradients."""
    tensors, _ = two_ranks
    for what in ("scores", "self", "params", "removal"):
        expected = reference[f"{what}_ekfac"]
        torch.testing.assert_close(reference[f"streamed_{what}"], expected, **TOL)
        for rank in range(2):
            torch.testing.assert_close(tensors[rank][f"streamed_{what}"], expected, **TOL)


@pytest.mark.slow
def test_two_ranks_sharded_influence_refuses_local_only_use(two_ranks, reference):
    tensors, facts = two_ranks
    model, task, data, _ = problem()
    expected = InfluenceFunction(model, task, curvature="identity", progress=False).fit(data).self_influence()
    for rank in range(2):
        message = facts[rank]["local_only_error"]
        assert (
            message is not None and "fitted sharded over 2 process(es)" in message and "local_only" in message
        )
        torch.testing.assert_close(tensors[rank]["after_local_only"], expected, **TOL)


@pytest.mark.slow
def test_two_ranks_a_failure_on_one_rank_stops_both(two_ranks):
    _, facts = two_ranks
    for name in ("rows", "sum"):
        assert facts[1][f"error_{name}"] == "ValueError: boom on rank 1"
        message = facts[0][f"error_{name}"]
        assert message.startswith("RuntimeError: rank(s) [1] failed while computing")
        assert "see the exception raised on rank 1" in message
