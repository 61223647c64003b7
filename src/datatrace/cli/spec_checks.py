"""The checks of a spec file's names: each returns the checked value or raises a SpecError naming file and name.

:func:`datatrace.cli.spec.load_spec` calls these on what the spec defines, before any expensive work: data sets
(tuples of arrays, a ``Dataset`` or a ``DataLoader``, lengths that agree), a fitted estimator and its data, saved
weights (a ``state_dict`` read without unpickling), one forward pass of the loss on two examples of each data set,
and the optional report names (groups, image shape, texts, display rows, kind, curvature, units). Every message
says what was received, what is allowed and how to fix it.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from datatrace.apps.audit import first_missing_label
from datatrace.attributors.sklearn import SklearnInfluence, scale_weight_decay
from datatrace.cli.spec_model import KINDS, SPLITS, Spec, curvature_arguments
from datatrace.curvature import Curvature
from datatrace.data import DataLike, as_data_source, cast_batch
from datatrace.errors import SpecError, SpecRuntimeError, describe
from datatrace.hf import CausalLMTask
from datatrace.tasks import ClassificationTask, RegressionTask, Task

__all__ = [
    "check_curvature",
    "check_data",
    "check_display",
    "check_estimator",
    "check_estimator_data",
    "check_forward",
    "check_groups",
    "check_image_shape",
    "check_kind",
    "check_names",
    "check_str",
    "check_texts",
    "default_units",
    "has",
    "load_weights",
    "spec_value",
    "type_words",
    "where",
]


def where(file: Path, name: str) -> str:
    return f"spec {file}: {name}"


def spec_value(file: Path, module: ModuleType, name: str, call: bool = True) -> Any:
    """The spec's ``name``: called if it is a function (and ``call``), as is otherwise."""
    value = getattr(module, name)
    if call and callable(value) and not isinstance(value, (nn.Module, Task, Dataset, DataLoader, type)):
        params = [
            p
            for p in inspect.signature(value).parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if params:
            raise SpecError(
                f"{where(file, name)}() takes arguments ({', '.join(p.name for p in params)}), but datatrace "
                f"calls {name}() without any. Fix: define {name}() with no required arguments."
            )
        try:
            value = value()
        except SpecError:
            raise
        except Exception as err:
            fix = (
                f"install the package that provides {err.name!r} (e.g. pip install {err.name})"
                if isinstance(err, ModuleNotFoundError) and err.name
                else f"run {name}() from the spec yourself to debug it, or see --traceback"
            )
            raise SpecRuntimeError(
                f"{where(file, name)}() raised {type(err).__name__}: {err}. Fix: {fix}."
            ) from err
        if value is None:
            raise SpecError(
                f"{where(file, name)}() returned None. Fix: end {name}() with a return statement."
            )
    return value


def has(module: ModuleType, name: str) -> bool:
    return getattr(module, name, None) is not None


def type_words(value: Any) -> str:
    return f"{type(value).__name__} ({describe(value, 60)})"


def _to_array(file: Path, name: str, position: int, value: Any) -> np.ndarray | torch.Tensor:
    """A data tuple's element as an array or tensor; pandas objects become numpy arrays."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value
    if hasattr(value, "to_numpy") and callable(value.to_numpy):  # pandas DataFrame / Series
        return value.to_numpy()
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    raise SpecError(
        f"{where(file, name)}()[{position}] is {type_words(value)}; expected a numpy array or torch tensor. "
        f"Fix: return {name}() as a tuple of arrays, e.g. (X, y)."
    )


def check_data(file: Path, name: str, value: Any) -> DataLike:
    """Accept a tuple/list of arrays or tensors, a Dataset or a DataLoader, or a dict of columns (a tokenizer's
    ``BatchEncoding`` with labels added, returned as a Dataset of dicts); check lengths agree."""
    if isinstance(value, Mapping):
        try:
            value = as_data_source(value, f"{name}()").dataset
        except ValueError as err:
            raise SpecError(
                f"{where(file, name)}() returned a dict datatrace cannot read as columns: {err}"
            ) from err
    if isinstance(value, (Dataset, DataLoader)):
        try:
            source = as_data_source(value, f"{name}()")
        except ValueError as err:
            raise SpecError(f"{where(file, name)}() returned data datatrace cannot index: {err}") from err
        if len(source) < 1:
            raise SpecError(f"{where(file, name)}() returned an empty data set. Fix: return some examples.")
        return value
    if not isinstance(value, (tuple, list)) or len(value) == 0:
        raise SpecError(
            f"{where(file, name)}() returned {type_words(value)}; expected a tuple (X, y) of numpy arrays or torch "
            "tensors, a torch Dataset or a DataLoader, or a dict of equal-length columns (a tokenizer's output with "
            "'labels' added). Fix: return e.g. `return X, y`."
        )
    arrays = tuple(_to_array(file, name, i, v) for i, v in enumerate(value))
    for i, a in enumerate(arrays):
        if a.ndim == 0:
            raise SpecError(
                f"{where(file, name)}()[{i}] is a scalar; every element needs one row per example. "
                "Fix: return arrays whose first axis runs over examples."
            )
    lengths = [int(a.shape[0]) for a in arrays]
    if len(set(lengths)) != 1:
        raise SpecError(
            f"{where(file, name)}() returned elements of different lengths {lengths}: X and y need one row "
            "per example each. Fix: return arrays with the same first dimension."
        )
    if lengths[0] < (2 if name == "train" else 1):
        raise SpecError(
            f"{where(file, name)}() returned {lengths[0]} example(s). Fix: return "
            f"{'at least 2 training examples' if name == 'train' else 'at least one example'}."
        )
    return arrays


def check_estimator(file: Path, estimator: Any, train: DataLike) -> tuple[nn.Module, Task]:
    try:
        translator = SklearnInfluence(estimator)
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where(file, 'estimator')}() returned a model datatrace cannot use: {err}") from err
    check_estimator_data(file, "train", estimator, train)
    # the estimator's penalty is on the summed loss; datatrace's objective is the mean loss (see datatrace.attributors.sklearn)
    return translator.module_, scale_weight_decay(translator.task, len(train[0]))


def check_estimator_data(file: Path, split: str, estimator: Any, data: DataLike) -> None:
    if not isinstance(data, tuple) or len(data) != 2:
        raise SpecError(
            f"{where(file, split)}() must return a pair (X, y) for a scikit-learn estimator, got "
            f"{type_words(data)}. Fix: return X, y as given to estimator.fit."
        )
    X, y = data
    width = int(estimator.n_features_in_)
    if X.ndim != 2 or X.shape[1] != width:
        raise SpecError(
            f"{where(file, split)}()[0] has shape {tuple(X.shape)}, but estimator() was fitted on {width} "
            f"feature(s): X must have shape (n, {width}). Fix: return the same columns, with the same "
            "preprocessing, as the estimator was fitted on."
        )
    try:
        SklearnInfluence(estimator).encode_targets(np.asarray(y), f"{split}()[1]")
    except ValueError as err:
        raise SpecError(f"spec {file}: {split}() does not fit estimator(): {err}") from err


def load_weights(file: Path, model: nn.Module, weights: Any) -> None:
    if not isinstance(weights, (str, os.PathLike)):
        raise SpecError(
            f"{where(file, 'weights')} is {type_words(weights)}; expected a file name (relative to the spec's folder). "
            "Fix: set weights = 'model.safetensors'."
        )
    wpath = Path(weights)
    if not wpath.is_absolute():
        wpath = file.parent / wpath
    if not wpath.exists():
        raise SpecError(
            f"{where(file, 'weights')} = {str(weights)!r}: {wpath} does not exist. Fix: pass an existing file."
        )
    try:
        if wpath.suffix == ".safetensors":
            state = load_file(str(wpath))
        else:
            state = torch.load(wpath, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SpecError(
            f"{where(file, 'weights')}: {wpath} could not be read ({type(err).__name__}: {err}). Fix: save the "
            "weights with safetensors.torch.save_file(model.state_dict(), ...) or torch.save(model.state_dict(), "
            "...) (a state_dict, not a pickled model)."
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(
            f"{where(file, 'weights')}: {wpath} does not hold a state_dict (a mapping of names to tensors). "
            "Fix: save model.state_dict()."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SpecError(
            f"{where(file, 'weights')}: {wpath} does not match model(): {err}. Fix: make model() build the same "
            "architecture the weights were saved from."
        ) from err


def _first_layer(model: nn.Module) -> str:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
            return f" The model's first layer is {module!r}."
    return ""


def check_forward(spec: Spec, split: str) -> None:
    """Run the task's loss on 2 examples of ``split``: catches shape and dtype mismatches before any real work."""
    file = spec.path
    try:
        source = spec.source(split)
    except ValueError as err:
        raise SpecError(
            f"{where(file, split)}() returned data the model cannot take: {err} (for a PyTorch model every "
            "element must be numeric; string labels are only for a scikit-learn estimator, which encodes them)."
        ) from err
    idx = torch.arange(min(2, len(source)))
    try:
        batch = source.get(idx)
    except Exception as err:
        raise SpecRuntimeError(
            f"{where(file, split)}(): reading examples {idx.tolist()} raised {err}"
        ) from err
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in batch]
    model = copy.deepcopy(spec.model).to(torch.float64).eval()
    who = "estimator()" if spec.estimator is not None else "model()"
    try:
        with torch.no_grad():
            # the task's value checks first (labels in range; a Hugging Face task's token ids within the model's
            # vocabulary and position embeddings), whose messages name the value and the fix
            checked = spec.task.check_batch(model, cast_batch(batch, torch.float64, None), idx)
            loss = spec.task.loss(model, checked)
    except Exception as err:
        raise SpecError(
            f"spec {file}: {who} and {split}() do not fit together: the task's loss on {len(idx)} example(s) of "
            f"{split}() (shapes {shapes}) failed with {type(err).__name__}: {err}.{_first_layer(spec.model)} "
            f"Fix: make {who} accept {split}()'s inputs (input width, number of outputs, label type), or fix "
            f"{split}()."
        ) from err
    if not isinstance(loss, torch.Tensor) or loss.shape != (len(idx),):
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type_words(loss)
        raise SpecError(
            f"spec {file}: task().loss(model, batch) returned shape {got} on {len(idx)} example(s) of {split}() "
            f"(shapes {shapes}); expected one loss per example, shape ({len(idx)},). Fix: compute the loss with "
            "reduction='none'."
        )
    if not bool(torch.isfinite(loss).all()):
        raise SpecError(
            f"spec {file}: the loss of {who} on the first examples of {split}() is not finite ({loss.tolist()}). "
            "Fix: check the data (NaN?) and the model's weights."
        )


