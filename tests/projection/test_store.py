"""GradientStore: round trip, checksums, resumable writes, fingerprint refusal, blocked and streaming scoring; the
feature-source interface (memory and disk) and the model and data fingerprints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from datatrace.data import as_data_source
from datatrace.errors import StoreCorruptedError, StoreMismatchError
from datatrace.projection.features import FeatureSource, InMemoryFeatures, as_feature_source
from datatrace.projection.fingerprint import DATA_FINGERPRINT_SCHEME, data_fingerprint, model_fingerprint
from datatrace.projection.scoring import score_against_store, top_k_against_store
from datatrace.projection.store import GradientStore

FINGERPRINTS = {
    "model": "m" * 64,
    "data": {"n": 23, "sha256": "d" * 64},
    "projection": {"kind": "gaussian", "dim": 5},
}


def features(n: int = 23, dim: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def make_store(
    tmp_path, feats, dtype=torch.float32, chunk_size=4, fingerprints=FINGERPRINTS, accumulate=False
):
    store = GradientStore.create(
        tmp_path / "store",
        n=feats.shape[0],
        dim=feats.shape[1],
        dtype=dtype,
        chunk_size=chunk_size,
        fingerprints=fingerprints,
    )

    def compute(start, stop):
        rows = feats[start:stop]
        if accumulate:
            return rows, {"sum": rows.double().sum(0), "gram": rows.double().T @ rows.double()}
        return rows

    return store.fill(compute, progress=False)


# -- round trip ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_round_trip_in_every_dtype(tmp_path, dtype):
    feats = features()
    store = make_store(tmp_path, feats, dtype=dtype)
    assert store.complete and store.n_chunks == 6 and store.missing_chunks() == []
    assert store.rows(5) == (20, 23)
    back = store.to_tensor()
    assert back.dtype == dtype and torch.equal(back, feats.to(dtype))
    reopened = GradientStore(tmp_path / "store")
    assert reopened.n == 23 and reopened.dim == 5 and reopened.dtype == dtype
    assert reopened.fingerprints == json.loads(json.dumps(FINGERPRINTS))
    blocks = list(reopened.features())
    assert [b.start for b in blocks] == [0, 4, 8, 12, 16, 20]
    assert torch.equal(blocks[2].values, feats[8:12].to(dtype))
    only = list(reopened.features(3))
    assert len(only) == 1 and only[0].chunk == 3 and torch.equal(only[0].values, feats[12:16].to(dtype))
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["dtype"] == {torch.float32: "float32", torch.float16: "float16"}.get(
        dtype, manifest["dtype"]
    )
    assert all(len(entry["sha256"]) == 64 for entry in manifest["chunks"].values())


def test_chunks_are_memory_mapped_npy_files_readable_without_pickle(tmp_path):
    feats = features()
    store = make_store(tmp_path, feats)
    arr = np.load(tmp_path / "store" / "chunk-000001.npy", allow_pickle=False, mmap_mode="r")
    assert isinstance(arr, np.memmap) and np.array_equal(arr, feats[4:8].numpy())
    assert store.nbytes == 23 * 5 * 4


def test_accumulators_are_summed_over_chunks(tmp_path):
    feats = features()
    store = make_store(tmp_path, feats, accumulate=True)
    assert torch.allclose(store.accumulator("sum"), feats.double().sum(0))
    assert torch.allclose(store.accumulator("gram"), feats.double().T @ feats.double())
    leftovers = sorted(p.name for p in (tmp_path / "store").iterdir() if p.name.startswith("accumulators-"))
    assert len(leftovers) == 1  # older running sums are removed
    with pytest.raises(ValueError, match="name='nope'"):
        store.accumulator("nope")


# -- integrity -----------------------------------------------------------------------------------------------------


def test_verify_detects_a_corrupted_chunk(tmp_path):
    store = make_store(tmp_path, features(), accumulate=True)
    assert store.verify() is store
    path = tmp_path / "store" / "chunk-000002.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits in the data, not the header
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptedError, match=r"chunk 2: chunk-000002\.npy has sha256"):
        store.verify()
    (tmp_path / "store" / "chunk-000004.npy").unlink()
    with pytest.raises(StoreCorruptedError, match=r"chunk 4: chunk-000004\.npy is missing"):
        GradientStore(tmp_path / "store").verify()


def test_a_truncated_chunk_is_reported_on_read(tmp_path):
    store = make_store(tmp_path, features())
    (tmp_path / "store" / "chunk-000001.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(StoreCorruptedError, match=r"chunk 1 .*chunk-000001\.npy has sha256 .* Fix: delete"):
        store.chunk(1)


# -- resumable writes ----------------------------------------------------------------------------------------------


def test_interrupted_write_resumes_without_recomputing_finished_chunks(tmp_path):
    feats = features()
    calls = []

    def failing(start, stop):
        calls.append(start)
        if len(calls) == 4:  # chunk 3
            raise KeyboardInterrupt("simulated interruption in chunk 3")
        rows = feats[start:stop]
        return rows, {"sum": rows.double().sum(0)}

    store = GradientStore.create(tmp_path / "s", n=23, dim=5, chunk_size=4, fingerprints=FINGERPRINTS)
    with pytest.raises(KeyboardInterrupt):
        store.fill(failing, progress=False)
    assert calls == [0, 4, 8, 12]
    # only completed chunks exist, no half-written file looks whole, and the store says it is incomplete
    files = sorted(p.name for p in (tmp_path / "s").iterdir() if p.name.startswith("chunk-"))
    assert files == ["chunk-000000.npy", "chunk-000001.npy", "chunk-000002.npy"]
    reopened = GradientStore(tmp_path / "s")
    assert not reopened.complete and reopened.missing_chunks() == [3, 4, 5]
    with pytest.raises(RuntimeError, match="incomplete: 3 of 6 chunks are missing"):
        score_against_store(feats[:2], reopened)
    with pytest.raises(RuntimeError, match="incomplete"):
        reopened.accumulator("sum")

    resumed_calls = []

    def counting(start, stop):
        resumed_calls.append(start)
        rows = feats[start:stop]
        return rows, {"sum": rows.double().sum(0)}

    store = GradientStore.create(tmp_path / "s", n=23, dim=5, chunk_size=4, fingerprints=FINGERPRINTS)
    store.fill(counting, progress=False)
    assert resumed_calls == [12, 16, 20]  # chunks 0-2 reused, never recomputed
    assert store.complete and torch.equal(store.to_tensor(), feats)
    assert torch.allclose(store.accumulator("sum"), feats.double().sum(0))
    # a complete store is reused as is
    again = []
    GradientStore.create(tmp_path / "s", n=23, dim=5, chunk_size=4, fingerprints=FINGERPRINTS).fill(
        lambda a, b: again.append(a), progress=False
    )
    assert again == []


def test_reopening_without_chunk_size_keeps_the_stored_chunking(tmp_path):
    make_store(tmp_path, features(), chunk_size=4)
    again = GradientStore.create(tmp_path / "store", n=23, dim=5, fingerprints=FINGERPRINTS)
    assert again.chunk_size == 4 and again.complete


def test_a_chunk_is_written_once(tmp_path):
    store = make_store(tmp_path, features())
    with pytest.raises(ValueError, match="already written"):
        store.write_chunk(0, features()[:4])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("model", "x" * 64, "different model"),
        ("data", {"n": 23, "sha256": "e" * 64}, "different training data.*sha256: stored d+[.]+ vs now e+"),
        ("projection", {"kind": "gaussian", "dim": 5, "seed": 1}, "different projection"),
    ],
)
def test_refuses_to_mix_features_of_different_fingerprints(tmp_path, field, value, match):
    make_store(tmp_path, features())
    other = {**FINGERPRINTS, field: value}
    with pytest.raises(StoreMismatchError, match=match) as info:
        GradientStore.create(tmp_path / "store", n=23, dim=5, chunk_size=4, fingerprints=other)
    assert f"its '{field}' fingerprint differs" in str(info.value) and "Fix:" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n": 24}, "n=23"), ({"dim": 6}, "dim=5"), ({"dtype": torch.float16}, "dtype='float32'")],
)
def test_refuses_different_shapes_or_dtype(tmp_path, kwargs, match):
    make_store(tmp_path, features())
    args = {"n": 23, "dim": 5, "chunk_size": 4, "fingerprints": FINGERPRINTS, **kwargs}
    with pytest.raises(StoreMismatchError, match=match):
        GradientStore.create(tmp_path / "store", **args)


def test_write_validation(tmp_path):
    store = GradientStore.create(tmp_path / "v", n=10, dim=3, dtype=torch.float16, chunk_size=4)
    with pytest.raises(ValueError, match=r"needs shape \(4, 3\)"):
        store.write_chunk(0, torch.zeros(3, 3))
    with pytest.raises(FloatingPointError, match="row 1"):
        store.write_chunk(0, torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0], [0, 0, 0], [0, 0, 0]]))
    with pytest.raises(FloatingPointError, match="overflows float16"):
        store.write_chunk(0, torch.full((4, 3), 1e6))
    with pytest.raises(IndexError, match="chunk=3 is out of range"):
        store.write_chunk(3, torch.zeros(2, 3))
    assert store.missing_chunks() == [0, 1, 2]


def test_refuses_orphan_chunks_and_foreign_directories(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "chunk-000000.npy").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        GradientStore.create(tmp_path / "o", n=3, dim=2)
    with pytest.raises(FileNotFoundError, match="not a GradientStore"):
        GradientStore(tmp_path / "empty")


# -- scoring -------------------------------------------------------------------------------------------------------


def test_dense_scores_match_a_plain_product(tmp_path):
    feats = features()
    store = make_store(tmp_path, feats)
    Q = torch.randn(7, 5)
    M = torch.randn(5, 5)
    assert torch.allclose(score_against_store(Q, store), Q @ feats.T, atol=1e-6)
    got = score_against_store(Q, store, transform=lambda q: q @ M)
    assert torch.allclose(got, Q @ M @ feats.T, atol=1e-5)
    assert torch.allclose(score_against_store(Q, feats, block_rows=3), Q @ feats.T, atol=1e-6)  # in memory
    assert score_against_store(Q.double(), store).dtype == torch.float64
    with pytest.raises(ValueError, match=r"queries need shape \(7, 5\)"):
        score_against_store(torch.randn(7, 4), store)


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_streaming_top_k_equals_dense_topk(tmp_path, k):
    feats = features(n=41, dim=6, seed=3)
    store = make_store(tmp_path, feats, chunk_size=5)
    Q = torch.randn(9, 6, generator=torch.Generator().manual_seed(4))
    dense = Q @ feats.T
    got = top_k_against_store(Q, store, k, query_block=4)
    kk = min(k, 41)
    v, i = torch.topk(dense, kk, dim=1)
    assert torch.equal(got.proponents.indices, i) and torch.allclose(got.proponents.values, v, atol=1e-6)
    v, i = torch.topk(-dense, kk, dim=1)
    assert torch.equal(got.opponents.indices, i) and torch.allclose(got.opponents.values, -v, atol=1e-6)
    assert got.proponents.indices.shape == (9, kk)
    mem = top_k_against_store(Q, feats, k, block_rows=7)
    assert torch.equal(mem.proponents.indices, got.proponents.indices)


def test_half_precision_store_scores_accumulate_in_float32(tmp_path):
    feats = features(n=200, dim=64, seed=5)
    store16 = make_store(tmp_path, feats, dtype=torch.bfloat16, chunk_size=64)
    Q = torch.randn(4, 64)
    got = score_against_store(Q, store16)
    assert got.dtype == torch.float32
    exact = Q @ feats.to(torch.bfloat16).float().T  # the product of the stored values, in float32
    assert torch.allclose(got, exact, rtol=1e-5, atol=1e-4)
    corr = np.corrcoef(got.flatten().numpy(), (Q @ feats.T).flatten().numpy())[0, 1]
    assert corr > 0.999


# -- one feature-source interface for memory and disk -------------------------------------------------------------


def test_memory_and_disk_are_one_feature_source(tmp_path):
    feats = features()
    store = make_store(tmp_path, feats)
    memory = InMemoryFeatures(feats, block_rows=4)
    for source in (store, memory):
        assert isinstance(source, FeatureSource) and as_feature_source(source) is source
        assert (len(source), source.dim, source.chunk_rows, source.n_chunks) == (23, 5, 4, 6)
        blocks = list(source.blocks())
        assert [(b.chunk, b.start) for b in blocks] == [(c, 4 * c) for c in range(6)]
        assert torch.equal(torch.cat([b.values for b in blocks]), feats)
        assert [b.start for b in source.blocks([2, 5])] == [8, 20]
        assert [list(source.chunks_for_rank(r, 4)) for r in range(4)] == [[0, 1], [2, 3], [4], [5]]
    assert (
        store.sharded and not memory.sharded
    )  # under torch.distributed only a store is split over the ranks
    default = as_feature_source(feats)
    assert isinstance(default, InMemoryFeatures) and default.chunk_rows == 23 and default.n_chunks == 1
    with pytest.raises(ValueError, match=r"store=.*2-D \(n, dim\) tensor"):
        as_feature_source(feats[0])
    with pytest.raises(ValueError, match=r"features=.*must be a 2-D tensor"):
        InMemoryFeatures(feats[0])
    with pytest.raises(ValueError, match="expected a GradientStore"):
        score_against_store(feats[:2], feats.numpy())


def test_fingerprints_change_with_the_model_and_the_data():
    model = torch.nn.Linear(3, 2)
    before = model_fingerprint(model)
    assert before == model_fingerprint(model) and len(before) == 64
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    assert model_fingerprint(model) != before
    X, y = features(10, 3), torch.arange(10) % 2
    fp = data_fingerprint(as_data_source((X, y), "train", 4))
    assert fp["n"] == 10 and fp["scheme"] == DATA_FINGERPRINT_SCHEME
    assert fp == data_fingerprint(as_data_source((X.clone(), y.clone()), "train", 4))
    assert fp != data_fingerprint(as_data_source((X, 1 - y), "train", 4))
