"""One view of the user's data, whatever form it came in.

datatrace accepts a tuple of tensors or numpy arrays, a dict of equal-length columns (a tokenizer's
``BatchEncoding``, with labels added: read as a Dataset of dicts), a list of examples (``[(x_0, y_0), ...]`` or
dicts: read as a Dataset), a ``torch.utils.data.Dataset`` or a ``DataLoader``. All of
them become a :class:`DataSource`: a fixed, indexed sequence of ``n`` examples that can be walked in batches *in
index order* (scores are indexed by training example, so a shuffling loader is re-read sequentially; a loader whose
sampler serves a subset gives that subset, and one whose sampler does not define a fixed set is refused) and cut into
subsets of the same kind (for retraining).

A batch is a tuple (the :class:`~datatrace.Task` decides what its elements mean, by default ``(x, y)``), or a
dict of tensors when the Dataset returns dicts (the Hugging Face form, ``{"input_ids": ..., "labels": ...}``):
such batches stay dicts, and a task written for them reads ``batch["input_ids"]``. The helpers
:func:`batch_length`, :func:`take_examples`, :func:`map_batch` and :func:`cast_batch` treat both forms alike.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
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
)
from torch.utils.data.dataloader import default_collate

from datatrace.errors import bad_value, check_finite, check_indices

DEFAULT_BATCH_SIZE = 256

logger = logging.getLogger(__name__)

DataLike = Any  # tuple of tensors/arrays | Dataset | DataLoader | DataSource


def _is_pandas(value: Any) -> bool:
    """A pandas DataFrame or Series (duck-typed: pandas is not a dependency)."""
    return hasattr(value, "iloc") and callable(getattr(value, "to_numpy", None))


def _to_tensor(array: Any, name: str) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    if _is_pandas(array):  # its rows in order (the index labels are not used), numeric columns only
        given, array = array, array.to_numpy(copy=True)  # a copy: pandas may hand out a read-only view
        if array.dtype == object:
            raise bad_value(
                name,
                given,
                "a pandas object with non-numeric (or mixed) columns cannot become a tensor",
                "encode its categorical / text columns as numbers first (e.g. pd.get_dummies)",
            )
    if isinstance(array, np.ndarray):
        if array.dtype == object:
            raise bad_value(name, array, "object arrays cannot become tensors", "convert to a numeric dtype")
        return torch.from_numpy(np.ascontiguousarray(array))
    if isinstance(array, (list, float, int)):
        return torch.as_tensor(array)
    raise bad_value(
        name,
        array,
        "each element of a data tuple must be a torch.Tensor or numpy array",
        "convert it with torch.as_tensor(...)",
    )


def _collate_unbatched(convert: Callable, items: list) -> Any:
    """Batch items of a DataLoader with ``batch_size=None`` (its ``collate_fn`` converts single samples)."""
    return default_collate([convert(item) for item in items])


def _batch_to_tuple(batch: Any, name: str = "data") -> tuple | dict:
    """The collated batch as a tuple, or as a dict of tensors when the examples are mappings."""
    if isinstance(batch, Mapping):
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                raise bad_value(
                    f"{name}[...][{key!r}]",
                    value,
                    "a Dataset that returns dicts must give tensors (or numbers) under every key, so that "
                    "examples can be batched and sliced",
                    f"drop or encode the {key!r} field (e.g. dataset.remove_columns / with_format('torch'))",
                )
        return dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    return (batch,)


def _collate_failure(items: list, name: str, err: RuntimeError) -> Exception:
    """The error for examples that could not be batched: which field has which shapes, and how to pad."""
    fields = (
        items[0].items() if items and isinstance(items[0], Mapping) else enumerate(items[0] if items else ())
    )
    for key, _ in fields:
        shapes = sorted(
            {tuple(item[key].shape) for item in items if isinstance(item[key], torch.Tensor)}, key=str
        )
        if len(shapes) > 1:
            return bad_value(
                f"{name}[...][{key!r}]",
                f"examples of shapes {shapes[:4]}",
                "the examples of a batch must have one shape to be stacked (token sequences of different lengths "
                "cannot)",
                "pad every example to one length (e.g. tokenizer(..., padding='max_length', max_length=...)), or "
                "pass a DataLoader whose collate_fn pads each batch (transformers' DataCollatorWithPadding)",
            )
    return err


def batch_length(batch: tuple | Mapping) -> int:
    """The number of examples in a batch (the leading size of its first tensor)."""
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, (Mapping, tuple, list)) and value:
            return batch_length(value)
    raise bad_value(
        "batch", batch, "a batch needs a tensor with a leading example axis", "batch the examples"
    )


def map_batch(fn: Callable[[torch.Tensor], Any], batch: tuple | Mapping) -> tuple | dict:
    """``fn`` applied to every tensor of a batch (tuple or dict, nested containers too); other values kept."""
    if isinstance(batch, Mapping):
        return {
            k: map_batch(fn, v) if isinstance(v, (Mapping, tuple, list)) else _apply(fn, v)
            for k, v in batch.items()
        }
    return tuple(map_batch(fn, v) if isinstance(v, (Mapping, tuple, list)) else _apply(fn, v) for v in batch)


def _apply(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    return fn(value) if isinstance(value, torch.Tensor) else value


def take_examples(batch: tuple | Mapping, index: int | slice | torch.Tensor) -> tuple | dict:
    """The examples ``index`` of a batch, in the batch's own form (``index`` an int drops the example axis)."""
    return map_batch(lambda t: t[index], batch)