def check_groups(spec: Spec, groups: Any) -> np.ndarray:
    file = spec.path
    if isinstance(groups, torch.Tensor):
        groups = groups.detach().cpu().numpy()
    if hasattr(groups, "to_numpy"):
        groups = groups.to_numpy()
    try:
        array = np.asarray(groups)
    except Exception as err:  # pragma: no cover - np.asarray accepts nearly anything
        raise SpecError(f"{where(file, 'groups')}() returned {type_words(groups)}: {err}") from err
    if array.ndim != 1:
        raise SpecError(
            f"{where(file, 'groups')}() returned an array of shape {array.shape}; expected one group label per "
            "example, shape (n,). Fix: return a 1-D list or array."
        )
    if "query" not in spec.data and "validation" not in spec.data:
        raise SpecError(
            f"{where(file, 'groups')}() gives group labels, but the spec defines neither query() nor "
            "validation(), the examples they label. Fix: add query()."
        )
    split = spec.query_split
    n = spec.n(split)
    if len(array) != n:
        raise SpecError(
            f"{where(file, 'groups')}() returned {len(array)} labels but {split}() has {n} examples: groups() "
            f"labels the examples of {split}() (query() if defined, else validation()), one each. Fix: return "
            f"{n} labels."
        )
    missing = first_missing_label(array)
    if missing is not None:
        raise SpecError(
            f"{where(file, 'groups')}() has no group for example {missing} of {split}() ({array[missing]!r}). Fix: "
            "return a label for every example (e.g. fill the missing ones with 'unknown')."
        )
    try:
        distinct = np.unique(array)
    except TypeError:  # labels of mixed types (e.g. 1 and "1") cannot be sorted
        kinds = sorted({type(g).__name__ for g in array.tolist()})
        raise SpecError(
            f"{where(file, 'groups')}() returned labels of mixed types {kinds}. Fix: return labels of one type "
            "(e.g. strings)."
        ) from None
    if len(distinct) < 2:
        raise SpecError(
            f"{where(file, 'groups')}() has a single group {distinct.tolist()}; a fairness audit compares "
            "at least two. Fix: return the group of each example."
        )
    return array


