"""ProjectedInfluence and GradientStore sharded over a real 2-process gloo group on 127.0.0.1.

tests/scale/_dist_store_worker.py runs the same program on each rank; here the results of both ranks are compared with
the same program run in this process, without a process group: in-memory features and curvature, a store written
by two ranks (the same files as one process writes, each chunk computed once), scoring and top-k against it, a
failure on one rank (both ranks raise, none hangs), and resuming the interrupted store under two ranks (only the
missing chunks are computed).
"""

from __future__ import annotations

import json

import pytest
import torch
from _dist_store_worker import (
    CHUNK,
    N_TRAIN,
    PLAIN_CHUNK,
    PLAIN_N,
    fit_all,
    plain_features,
    run,
)
from _gloo import load_ranks, spawn

from datatrace.distributed import barrier, raise_if_any_failed
from datatrace.projection.store import GradientStore

TOL = {"rtol": 1e-10, "atol": 1e-12}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist_store")
    spawn(run, 2, str(outdir))
    tensors, facts = load_ranks(outdir, 2)
    return outdir, tensors, facts


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process answers: the worker's program run here, with no process group."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outdir = tmp_path_factory.mktemp("single")
        tensors, facts = fit_all(outdir)
    finally:
        torch.set_num_threads(threads)
    return outdir, tensors, facts


def _manifest(directory) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["accumulators"].pop("file")  # a random name; its sha256 is compared
    return manifest


# -- single process: the new helpers ------------------------------------------------------------------------------


def test_new_helpers_are_identities_in_a_single_process():
    raise_if_any_failed(None)
    barrier()
    with pytest.raises(KeyError, match="mine"):
        raise_if_any_failed(KeyError("mine"))
    with pytest.raises(ValueError, match=r"error='oops'.*exception or None"):
        raise_if_any_failed("oops")


# -- two gloo processes -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_in_memory_fit_is_sharded_and_matches_one_process(two_ranks, reference):
    _, tensors, facts = two_ranks
    _, ref, ref_facts = reference
    # whole batches of 8 per rank: 3 batches (24 rows) and 3 batches (17 rows); one process did all 41
    assert [f["memory_processed"] for f in facts] == [24, 17]
    assert [f["sketched_processed"] for f in facts] == [24, 17]
    assert ref_facts["memory_processed"] == ref_facts["sketched_processed"] == N_TRAIN
    for t in tensors:
        assert t["memory_features"].shape == (N_TRAIN, 12)
        for key in ("features", "query_features", "curvature", "gradient_norm", "scores", "self"):
            torch.testing.assert_close(t[f"memory_{key}"], ref[f"memory_{key}"], **TOL)
        for key in ("pos_v", "neg_v"):
            torch.testing.assert_close(t[f"memory_top_{key}"], ref[f"memory_top_{key}"], **TOL)
        for key in ("pos_i", "neg_i"):
            assert torch.equal(t[f"memory_top_{key}"], ref[f"memory_top_{key}"])
        # the same batches (and Rademacher signs) as one process: float16 rows gathered bit for bit
        assert t["sketched_features"].dtype == torch.float16
        assert torch.equal(t["sketched_features"], ref["sketched_features"])
        torch.testing.assert_close(t["sketched_scores"], ref["sketched_scores"], **TOL)
    assert torch.equal(tensors[0]["memory_scores"], tensors[1]["memory_scores"])  # identical on both ranks