@dataclass(frozen=True)
class DataSource:
    """An indexed data set of ``n`` examples, read in order in batches.

    Build one with :func:`as_data_source`. ``kind`` records the form it came in so that :meth:`subset` can give
    back the same form (a tuple of arrays stays a tuple of arrays; a Dataset becomes a ``Subset``).
    """

    kind: str  # "tensors" | "numpy" | "pandas" | "dataset"
    tensors: tuple[torch.Tensor, ...] | None
    dataset: Dataset | None
    batch_size: int
    collate_fn: Any
    name: str
    originals: tuple | None = None  # kind "pandas": the tuple as given, cut by subset() with .iloc

    def __len__(self) -> int:
        if self.tensors is not None:
            return int(self.tensors[0].shape[0])
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(
        self, batch_size: int | None = None, indices: torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, tuple]]:
        """Yield ``(indices, batch)`` pairs in index order; ``indices`` restricts to those examples."""
        bs = batch_size or self.batch_size
        order = torch.arange(len(self)) if indices is None else indices
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            yield idx, self.get(idx)

    def get(self, indices: torch.Tensor | Sequence[int]) -> tuple | dict:
        """The examples at ``indices`` as one batch (a tuple of tensors, or a dict for a Dataset of dicts)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.tensors is not None:
            return tuple(t[idx] for t in self.tensors)
        items = [self.dataset[int(i)] for i in idx]  # type: ignore[index]
        try:
            collated = self.collate_fn(items)
        except RuntimeError as err:  # default_collate cannot stack examples of different shapes
            raise _collate_failure(items, self.name, err) from err
        return _batch_to_tuple(collated, self.name)

    def yields_mappings(self) -> bool:
        """Whether batches are dicts (a Dataset of dicts); reads one example."""
        return self.tensors is None and isinstance(self.get([0]), Mapping)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> Any:
        """The examples at ``indices`` in the form the user gave (tuple of tensors/arrays, or a Dataset)."""
        idx = check_indices("indices", indices, len(self))
        if self.kind == "numpy":
            np_idx = idx.numpy()
            return tuple(t.numpy()[np_idx] for t in self.tensors)  # type: ignore[union-attr]
        if self.kind == "tensors":
            return tuple(t[idx] for t in self.tensors)  # type: ignore[union-attr]
        if self.kind == "pandas":
            np_idx = idx.numpy()
            return tuple(a.iloc[np_idx] if _is_pandas(a) else a[np_idx] for a in self.originals)  # type: ignore[union-attr]
        return Subset(self.dataset, idx.tolist())  # type: ignore[arg-type]

    def content_sha256(self) -> str:
        """A sha256 of every example's content (dtype, trailing shape and bytes of each element), read in order.

        Equal for the same examples in the same order whatever the batch size or the form they came in; it
        changes when any example changes. Reads the data once.
        """
        parts: dict[Any, tuple[str, Any]] = {}  # position or key -> (signature, running sha256 of its bytes)
        # tensors in memory are hashed whole: the same bytes, in the same order, as batch by batch below
        batches = [(None, self.tensors)] if self.tensors is not None else self.batches()
        for _, batch in batches:
            for position, value in batch.items() if isinstance(batch, Mapping) else enumerate(batch):
                if isinstance(value, torch.Tensor):
                    flat = value.detach().cpu().contiguous()
                    signature = f"{flat.dtype}:{tuple(flat.shape[1:])}"
                    data = flat.reshape(-1).view(torch.uint8).numpy()  # a buffer: hashed without a copy
                else:
                    signature, data = type(value).__name__, repr(value).encode()
                if position not in parts:
                    parts[position] = (signature, hashlib.sha256())
                elif parts[position][0] != signature:
                    parts[position] = (f"{parts[position][0]}|{signature}", parts[position][1])
                parts[position][1].update(data)
        summary = [f"n={len(self)}"] + [f"{k}:{sig}:{h.hexdigest()}" for k, (sig, h) in sorted(parts.items())]
        return hashlib.sha256("\n".join(summary).encode()).hexdigest()

    def check_finite(self) -> None:
        """Raise if a floating-point element of the data has NaN or inf (say which element and where)."""
        for position, tensor in enumerate(self.tensors or ()):
            check_finite(
                tensor,
                f"{self.name}[{position}]",
                "Fix: clean or impute the data before computing influence.",
            )


class ColumnsDataset(Dataset):
    """A dict of equal-length columns (a tokenizer's ``BatchEncoding`` with ``return_tensors="pt"``, plus labels)
    as a Dataset of dicts: item ``i`` is ``{key: column[i]}``."""

    def __init__(self, columns: Mapping[str, torch.Tensor]) -> None:
        self.columns = dict(columns)

    def __len__(self) -> int:
        return int(next(iter(self.columns.values())).shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def _columns_dataset(data: Mapping, name: str) -> ColumnsDataset:
    """``data``, a mapping of columns, checked (tensors or arrays with one shared leading length)."""
    if not data:
        raise bad_value(name, data, "an empty dict holds no data", "pass {'input_ids': ..., 'labels': ...}")
    columns = {}
    for key, value in data.items():
        tensor = _to_tensor(value, f"{name}[{key!r}]")
        if tensor.dim() == 0:
            raise bad_value(
                f"{name}[{key!r}]", tensor, "each column needs a leading example axis", "reshape it"
            )
        columns[str(key)] = tensor
    lengths = {k: int(t.shape[0]) for k, t in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"{name} has columns of different lengths {lengths}: every column of the dict must have one row per "
            "example. Fix: pad the sequences to one length (e.g. tokenizer(..., padding=True)) and pass one label "
            "per example."
        )
    return ColumnsDataset(columns)


def _loader_examples(loader: DataLoader, name: str) -> Dataset:
    """The examples a DataLoader actually serves, as a map-style Dataset read in index order.

    A loader over its whole dataset (sequential, or shuffled without replacement) serves every example once: its
    dataset is used as is, except that a sequential loader with ``drop_last=True`` never serves its last, incomplete
    batch, whose examples are left out (a shuffling one drops different examples every epoch, so it serves all). A ``SubsetRandomSampler`` serves ``sampler.indices`` only: those examples, in that
    order, become the data (score column ``j`` is ``loader.dataset[sampler.indices[j]]``). Any other sampler or
    batch sampler (weighted, with replacement, distributed shards, custom) does not define a fixed set of
    examples, so it is refused rather than read as the whole dataset.
    """
    dataset = loader.dataset
    sampler = loader.sampler
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        raise bad_value(
            f"{name}.batch_sampler",
            batch_sampler,
            "a custom batch sampler does not say which examples form the training set",
            "pass the dataset itself (or torch.utils.data.Subset(dataset, indices) of the examples trained on)",
        )
    n = len(dataset)  # type: ignore[arg-type]
    if type(sampler) is SequentialSampler:
        dropped = n % loader.batch_size if loader.drop_last and loader.batch_size else 0
        if dropped:  # the last, incomplete batch is never served: those examples were not trained on
            logger.info(
                "%s: the DataLoader reads in order with drop_last=True, so it never serves the last %d of %d "
                "examples; the data are its first %d (pass the dataset itself to include them).",
                name,
                dropped,
                n,
                n - dropped,
            )
            return Subset(dataset, list(range(n - dropped)))
        return dataset
    if type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == n:
        return dataset  # every example once; datatrace reads them in index order
    if type(sampler) is SubsetRandomSampler:
        indices = [int(i) for i in sampler.indices]
        if len(set(indices)) != len(indices):
            raise bad_value(
                f"{name}.sampler.indices",
                indices,
                "each training example may appear once",
                "drop the repeated indices",
            )
        logger.info(
            "%s: the DataLoader's SubsetRandomSampler serves %d of %d examples; those are the data, in the order "
            "of sampler.indices (score column j is dataset[sampler.indices[j]]).",
            name,
            len(indices),
            n,
        )
        return Subset(dataset, indices)
    raise bad_value(
        f"{name}.sampler",
        sampler,
        "only a sequential, a shuffling (without replacement, every example once) or a SubsetRandomSampler "
        "defines a fixed set of training examples; weighted, with-replacement, distributed and custom samplers "
        "do not",
        "pass the examples the model was trained on as a Dataset, e.g. torch.utils.data.Subset(dataset, indices) "
        "(under torchrun pass the whole dataset on every rank: datatrace shards it itself)",
    )


def as_data_source(data: DataLike, name: str = "data", batch_size: int | None = None) -> DataSource:
    """Turn a tuple of tensors/arrays, a list of examples, a Dataset or a DataLoader into a :class:`DataSource`.

    Raises a ValueError naming ``name`` for anything else, for tuples whose elements disagree in length and for
    an empty data set.
    """
    if isinstance(data, DataSource):
        return data
    if isinstance(data, IterableDataset) or (
        isinstance(data, DataLoader) and isinstance(data.dataset, IterableDataset)
    ):
        raise bad_value(
            name,
            data,
            "an IterableDataset (or a DataLoader over one) has no stable example indices",
            "pass a map-style Dataset (one with __getitem__ and __len__) or a tuple of tensors",
        )
    if isinstance(data, DataLoader):
        source = DataSource(
            kind="dataset",
            tensors=None,
            dataset=_loader_examples(data, name),
            batch_size=batch_size or data.batch_size or DEFAULT_BATCH_SIZE,
            collate_fn=(
                data.collate_fn or default_collate
                if data.batch_size is not None
                else functools.partial(_collate_unbatched, data.collate_fn)
            ),
            name=name,
        )
    elif isinstance(data, Mapping):  # columns, e.g. a tokenizer's BatchEncoding: a Dataset of dicts
        source = DataSource(
            "dataset",
            None,
            _columns_dataset(data, name),
            batch_size or DEFAULT_BATCH_SIZE,
            default_collate,
            name,
        )
    elif isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            raise bad_value(name, data, "the Dataset has no __len__", "implement __len__ on the Dataset")
        source = DataSource("dataset", None, data, batch_size or DEFAULT_BATCH_SIZE, default_collate, name)
    elif isinstance(data, list) and data and all(isinstance(e, (tuple, Mapping)) for e in data):
        # a list of examples, [(x_0, y_0), (x_1, y_1), ...] or [{"x": ..., "y": ...}, ...]: a map-style Dataset
        source = DataSource("dataset", None, data, batch_size or DEFAULT_BATCH_SIZE, default_collate, name)
    elif isinstance(data, (tuple, list)):
        if len(data) == 0:
            raise bad_value(name, data, "an empty tuple holds no data", "pass (inputs, targets)")
        is_numpy = all(isinstance(a, np.ndarray) or _is_pandas(a) for a in data)
        has_pandas = any(_is_pandas(a) for a in data)
        tensors = tuple(_to_tensor(a, f"{name}[{i}]") for i, a in enumerate(data))
        for i, t in enumerate(tensors):
            if t.dim() == 0:
                raise bad_value(f"{name}[{i}]", t, "each element needs a leading example axis", "reshape it")
        lengths = [int(t.shape[0]) for t in tensors]
        if len(set(lengths)) != 1:
            raise ValueError(
                f"{name} has elements of different lengths {lengths}: every element of the tuple must have one "
                f"row per example. Fix: pass arrays with the same first dimension."
            )
        kind = ("pandas" if has_pandas else "numpy") if is_numpy else "tensors"
        source = DataSource(
            kind,
            tensors,
            None,
            batch_size or DEFAULT_BATCH_SIZE,
            None,
            name,
            tuple(data) if kind == "pandas" else None,
        )
    else:
        raise bad_value(
            name,
            data,
            "expected a tuple of tensors or numpy arrays, a dict of columns, a list of examples (tuples or dicts), "
            "a torch Dataset or a DataLoader",
            "wrap arrays as (X, y)",
        )
    if len(source) == 0:
        raise ValueError(f"{name} is empty (0 examples). Fix: pass a data set with at least one example.")
    return source


def cast_batch(batch: tuple | Mapping, dtype: torch.dtype, device: torch.device | str | None) -> tuple | dict:
    """Move a batch to ``device`` and cast its floating-point tensors to ``dtype`` (labels keep their dtype);
    a tuple stays a tuple, a dict a dict."""
    return map_batch(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype), batch)
