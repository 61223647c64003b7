"""as_data_source: every input kind, index order, subsets of the same kind, and rejected inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

import datatrace
from datatrace.data import DataSource, as_data_source, cast_batch

N = 11


@pytest.fixture
def arrays():
    X = torch.arange(N * 2, dtype=torch.float64).reshape(N, 2)
    y = torch.arange(N) % 3
    return X, y


def all_batches(source: DataSource, batch_size=None):
    idx, xs, ys = [], [], []
    for i, (x, y) in source.batches(batch_size):
        idx.append(i)
        xs.append(x)
        ys.append(y)
    return torch.cat(idx), torch.cat(xs), torch.cat(ys)


def kinds(X, y):
    torch.manual_seed(0)
    return {
        "tensors": (X, y),
        "list": [X, y],
        "examples": [(X[i], y[i]) for i in range(len(X))],  # a list of (x, y) pairs: read as a Dataset
        "numpy": (X.numpy(), y.numpy()),
        "dataset": TensorDataset(X, y),
        "loader": DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True),
    }


@pytest.mark.parametrize("kind", ["tensors", "list", "examples", "numpy", "dataset", "loader"])
def test_every_kind_reads_in_index_order(arrays, kind):
    X, y = arrays
    data = kinds(X, y)[kind]
    source = as_data_source(data, "train", batch_size=3 if kind != "loader" else None)
    expected_kind = {"tensors": "tensors", "list": "tensors", "numpy": "numpy"}.get(kind, "dataset")
    assert source.kind == expected_kind and source.name == "train"
    assert len(source) == N
    idx, xs, ys = all_batches(source)
    assert idx.tolist() == list(range(N))
    assert torch.equal(xs, X) and torch.equal(ys, y)
    # explicit indices and get()
    sub_idx = torch.tensor([7, 2, 9])
    _, (x, yy) = next(source.batches(indices=sub_idx))
    assert torch.equal(x, X[sub_idx]) and torch.equal(yy, y[sub_idx])
    x, yy = source.get([4, 0])
    assert torch.equal(x, X[[4, 0]]) and torch.equal(yy, y[[4, 0]])
    # a DataSource passes through unchanged
    assert as_data_source(source) is source


def test_dataloader_shuffle_is_ignored_and_its_batch_size_used(arrays):
    X, y = arrays
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True)
    shuffled = torch.cat([b[1] for b in loader])
    assert not torch.equal(shuffled, y)  # the loader itself does shuffle
    source = as_data_source(loader)
    assert source.batch_size == 4
    sizes = [len(i) for i, _ in source.batches()]
    assert sizes == [4, 4, 3]
    idx, xs, ys = all_batches(source)
    assert idx.tolist() == list(range(N)) and torch.equal(xs, X) and torch.equal(ys, y)
    assert as_data_source(loader, batch_size=5).batch_size == 5  # an explicit batch size wins


def test_dataloader_collate_fn_is_used(arrays):
    X, y = arrays

    def collate(items):
        xs, ys = zip(*items)
        return torch.stack(xs) * 2, torch.stack(ys)

    source = as_data_source(DataLoader(TensorDataset(X, y), batch_size=3, collate_fn=collate))
    _, xs, _ = all_batches(source)
    assert torch.equal(xs, 2 * X)


def test_dataloader_without_automatic_batching(arrays):
    """batch_size=None: the loader yields single samples (its collate_fn only converts); batches still stack."""
    X, y = arrays
    source = as_data_source(DataLoader(TensorDataset(X, y), batch_size=None), batch_size=4)
    idx, xs, ys = all_batches(source)
    assert idx.tolist() == list(range(N)) and torch.equal(xs, X) and torch.equal(ys, y)


def test_numpy_is_converted_without_changing_dtype(arrays):
    X, y = arrays
    source = as_data_source((X.numpy().astype(np.float32), y.numpy()))
    x, yy = source.get([0, 1])
    assert x.dtype == torch.float32 and yy.dtype == torch.int64
    # non-contiguous arrays are fine
    source = as_data_source((np.asfortranarray(X.numpy()), y.numpy()))
    assert torch.equal(source.get([3])[0], X[[3]])


@pytest.mark.parametrize("kind", ["tensors", "examples", "numpy", "dataset", "loader"])
def test_subset_returns_the_same_kind(arrays, kind):
    X, y = arrays
    source = as_data_source(kinds(X, y)[kind])
    idx = [8, 1, -1]
    sub = source.subset(idx)
    if kind == "numpy":
        assert isinstance(sub, tuple) and all(isinstance(a, np.ndarray) for a in sub)
        np.testing.assert_array_equal(sub[0], X.numpy()[[8, 1, N - 1]])
        np.testing.assert_array_equal(sub[1], y.numpy()[[8, 1, N - 1]])
    elif kind == "tensors":
        assert isinstance(sub, tuple) and all(isinstance(t, torch.Tensor) for t in sub)
        assert torch.equal(sub[0], X[[8, 1, N - 1]]) and torch.equal(sub[1], y[[8, 1, N - 1]])
    else:
        assert isinstance(sub, Subset)
        assert sub.indices == [8, 1, N - 1]
        assert torch.equal(sub[0][0], X[8])
    again = as_data_source(sub)
    assert again.kind == source.kind and len(again) == 3


def test_subset_out_of_range(arrays):
    source = as_data_source(arrays)
    with pytest.raises(IndexError, match=rf"indices contains {N}, out of range for {N} training examples"):
        source.subset([0, N])
    with pytest.raises(ValueError, match=r"indices=.*integer indices"):
        source.subset([[0, 1]])


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


def test_iterable_dataset_is_rejected():
    with pytest.raises(
        ValueError, match=r"train=.*IterableDataset.*has no stable example indices.*map-style"
    ):
        as_data_source(DataLoader(Stream()), "train")
    with pytest.raises(
        ValueError, match=r"train=.*IterableDataset.*has no stable example indices.*map-style"
    ):
        as_data_source(Stream(), "train")


class NoLen(Dataset):
    def __getitem__(self, i):
        return torch.zeros(2), 0


def test_dataset_without_len_is_rejected():
    with pytest.raises(ValueError, match=r"data=.*no __len__"):
        as_data_source(NoLen())


def test_mismatched_lengths_name_the_argument(arrays):
    X, y = arrays
    with pytest.raises(ValueError, match=rf"query has elements of different lengths \[{N}, {N - 1}\]"):
        as_data_source((X, y[:-1]), "query")


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ((), r"train=\(\) is not allowed: an empty tuple"),
        ((torch.zeros(0, 2), torch.zeros(0)), r"train is empty \(0 examples\)"),
        (TensorDataset(torch.zeros(0, 2)), r"train is empty"),
        ((torch.tensor(1.0), torch.zeros(1)), r"train\[0\]=.*leading example axis"),
        ((np.array([object(), object()], dtype=object), np.zeros(2)), r"train\[0\]=.*object arrays"),
        ((torch.zeros(2, 2), "labels"), r"train\[1\]=.*torch.Tensor or numpy array"),
        ({}, r"train=\{\} is not allowed: an empty dict"),
        (
            {"x": torch.zeros(2), "y": torch.zeros(3)},
            r"train has columns of different lengths \{'x': 2, 'y': 3\}",
        ),
        ({"x": torch.tensor(1.0)}, r"train\['x'\]=.*leading example axis"),
        ({"x": "text"}, r"train\['x'\]=.*torch.Tensor or numpy array"),
        (torch.zeros(3, 2), r"train=.*expected a tuple"),
    ],
)
def test_bad_data_is_rejected_with_the_argument_name(data, pattern):
    with pytest.raises(ValueError, match=pattern):
        as_data_source(data, "train")


def test_check_finite_says_which_element_and_where(arrays):
    X, y = arrays
    X = X.clone()
    X[6, 1] = float("-inf")
    X[9, 0] = float("nan")
    source = as_data_source((X, y), "train")
    with pytest.raises(
        FloatingPointError,
        match=r"train\[0\] contains 2 non-finite value\(s\) \(first at index \(6, 1\): -inf\)",
    ):
        source.check_finite()
    as_data_source((X.nan_to_num(posinf=0.0, neginf=0.0), y)).check_finite()  # clean data passes


def test_cast_batch_casts_floats_and_keeps_labels(arrays):
    X, y = arrays
    x32, yy = cast_batch((X.float(), y), torch.float64, "cpu")
    assert x32.dtype == torch.float64 and yy.dtype == torch.int64
    assert torch.equal(x32, X)


# ---------------------------------------------------------------------------------------------------------------
# DataLoaders are read as the examples they serve, never as their whole dataset behind a sampler
# ---------------------------------------------------------------------------------------------------------------
def _tensor_dataset(n: int = 20):

    return TensorDataset(torch.arange(n, dtype=torch.float64).reshape(n, 1), torch.arange(n) % 2)


def test_subset_random_sampler_gives_the_subset_in_sampler_order():

    indices = [7, 3, 12, 19, 0]
    source = as_data_source(DataLoader(_tensor_dataset(), batch_size=2, sampler=SubsetRandomSampler(indices)))
    assert len(source) == len(indices)
    X, _ = source.get(range(len(indices)))
    assert X[:, 0].tolist() == [float(i) for i in indices]


def test_shuffling_loader_is_the_whole_dataset_in_index_order():

    source = as_data_source(DataLoader(_tensor_dataset(), batch_size=4, shuffle=True))
    X = torch.cat([b[0] for _, b in source.batches()])
    assert X[:, 0].tolist() == [float(i) for i in range(20)]


def test_drop_last_leaves_out_the_examples_a_sequential_loader_never_serves(caplog):
    """20 examples in batches of 6, read in order with drop_last=True: examples 18 and 19 are never served (nor
    trained on), so they are not training data; shuffling drops different ones every epoch, so it keeps all 20."""
    with caplog.at_level("INFO", logger="datatrace.data"):
        source = as_data_source(DataLoader(_tensor_dataset(), batch_size=6, drop_last=True), "train")
    assert len(source) == 18 and "never serves the last 2 of 20 examples" in caplog.text
    X = torch.cat([b[0] for _, b in source.batches()])
    assert X[:, 0].tolist() == [float(i) for i in range(18)]
    assert (
        len(as_data_source(DataLoader(_tensor_dataset(), batch_size=5, drop_last=True))) == 20
    )  # none dropped
    assert (
        len(as_data_source(DataLoader(_tensor_dataset(), batch_size=6, shuffle=True, drop_last=True))) == 20
    )


@pytest.mark.parametrize(
    "kind", ["weighted", "replacement", "fewer", "distributed", "batch_sampler", "repeated"]
)
def test_samplers_without_a_fixed_example_set_are_refused(kind):
    ds = _tensor_dataset()
    loaders = {
        "weighted": lambda: DataLoader(ds, sampler=WeightedRandomSampler([1.0] * 20, 20)),
        "replacement": lambda: DataLoader(ds, sampler=RandomSampler(ds, replacement=True)),
        "fewer": lambda: DataLoader(ds, sampler=RandomSampler(ds, num_samples=10)),
        "distributed": lambda: DataLoader(ds, sampler=DistributedSampler(ds, num_replicas=2, rank=0)),
        "batch_sampler": lambda: DataLoader(
            ds, batch_sampler=type("MyBatches", (BatchSampler,), {})(SequentialSampler(ds), 4, False)
        ),
        "repeated": lambda: DataLoader(ds, sampler=SubsetRandomSampler([1, 1, 2])),
    }
    with pytest.raises(ValueError, match=r"train\.(sampler|batch_sampler).*Fix: "):
        as_data_source(loaders[kind](), "train")


# ---------------------------------------------------------------------------------------------------------------
# A Dataset of dicts (the Hugging Face form): batches stay dicts
# ---------------------------------------------------------------------------------------------------------------
class DictDataset(Dataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor, extra: object = None) -> None:
        self.X, self.y, self.extra = X, y, extra

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> dict:
        item = {"x": self.X[i], "y": self.y[i]}
        if self.extra is not None:
            item["text"] = self.extra
        return item


def test_dict_dataset_batches_stay_dicts_in_index_order(arrays):
    X, y = arrays
    source = as_data_source(DataLoader(DictDataset(X, y), batch_size=4, shuffle=True), "train")
    batches = list(source.batches())
    assert all(isinstance(b, dict) and sorted(b) == ["x", "y"] for _, b in batches)
    torch.testing.assert_close(torch.cat([b["x"] for _, b in batches]), X)
    torch.testing.assert_close(torch.cat([b["y"] for _, b in batches]), y)
    assert source.yields_mappings() and not as_data_source((X, y)).yields_mappings()
    subset = as_data_source(source.subset([3, 1]))
    torch.testing.assert_close(subset.get([0, 1])["x"], X[[3, 1]])


def test_dict_dataset_content_hash_follows_the_content(arrays):
    X, y = arrays
    first = as_data_source(DictDataset(X, y), batch_size=3).content_sha256()
    assert first == as_data_source(DictDataset(X, y), batch_size=5).content_sha256()
    assert first != as_data_source(DictDataset(X, (y + 1) % 3)).content_sha256()


def test_dict_dataset_with_a_non_tensor_field_is_refused_naming_the_key(arrays):
    X, y = arrays
    with pytest.raises(
        ValueError, match=r"train\[\.\.\.\]\['text'\].*tensors.*Fix: drop or encode the 'text'"
    ):
        as_data_source(DictDataset(X, y, extra="a sentence"), "train").get([0, 1])


def test_cast_batch_keeps_the_dict_form(arrays):
    X, y = arrays
    out = cast_batch({"x": X.float(), "y": y}, torch.float64, "cpu")
    assert isinstance(out, dict) and out["x"].dtype == torch.float64 and out["y"].dtype == torch.int64


def test_a_list_of_examples_gives_the_scores_of_the_tuple_form(classification_data):
    """``[(x_0, y_0), ...]`` (and a list of dicts) is a map-style Dataset, as for train and query alike; it used
    to be refused as a tuple of columns whose element 0 'must be a tensor'."""
    X, y = classification_data
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3).double()
    task = datatrace.ClassificationTask(weight_decay=0.1)
    ref = datatrace.InfluenceFunction(model, task, curvature="exact", progress=False).fit((X, y))
    pairs = [(X[i], y[i]) for i in range(len(X))]
    got = datatrace.InfluenceFunction(model, task, curvature="exact", progress=False).fit(pairs)
    torch.testing.assert_close(got.score(pairs[:4]).values, ref.score((X[:4], y[:4])).values, rtol=0, atol=0)
    dicts = [{"x": X[i], "y": y[i]} for i in range(len(X))]
    keyed = datatrace.ClassificationTask(weight_decay=0.1, input_key="x", target_key="y")
    by_key = datatrace.InfluenceFunction(model, keyed, curvature="exact", progress=False).fit(dicts)
    torch.testing.assert_close(by_key.self_influence(), ref.self_influence(), rtol=0, atol=0)