@pytest.mark.slow
def test_store_written_by_two_ranks_is_the_single_process_store(two_ranks, reference):
    outdir, tensors, facts = two_ranks
    ref_dir, ref, ref_facts = reference
    # each chunk computed once: rank 0 chunks 0, 2, 4, 6, 8 (5+5+5+5+1 rows), rank 1 chunks 1, 3, 5, 7
    assert [f["store_processed"] for f in facts] == [21, 20]
    assert ref_facts["store_processed"] == N_TRAIN
    assert [f["reuse_processed"] for f in facts] == [0, 0]  # a complete store is reused by every rank
    # the same manifest (fingerprints, chunk checksums, accumulator checksum) as one process: the same files
    manifest = _manifest(outdir / "store")
    assert manifest["complete"] and manifest["n_chunks"] == -(-N_TRAIN // CHUNK)
    assert manifest == _manifest(ref_dir / "store")
    chunk_files = sorted(p.name for p in (outdir / "store").iterdir() if p.name.startswith("chunk-"))
    assert chunk_files == [f"chunk-{i:06d}.npy" for i in range(manifest["n_chunks"])]
    assert not [p.name for p in (outdir / "store").iterdir() if p.name.endswith(".tmp")]
    GradientStore(outdir / "store").verify()
    for t in tensors:  # every rank read the whole store
        assert torch.equal(t["store_features"], ref["store_features"])
        assert torch.equal(t["store_ggn"], ref["store_ggn"])
        for key in ("curvature", "gradient_norm", "scores", "self", "top_pos_v", "top_neg_v"):
            torch.testing.assert_close(t[f"store_{key}"], ref[f"store_{key}"], **TOL)
        for key in ("top_pos_i", "top_neg_i"):
            assert torch.equal(t[f"store_{key}"], ref[f"store_{key}"])
        torch.testing.assert_close(t["store_scores"], ref["memory_scores"], **TOL)


@pytest.mark.slow
def test_store_filled_directly_by_two_ranks(two_ranks, reference):
    _, tensors, facts = two_ranks
    _, ref, ref_facts = reference
    # chunk j to rank j % 2, never twice
    assert facts[0]["plain_calls"] == [0, 8, 16] and facts[1]["plain_calls"] == [4, 12, 20]
    assert ref_facts["plain_calls"] == list(range(0, PLAIN_N, PLAIN_CHUNK))
    feats = plain_features()
    for t in tensors:
        assert torch.equal(t["plain_features"], feats.float())
        torch.testing.assert_close(t["plain_scores"], ref["plain_scores"], rtol=0, atol=0)
        torch.testing.assert_close(
            t["plain_scores"], feats[:3] @ feats.float().double().T, rtol=1e-12, atol=1e-12
        )
        assert torch.equal(t["plain_top_i"], ref["plain_top_i"])
        assert torch.equal(t["plain_top_v"], ref["plain_top_v"])
        assert t["plain_all_i"].shape == (3, PLAIN_N)  # k > n: all scores, most negative first
        assert torch.equal(t["plain_all_i"], ref["plain_all_i"])
        assert torch.equal(t["plain_all_v"], ref["plain_all_v"])


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_both(two_ranks):
    _, tensors, facts = two_ranks
    for name in ("store", "memory"):
        assert facts[1][f"{name}_error"] == "ValueError: simulated failure at a marked training example"
        message = facts[0][f"{name}_error"]
        assert message.startswith("RuntimeError: rank(s) [1] failed while computing")
        assert "see the exception raised on rank 1" in message
    # rounds 0-1 (chunks 0-3) were complete; in round 2 rank 0's chunk 4 was still recorded, rank 1's chunk 5 failed
    assert facts[0]["missing_after_failure"] == facts[1]["missing_after_failure"] == [5, 6, 7, 8]
    for t in tensors:
        assert t["after_errors"].item() == 2.0


@pytest.mark.slow
def test_resuming_under_two_ranks_computes_only_the_missing_chunks(two_ranks, reference):
    outdir, tensors, facts = two_ranks
    ref_dir, ref, ref_facts = reference
    # missing chunks 5, 6, 7, 8 dealt out again: rank 0 chunks 5 and 7 (10 rows), rank 1 chunks 6 and 8 (5 + 1)
    assert [f["resume_processed"] for f in facts] == [10, 6]
    assert sum(f["resume_processed"] for f in facts) == N_TRAIN - 5 * CHUNK
    assert ref_facts["resume_processed"] == N_TRAIN
    # the resumed store is the one a single uninterrupted process writes, accumulators included
    assert _manifest(outdir / "resume") == _manifest(ref_dir / "resume")
    GradientStore(outdir / "resume").verify()
    for t in tensors:
        torch.testing.assert_close(t["resume_scores"], ref["resume_scores"], **TOL)
        torch.testing.assert_close(t["resume_scores"], ref["memory_scores"], **TOL)