def check_str(file: Path, module: ModuleType, name: str) -> str | None:
    value = getattr(module, name, None)
    if value is None:
        return None
    if not isinstance(value, str):
        raise SpecError(
            f"{where(file, name)} is {type_words(value)}; expected a string. Fix: set {name} = '...'."
        )
    return value


def check_names(file: Path, module: ModuleType, name: str) -> list[str] | None:
    if not has(module, name):
        return None
    value = spec_value(file, module, name)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise SpecError(
            f"{where(file, name)} is {type_words(value)}; expected a list of strings. Fix: set {name} = ['a', 'b', ...]."
        )
    return [str(v) for v in value]


def check_image_shape(spec: Spec, shape: Any) -> tuple[int, ...] | None:
    if shape is None:
        return None
    file = spec.path
    if callable(shape):
        shape = spec_value(file, spec.namespace, "image_shape")
    if (
        isinstance(shape, (str, bytes))
        or not isinstance(shape, Sequence)
        or len(shape) not in (2, 3)
        or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape)
    ):
        raise SpecError(
            f"{where(file, 'image_shape')} = {shape!r}; expected (height, width) or (height, width, channels) "
            "of positive ints. Fix: set e.g. image_shape = (8, 8)."
        )
    shape = tuple(int(s) for s in shape)
    width = spec.inputs("train", [0]).shape[1]
    if math.prod(shape) != width:
        raise SpecError(
            f"{where(file, 'image_shape')} = {shape} holds {math.prod(shape)} values, but one input of train() "
            f"has {width}. Fix: set image_shape to the picture's shape (its product must be {width})."
        )
    return shape


def check_texts(spec: Spec, texts: Any) -> dict[str, list[str]]:
    if texts is None:
        return {}
    file = spec.path
    if not isinstance(texts, Mapping):
        texts = {"train": texts}
    out = {}
    for split, values in texts.items():
        if split not in SPLITS:
            raise SpecError(
                f"{where(file, 'texts')} has a key {split!r}; expected keys among {list(SPLITS)}. Fix: rename it."
            )
        if split not in spec.data:
            raise SpecError(
                f"{where(file, 'texts')} has texts for {split}, but the spec defines no {split}()."
            )
        if isinstance(values, str) or not isinstance(values, Iterable):
            raise SpecError(
                f"{where(file, 'texts')}[{split!r}] is {type_words(values)}; expected a list of strings."
            )
        values = [str(v) for v in values]
        if len(values) != spec.n(split):
            raise SpecError(
                f"{where(file, 'texts')}[{split!r}] has {len(values)} strings but {split}() has {spec.n(split)} "
                "examples. Fix: give one text per example."
            )
        out[split] = values
    return out


def check_display(spec: Spec, display: Any) -> dict[str, np.ndarray]:
    if display is None:
        return {}
    file = spec.path
    if not isinstance(display, Mapping):
        raise SpecError(
            f"{where(file, 'display')}() returned {type_words(display)}; expected a dict such as "
            "{'train': X_train_raw, 'query': X_query_raw}. Fix: return a dict of arrays."
        )
    out = {}
    for split, rows in display.items():
        if split not in spec.data:
            raise SpecError(
                f"{where(file, 'display')}() has rows for {split!r}, which the spec does not define."
            )
        array = np.asarray(rows.to_numpy() if hasattr(rows, "to_numpy") else rows)
        if array.ndim != 2 or array.shape[0] != spec.n(split):
            raise SpecError(
                f"{where(file, 'display')}()[{split!r}] has shape {array.shape}; expected one row per example of "
                f"{split}(), shape ({spec.n(split)}, n_columns). Fix: return the rows in the same order."
            )
        out[split] = array
    return out


def check_kind(spec: Spec, kind: Any) -> str:
    if kind is None:
        if spec.texts:
            return "text"
        if spec.image_shape is not None:
            return "image"
        return "tabular"
    if kind not in KINDS:
        raise SpecError(
            f"{where(spec.path, 'kind')} = {kind!r}; expected one of {list(KINDS)}. Fix: set kind = 'tabular'."
        )
    if kind == "image" and spec.image_shape is None:
        x = spec.source("train").get([0])[0]
        if x.dim() not in (3, 4):
            raise SpecError(
                f"spec {spec.path}: kind = 'image' but the spec sets no image_shape and train()'s inputs have shape "
                f"{tuple(x.shape[1:])}. Fix: set image_shape = (height, width)."
            )
        shape = tuple(int(s) for s in x.shape[1:])
        if len(shape) == 3 and shape[0] in (1, 3):  # channels first -> shown as (h, w) or (h, w, 3)
            shape = shape[1:] if shape[0] == 1 else (*shape[1:], 3)
        spec.image_shape = shape
    if kind == "text" and "train" not in spec.texts:
        raise SpecError(
            f"spec {spec.path}: kind = 'text' needs texts (one string per training example) to show. "
            "Fix: define texts = [...] or texts() returning {'train': [...], 'query': [...]}."
        )
    return kind


def check_curvature(file: Path, curvature: Any, damping: Any) -> None:
    if isinstance(curvature, Curvature):
        return
    try:
        curvature_arguments(curvature, damping)
    except ValueError as err:
        raise SpecError(f"{where(file, 'curvature')}: {err}") from err


def default_units(task: Task) -> str:
    if isinstance(task, ClassificationTask):
        return "nats"
    if isinstance(task, CausalLMTask):
        return "nats (summed over the sequence's tokens)"
    if isinstance(task, RegressionTask):
        return "squared-error units"
    return "the loss's units"
