"""Spec files: a small Python file that tells the ``datatrace`` commands about a model and its data.

The commands ``datatrace explain | debug | value | audit SPEC`` load ``SPEC`` with :func:`load_spec`. A spec is
ordinary Python (it is *your* code and it is executed as such; datatrace itself never unpickles anything). It
defines some of the names below, each either as a function without arguments or as a plain value; every function
is called once, when the spec is loaded.

A PyTorch model:

=====================  ========================================================================================
name                   what it gives
=====================  ========================================================================================
``model()``            the **trained** ``torch.nn.Module`` (or an untrained one plus ``weights``)
``weights``            optional: a file with the trained weights, relative to the spec's folder: ``.safetensors``,
                       or a ``state_dict`` saved with ``torch.save`` (read with ``torch.load(weights_only=True)``)
``task()``             the :class:`~datatrace.Task` the model was trained with (loss, weight decay), e.g.
                       ``datatrace.ClassificationTask(weight_decay=1e-3)``
``train()``            the training data exactly as trained on: a tuple ``(X, y)`` of arrays or tensors, a
                       ``Dataset`` or a ``DataLoader``
=====================  ========================================================================================

or a scikit-learn model: ``estimator()`` returning a *fitted* ``LinearRegression``, ``Ridge`` or
``LogisticRegression`` (see :func:`datatrace.from_sklearn`) and ``train()`` returning ``(X, y)`` as given to its
``fit`` (labels in the estimator's own label space). No ``task()`` is needed: it is the estimator's objective. The
commands work on the estimator's exact PyTorch equivalent (the ``nn.Linear`` and task of
:func:`datatrace.from_sklearn`, labels encoded through ``classes_``); ``train_fn`` still receives subsets with the
estimator's own labels.

Optional names, needed by some commands:

=====================  ========================================================================================
``query()``            the examples to explain (``datatrace explain``) or audit for fairness; same form as train
``validation()``       held-out data: ``debug`` ranks training examples by their harm to its loss; ``value``
                       values training data by it; used in place of ``query()`` when that is missing
``train_fn(subset)``   retrains from scratch (or warm-started) on ``subset`` (same form as ``train()``) and
                       returns the model (an ``nn.Module``, or a fitted estimator): ``debug``'s counterfactual
                       check removes the most harmful examples, retrains and measures the validation loss
``groups()``           one group label per example of ``query()`` (or ``validation()``): ``audit --fairness``
``kind``               ``"image"``, ``"tabular"`` or ``"text"``: how reports show examples (default: inferred)
``image_shape``        e.g. ``(8, 8)`` or ``(28, 28)`` or ``(32, 32, 3)``: reshapes a flat input row to a picture
``feature_names``      one name per input column (tabular)
``class_names``        one name per class index (torch classifiers; an estimator has its ``classes_``)
``texts``              a list of strings, one per training example, or ``{"train": [...], "query": [...],
                       "validation": [...]}`` (text)
``display()``          ``{"train": X, "query": X, "validation": X}``: rows to *show* in tabular reports instead of
                       the model's inputs (e.g. the features in their original units before standardising)
``curvature``          inverse-curvature route (default ``"auto"``; ``--curvature`` overrides)
``damping``            damping added to the curvature (default ``"auto"``)
``units``              words for the loss's units (default: ``"nats"`` for classification, ``"squared error
                       units"`` for regression)
=====================  ========================================================================================

What every command does with it: ``score[q, i] ~ f_q(theta without i) - f_q(theta_hat)``, the change of query q's
measurement (its loss, in the units above) if training example i were removed and the model retrained.

:func:`load_spec` checks everything before any expensive work starts: which names are missing for the command
(and which command needs which), the type of every return value, and that model and data fit together (one
forward pass of the loss on two examples of each data set). Every message names the spec file and the function.

Example spec (``digits.py``)::

    import torch, datatrace
    from sklearn.datasets import load_digits

    kind, image_shape = "image", (8, 8)

    def train():
        X, y = load_digits(return_X_y=True)
        return torch.tensor(X[:1000] / 16), torch.tensor(y[:1000])

    def task():
        return datatrace.ClassificationTask(weight_decay=1e-3)

    def model():
        net = torch.nn.Linear(64, 10).double()
        return datatrace.verification.training.fit_full_batch(net, task(), train())
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from datatrace.data import DataLike, DataSource, as_data_source, cast_batch
from datatrace.errors import SpecError, SpecRuntimeError
from datatrace.tasks import ClassificationTask, RegressionTask, Task

__all__ = [
    "KINDS",
    "NEEDS",
    "Predictions",
    "Spec",
    "SpecError",
    "SpecRuntimeError",
    "load_spec",
]

logger = logging.getLogger(__name__)

KINDS = ("image", "tabular", "text")
SPLITS = ("train", "query", "validation")

#: what each command needs beyond the model and ``train()``; ``"query"`` means query() or validation()
NEEDS: dict[str, tuple[str, ...]] = {
    "explain": ("query",),
    "debug": (),
    "debug --remove-k": ("validation", "train_fn"),
    "value": ("validation",),
    "audit --fairness": ("query", "groups"),
    "audit --memorisation": (),
}

_REQUIREMENTS_TEXT = (
    "Every command needs train() and either model() with task() (a PyTorch model) or estimator() (a fitted "
    "scikit-learn model). explain also needs query() (or validation()); value needs validation(); "
    "audit --fairness needs groups() and query() (or validation()); debug uses validation() when defined and "
    "needs train_fn(subset) with validation() for its retraining check."
)


@dataclass(frozen=True)
class Predictions:
    """Per-example loss (in the task's units) and, for classifiers, predicted class index and its probability."""

    loss: np.ndarray
    predicted: np.ndarray | None = None
    confidence: np.ndarray | None = None
    target: np.ndarray | None = None

    @property
    def correct(self) -> np.ndarray | None:
        if self.predicted is None or self.target is None:
            return None
        return self.predicted == self.target


@dataclass
class Spec:
    """A loaded, checked spec file. Build it with :func:`load_spec`.

    ``data`` holds the data sets as the spec returned them (``"train"``, and ``"query"`` / ``"validation"`` when
    defined); ``model`` and ``task`` are the PyTorch view of the model (for an estimator: the ``nn.Linear`` and
    task of :func:`datatrace.from_sklearn`), used for losses and predictions in reports.
    """

    path: Path
    namespace: ModuleType
    backend: str  # "torch" | "sklearn"
    model: nn.Module
    task: Task
    data: dict[str, DataLike]
    estimator: Any = None
    train_fn: Callable[..., Any] | None = None
    groups: np.ndarray | None = None
    kind: str = "tabular"
    image_shape: tuple[int, ...] | None = None
    feature_names: list[str] | None = None
    class_names: list[str] | None = None
    texts: dict[str, list[str]] = field(default_factory=dict)
    display: dict[str, np.ndarray] = field(default_factory=dict)
    curvature: Any = "auto"
    damping: Any = "auto"
    units: str = "nats"
    defined: frozenset[str] = frozenset()
    _encoded: dict[str, DataLike] = field(default_factory=dict, repr=False)
    _predictions: dict[str, Predictions] = field(default_factory=dict, repr=False)
    _sources: dict[str, DataSource] = field(default_factory=dict, repr=False)

    # -- what is there -----------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    def has(self, split: str) -> bool:
        return split in self.data

    def n(self, split: str) -> int:
        return len(self.source(split))

    @property
    def query_split(self) -> str:
        """``"query"`` when the spec defines ``query()``, else ``"validation"`` (check with :meth:`require`)."""
        return "query" if "query" in self.data else "validation"

    @property
    def is_classifier(self) -> bool:
        return isinstance(self.task, ClassificationTask)

    def require(self, command: str) -> None:
        """Raise a :class:`SpecError` naming what ``command`` (a key of :data:`NEEDS`) needs and the spec lacks."""
        missing = []
        for need in NEEDS[command]:
            if need == "query":
                if "query" not in self.data and "validation" not in self.data:
                    missing.append("query() (or validation())")
            elif need in ("validation",):
                if need not in self.data:
                    missing.append(f"{need}()")
            elif need == "train_fn":
                if self.train_fn is None:
                    missing.append("train_fn(subset)")
            elif need == "groups" and self.groups is None:
                missing.append("groups()")
        if missing:
            raise SpecError(
                f"spec {self.path}: `datatrace {command}` needs {' and '.join(missing)}, which the spec does not "
                f"define. {_REQUIREMENTS_TEXT} Fix: add {' and '.join(missing)} to {self.path.name}."
            )

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts about the spec (for results.json)."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "model": type(self.estimator).__name__
            if self.estimator is not None
            else type(self.model).__name__,
            "num_params": int(sum(p.numel() for p in self.model.parameters())),
            "task": repr(self.task),
            "kind": self.kind,
            "units": self.units,
            "sizes": {split: self.n(split) for split in self.data},
            "defined": sorted(self.defined),
        }

    # -- data views --------------------------------------------------------------------------------------------
    def encoded(self, split: str) -> DataLike:
        """``split`` in the form the PyTorch model and task take (labels as class indices for an estimator)."""
        if split not in self._encoded:
            self._encoded[split] = self._encode(split, self.data[split], self.estimator)
        return self._encoded[split]

    def _encode(self, split: str, data: DataLike, estimator: Any) -> DataLike:
        if estimator is None:
            return data
        from datatrace.attributors.sklearn import SklearnInfluence

        X, y = data
        if hasattr(X, "toarray"):
            X = X.toarray()
        translator = SklearnInfluence(estimator)
        return np.asarray(X, dtype=np.float64), translator.encode_targets(y, f"{split}()[1]")

    def source(self, split: str) -> DataSource:
        """``encoded(split)`` as an indexed :class:`~datatrace.data.DataSource` (cached)."""
        if split not in self._sources:
            self._sources[split] = as_data_source(self.encoded(split), f"{split}()")
        return self._sources[split]

    def labels(self, split: str) -> np.ndarray | None:
        """The labels of ``split`` as the spec gave them (second element of each example), or None."""
        data = self.data[split]
        if isinstance(data, (tuple, list)):
            if len(data) < 2:
                return None
            y = data[1]
            return y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        source = self.source(split)
        batch = source.get(torch.arange(len(source)))
        return batch[1].detach().cpu().numpy() if len(batch) > 1 else None

    def class_name(self, index: int) -> str:
        """Words for class index ``index``: ``class_names[index]``, else the estimator's ``classes_[index]``,
        else the index itself."""
        index = int(index)
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return str(self.class_names[index])
        if self.estimator is not None and hasattr(self.estimator, "classes_"):
            return str(self.estimator.classes_[index])
        return str(index)

    def label_text(self, split: str, index: int) -> str:
        """The label of example ``index`` of ``split``, in words (class names for classifiers)."""
        if self.is_classifier:
            source = self.source(split)
            batch = source.get([int(index)])
            if len(batch) > 1 and batch[1].numel() == 1 and not batch[1].is_floating_point():
                return self.class_name(int(batch[1].reshape(-1)[0]))
        labels = self.labels(split)
        if labels is None:
            return "—"
        return _short(labels[int(index)])

    def label_texts(self, split: str) -> list[str]:
        """:meth:`label_text` of every example of ``split``, computed in one pass."""
        if self.is_classifier:
            source = self.source(split)
            batch = source.get(torch.arange(len(source)))
            if len(batch) > 1 and batch[1].dim() == 1 and not batch[1].is_floating_point():
                names = {}
                out = []
                for value in batch[1].tolist():
                    if value not in names:
                        names[value] = self.class_name(value)
                    out.append(names[value])
                return out
        return [self.label_text(split, i) for i in range(self.n(split))]

    def inputs(self, split: str, indices: Sequence[int]) -> np.ndarray:
        """The model inputs (first element) of examples ``indices`` of ``split``, flattened to rows."""
        batch = self.source(split).get(list(indices))
        x = batch[0]
        return x.detach().cpu().double().reshape(len(indices), -1).numpy()

    def shown(self, split: str, indices: Sequence[int]) -> np.ndarray:
        """Rows to show for examples ``indices`` of ``split``: ``display()``'s rows, or the model inputs."""
        if split in self.display:
            return np.asarray(self.display[split])[list(indices)]
        return self.inputs(split, indices)

    def text(self, split: str, index: int) -> str | None:
        texts = self.texts.get(split)
        return None if texts is None else str(texts[int(index)])

    def predictions(self, split: str) -> Predictions:
        """Loss, predicted class and its probability for every example of ``split`` (cached)."""
        if split not in self._predictions:
            self._predictions[split] = _predict(self.model, self.task, self.source(split))
        return self._predictions[split]

    # -- influence ---------------------------------------------------------------------------------------------
    def influence_data(self, split: str) -> DataLike:
        """``split`` in the form the influence object of :meth:`fit_influence` takes (:meth:`encoded`)."""
        return self.encoded(split)

    def fit_influence(self, curvature: Any = None, damping: Any = None, progress: bool = True) -> Any:
        """A fitted :class:`~datatrace.InfluenceFunction` on ``encoded("train")``.

        For an estimator this is the influence function of its exact PyTorch equivalent (the ``nn.Linear`` and the
        task of :func:`datatrace.from_sklearn`, weight decay in datatrace's mean form), so every command handles
        both kinds of spec the same way, on label-encoded data.
        """
        from datatrace.attributors.influence import InfluenceFunction

        route, damp = _curvature_arguments(
            self.curvature if curvature is None else curvature, self.damping if damping is None else damping
        )
        return InfluenceFunction(self.model, self.task, curvature=route, damping=damp, progress=progress).fit(
            self.encoded("train")
        )

    def retrain_fn(self) -> Callable[..., Any] | None:
        """``train_fn`` taking subsets of ``encoded("train")`` (an estimator's labels are decoded back to its
        ``classes_`` before the spec's ``train_fn`` sees them); None when the spec has no ``train_fn``."""
        if self.train_fn is None:
            return None
        if self.estimator is None:
            return self.train_fn
        return _DecodedTrainFn(self.train_fn, np.asarray(self.estimator.classes_))

    def loss_metric(self, split: str = "validation") -> Callable[[Any], float]:
        """``metric(model) -> float``: the mean loss on ``split`` (in :attr:`units`) of a model returned by
        ``train_fn`` (an ``nn.Module`` or a fitted estimator)."""
        return _MeanLoss(self, split)


class _DecodedTrainFn:
    """The spec's ``train_fn`` for an estimator, called on label-encoded subsets (labels decoded first)."""

    def __init__(self, train_fn: Callable[..., Any], classes: np.ndarray) -> None:
        self.train_fn = train_fn
        self.classes = classes
        try:
            self.accepts_seed = "seed" in inspect.signature(train_fn).parameters
        except (TypeError, ValueError):
            self.accepts_seed = False

    def __call__(self, subset: Any, seed: int | None = None) -> Any:
        X, y = subset
        y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
        decoded = (np.asarray(X), self.classes[y.astype(np.int64)])
        if self.accepts_seed and seed is not None:
            return self.train_fn(decoded, seed=seed)
        return self.train_fn(decoded)


class _MeanLoss:
    """Picklable ``metric(model)``: mean loss of a retrained model on one of the spec's data sets."""

    def __init__(self, spec: Spec, split: str) -> None:
        self.spec = spec
        self.split = split
        self.__name__ = f"mean {split} loss ({spec.units})"

    def __call__(self, model: Any) -> float:
        spec = self.spec
        if isinstance(model, nn.Module):
            module, task, data = model, spec.task, spec.encoded(self.split)
        else:
            from datatrace.attributors.sklearn import SklearnInfluence

            translator = SklearnInfluence(model)
            module, task = translator.module_, translator.task
            data = spec._encode(self.split, spec.data[self.split], model)
        return float(_predict(module, task, as_data_source(data, self.split)).loss.mean())


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def load_spec(path: str | os.PathLike[str], command: str | None = None, seed: int | None = 0) -> Spec:
    """Execute the spec file at ``path``, check what it defines and return a :class:`Spec`.

    Args:
        path: the spec file (a ``.py`` file).
        command: a key of :data:`NEEDS` (e.g. ``"explain"``) to check that the spec has what it needs now.
        seed: ``torch.manual_seed`` and ``numpy.random.seed`` before running the spec's code (None: leave them).

    Raises:
        SpecError: a missing or wrongly typed name, or model and data that do not fit together; the message names
            the spec file and the function.
        SpecRuntimeError: the spec's own code raised (chained to the original exception).
    """
    file = Path(path)
    if not file.exists():
        raise SpecError(
            f"spec {file}: no such file. Fix: pass the path of a Python spec file (see docs/examples/)."
        )
    if file.is_dir():
        raise SpecError(
            f"spec {file}: is a directory. Fix: pass the path of a Python spec file, e.g. spec.py."
        )
    if file.suffix != ".py":
        raise SpecError(
            f"spec {file}: expected a Python file ending in .py (a spec is Python code that defines model(), "
            "task() and train()). Fix: pass the spec's .py file."
        )
    file = file.resolve()
    if seed is not None:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 - spec code may use the global numpy RNG
    namespace = _import(file)
    return _build(file, namespace, command)


def _import(file: Path) -> ModuleType:
    digest = hashlib.sha256(str(file).encode()).hexdigest()[:10]
    name = f"datatrace_spec_{file.stem.replace('-', '_')}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(name, file)
    if loader_spec is None or loader_spec.loader is None:  # pragma: no cover - a .py file always has a loader
        raise SpecError(f"spec {file}: Python cannot load this file. Fix: pass a .py file.")
    module = importlib.util.module_from_spec(loader_spec)
    folder = str(file.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)  # a spec may import helper modules that sit next to it
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except SyntaxError as err:
        sys.modules.pop(name, None)
        raise SpecError(
            f"spec {file}: is not valid Python (line {err.lineno}: {err.msg}). Fix: correct the syntax."
        ) from err
    except Exception as err:
        sys.modules.pop(name, None)
        hint = ""
        if isinstance(err, ModuleNotFoundError) and err.name:
            hint = f" Fix: install the package that provides {err.name!r} (e.g. pip install {err.name})."
        raise SpecRuntimeError(
            f"spec {file}: importing the file raised {type(err).__name__}: {err}.{hint}"
        ) from err
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return module


def _where(file: Path, name: str) -> str:
    return f"spec {file}: {name}"


def _value(file: Path, module: ModuleType, name: str, call: bool = True) -> Any:
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
                f"{_where(file, name)}() takes arguments ({', '.join(p.name for p in params)}), but datatrace "
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
                f"{_where(file, name)}() raised {type(err).__name__}: {err}. Fix: {fix}."
            ) from err
        if value is None:
            raise SpecError(
                f"{_where(file, name)}() returned None. Fix: end {name}() with a return statement."
            )
    return value


def _has(module: ModuleType, name: str) -> bool:
    return getattr(module, name, None) is not None


def _build(file: Path, module: ModuleType, command: str | None) -> Spec:
    defined = frozenset(n for n in _ALL_NAMES if _has(module, n))
    # -- the model -------------------------------------------------------------------------------------------
    if _has(module, "estimator") and _has(module, "model"):
        raise SpecError(
            f"spec {file}: defines both estimator() and model(); a spec describes one model. Fix: keep "
            "estimator() for a scikit-learn model or model() + task() for a PyTorch model, not both."
        )
    missing = [n for n in ("train",) if not _has(module, n)]
    if not _has(module, "estimator"):
        missing = [n for n in ("model", "task") if not _has(module, n)] + missing
    if missing:
        listed = " and ".join(f"{n}()" for n in missing)
        raise SpecError(
            f"spec {file}: does not define {listed}. {_REQUIREMENTS_TEXT} Fix: add {listed} to {file.name} "
            "(see the datatrace.cli.spec docstring or docs/examples/ for complete specs)."
        )
    train = _check_data(file, "train", _value(file, module, "train"))
    estimator = None
    if _has(module, "estimator"):
        estimator = _value(file, module, "estimator")
        model, task = _check_estimator(file, estimator, train)
        backend = "sklearn"
    else:
        backend = "torch"
        task = _value(file, module, "task")
        if not isinstance(task, Task):
            raise SpecError(
                f"{_where(file, 'task')}() returned {_type(task)}; expected a datatrace.Task. Fix: return e.g. "
                "datatrace.ClassificationTask(weight_decay=...) with the weight decay the model was trained with."
            )
        model = _value(file, module, "model")
        if not isinstance(model, nn.Module):
            raise SpecError(
                f"{_where(file, 'model')}() returned {_type(model)}; expected a torch.nn.Module (the trained "
                "model). Fix: return the network, e.g. `return net` (for a scikit-learn model define estimator() "
                "instead)."
            )
        if _has(module, "weights"):
            _load_weights(file, model, module.weights)
    data: dict[str, DataLike] = {"train": train}
    for split in ("query", "validation"):
        if _has(module, split):
            data[split] = _check_data(file, split, _value(file, module, split))
            if estimator is not None:
                _check_estimator_data(file, split, estimator, data[split])

    spec = Spec(
        path=file,
        namespace=module,
        backend=backend,
        model=model,
        task=task,
        data=data,
        estimator=estimator,
        defined=defined,
    )
    for split in data:
        _check_forward(spec, split)

    # -- optional names --------------------------------------------------------------------------------------
    if _has(module, "train_fn"):
        train_fn = module.train_fn
        if not callable(train_fn):
            raise SpecError(
                f"{_where(file, 'train_fn')} is {_type(train_fn)}; expected a function train_fn(subset) that "
                "retrains on a subset of train() and returns the model. Fix: define it with `def`."
            )
        spec.train_fn = train_fn
    if _has(module, "groups"):
        spec.groups = _check_groups(spec, _value(file, module, "groups"))
    spec.curvature = getattr(module, "curvature", "auto")
    spec.damping = getattr(module, "damping", "auto")
    _check_curvature(file, spec.curvature, spec.damping)
    spec.units = _check_str(file, module, "units") or _default_units(task)
    spec.class_names = _check_names(file, module, "class_names")
    spec.feature_names = _check_names(file, module, "feature_names")
    spec.image_shape = _check_image_shape(spec, getattr(module, "image_shape", None))
    spec.texts = _check_texts(spec, _value(file, module, "texts") if _has(module, "texts") else None)
    spec.display = _check_display(spec, _value(file, module, "display") if _has(module, "display") else None)
    spec.kind = _check_kind(spec, getattr(module, "kind", None))
    if spec.feature_names is not None:
        width = spec.shown("train", [0]).shape[1]
        if len(spec.feature_names) != width:
            raise SpecError(
                f"{_where(file, 'feature_names')} has {len(spec.feature_names)} names but the rows shown have "
                f"{width} columns ({'display()' if 'train' in spec.display else 'the model inputs of train()'}). "
                "Fix: give one name per column."
            )
    if command is not None:
        if command not in NEEDS:
            raise ValueError(f"command={command!r} is not one of {sorted(NEEDS)}")
        spec.require(command)
    logger.info(
        "loaded spec %s: %s model, %s",
        file,
        backend,
        ", ".join(f"{spec.n(s)} {s} examples" for s in data),
    )
    return spec


_ALL_NAMES = (
    "model",
    "weights",
    "task",
    "train",
    "estimator",
    "query",
    "validation",
    "train_fn",
    "groups",
    "kind",
    "image_shape",
    "feature_names",
    "class_names",
    "texts",
    "display",
    "curvature",
    "damping",
    "units",
)


def _type(value: Any) -> str:
    from datatrace.errors import describe

    return f"{type(value).__name__} ({describe(value, 60)})"


def _short(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    if isinstance(value, np.ndarray) and value.size > 1:
        return np.array2string(value, precision=3, threshold=6)
    return str(value.item() if hasattr(value, "item") and np.ndim(value) == 0 else value)


def _to_array(file: Path, name: str, position: int, value: Any) -> np.ndarray | torch.Tensor:
    """A data tuple's element as an array or tensor; pandas objects become numpy arrays."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value
    if hasattr(value, "to_numpy") and callable(value.to_numpy):  # pandas DataFrame / Series
        return value.to_numpy()
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    raise SpecError(
        f"{_where(file, name)}()[{position}] is {_type(value)}; expected a numpy array or torch tensor. "
        f"Fix: return {name}() as a tuple of arrays, e.g. (X, y)."
    )


def _check_data(file: Path, name: str, value: Any) -> DataLike:
    """Accept a tuple/list of arrays or tensors, a Dataset or a DataLoader; check lengths agree."""
    if isinstance(value, (Dataset, DataLoader)):
        try:
            source = as_data_source(value, f"{name}()")
        except ValueError as err:
            raise SpecError(f"{_where(file, name)}() returned data datatrace cannot index: {err}") from err
        if len(source) < 1:
            raise SpecError(f"{_where(file, name)}() returned an empty data set. Fix: return some examples.")
        return value
    if not isinstance(value, (tuple, list)) or len(value) == 0:
        raise SpecError(
            f"{_where(file, name)}() returned {_type(value)}; expected a tuple (X, y) of numpy arrays or torch "
            "tensors, a torch Dataset or a DataLoader. Fix: return e.g. `return X, y`."
        )
    arrays = tuple(_to_array(file, name, i, v) for i, v in enumerate(value))
    for i, a in enumerate(arrays):
        if a.ndim == 0:
            raise SpecError(
                f"{_where(file, name)}()[{i}] is a scalar; every element needs one row per example. "
                "Fix: return arrays whose first axis runs over examples."
            )
    lengths = [int(a.shape[0]) for a in arrays]
    if len(set(lengths)) != 1:
        raise SpecError(
            f"{_where(file, name)}() returned elements of different lengths {lengths}: X and y need one row "
            "per example each. Fix: return arrays with the same first dimension."
        )
    if lengths[0] < (2 if name == "train" else 1):
        raise SpecError(
            f"{_where(file, name)}() returned {lengths[0]} example(s). Fix: return "
            f"{'at least 2 training examples' if name == 'train' else 'at least one example'}."
        )
    return arrays


def _check_estimator(file: Path, estimator: Any, train: DataLike) -> tuple[nn.Module, Task]:
    from datatrace.attributors.sklearn import SklearnInfluence, _scale_weight_decay

    try:
        translator = SklearnInfluence(estimator)
    except (TypeError, ValueError) as err:
        raise SpecError(
            f"{_where(file, 'estimator')}() returned a model datatrace cannot use: {err}"
        ) from err
    _check_estimator_data(file, "train", estimator, train)
    # the estimator's penalty is on the summed loss; datatrace's objective is the mean loss (see datatrace.attributors.sklearn)
    return translator.module_, _scale_weight_decay(translator.task, len(train[0]))


def _check_estimator_data(file: Path, split: str, estimator: Any, data: DataLike) -> None:
    from datatrace.attributors.sklearn import SklearnInfluence

    if not isinstance(data, tuple) or len(data) != 2:
        raise SpecError(
            f"{_where(file, split)}() must return a pair (X, y) for a scikit-learn estimator, got "
            f"{_type(data)}. Fix: return X, y as given to estimator.fit."
        )
    X, y = data
    width = int(estimator.n_features_in_)
    if X.ndim != 2 or X.shape[1] != width:
        raise SpecError(
            f"{_where(file, split)}()[0] has shape {tuple(X.shape)}, but estimator() was fitted on {width} "
            f"feature(s): X must have shape (n, {width}). Fix: return the same columns, with the same "
            "preprocessing, as the estimator was fitted on."
        )
    try:
        SklearnInfluence(estimator).encode_targets(np.asarray(y), f"{split}()[1]")
    except ValueError as err:
        raise SpecError(f"spec {file}: {split}() does not fit estimator(): {err}") from err


def _load_weights(file: Path, model: nn.Module, weights: Any) -> None:
    if not isinstance(weights, (str, os.PathLike)):
        raise SpecError(
            f"{_where(file, 'weights')} is {_type(weights)}; expected a file name (relative to the spec's folder). "
            "Fix: set weights = 'model.safetensors'."
        )
    wpath = Path(weights)
    if not wpath.is_absolute():
        wpath = file.parent / wpath
    if not wpath.exists():
        raise SpecError(
            f"{_where(file, 'weights')} = {str(weights)!r}: {wpath} does not exist. Fix: pass an existing file."
        )
    try:
        if wpath.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(wpath))
        else:
            state = torch.load(wpath, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SpecError(
            f"{_where(file, 'weights')}: {wpath} could not be read ({type(err).__name__}: {err}). Fix: save the "
            "weights with safetensors.torch.save_file(model.state_dict(), ...) or torch.save(model.state_dict(), "
            "...) (a state_dict, not a pickled model)."
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(
            f"{_where(file, 'weights')}: {wpath} does not hold a state_dict (a mapping of names to tensors). "
            "Fix: save model.state_dict()."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SpecError(
            f"{_where(file, 'weights')}: {wpath} does not match model(): {err}. Fix: make model() build the same "
            "architecture the weights were saved from."
        ) from err


def _first_layer(model: nn.Module) -> str:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
            return f" The model's first layer is {module!r}."
    return ""


def _check_forward(spec: Spec, split: str) -> None:
    """Run the task's loss on 2 examples of ``split``: catches shape and dtype mismatches before any real work."""
    file = spec.path
    try:
        source = spec.source(split)
    except ValueError as err:
        raise SpecError(
            f"{_where(file, split)}() returned data the model cannot take: {err} (for a PyTorch model every "
            "element must be numeric; string labels are only for a scikit-learn estimator, which encodes them)."
        ) from err
    idx = torch.arange(min(2, len(source)))
    try:
        batch = source.get(idx)
    except Exception as err:
        raise SpecRuntimeError(
            f"{_where(file, split)}(): reading examples {idx.tolist()} raised {err}"
        ) from err
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in batch]
    model = copy.deepcopy(spec.model).to(torch.float64).eval()
    who = "estimator()" if spec.estimator is not None else "model()"
    try:
        with torch.no_grad():
            loss = spec.task.loss(model, cast_batch(batch, torch.float64, None))
    except Exception as err:
        raise SpecError(
            f"spec {file}: {who} and {split}() do not fit together: the task's loss on {len(idx)} example(s) of "
            f"{split}() (shapes {shapes}) failed with {type(err).__name__}: {err}.{_first_layer(spec.model)} "
            f"Fix: make {who} accept {split}()'s inputs (input width, number of outputs, label type), or fix "
            f"{split}()."
        ) from err
    if not isinstance(loss, torch.Tensor) or loss.shape != (len(idx),):
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else _type(loss)
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


def _check_groups(spec: Spec, groups: Any) -> np.ndarray:
    file = spec.path
    if isinstance(groups, torch.Tensor):
        groups = groups.detach().cpu().numpy()
    if hasattr(groups, "to_numpy"):
        groups = groups.to_numpy()
    try:
        array = np.asarray(groups)
    except Exception as err:  # pragma: no cover - np.asarray accepts nearly anything
        raise SpecError(f"{_where(file, 'groups')}() returned {_type(groups)}: {err}") from err
    if array.ndim != 1:
        raise SpecError(
            f"{_where(file, 'groups')}() returned an array of shape {array.shape}; expected one group label per "
            "example, shape (n,). Fix: return a 1-D list or array."
        )
    if "query" not in spec.data and "validation" not in spec.data:
        raise SpecError(
            f"{_where(file, 'groups')}() gives group labels, but the spec defines neither query() nor "
            "validation(), the examples they label. Fix: add query()."
        )
    split = spec.query_split
    n = spec.n(split)
    if len(array) != n:
        raise SpecError(
            f"{_where(file, 'groups')}() returned {len(array)} labels but {split}() has {n} examples: groups() "
            f"labels the examples of {split}() (query() if defined, else validation()), one each. Fix: return "
            f"{n} labels."
        )
    if len(np.unique(array)) < 2:
        raise SpecError(
            f"{_where(file, 'groups')}() has a single group {np.unique(array).tolist()}; a fairness audit compares "
            "at least two. Fix: return the group of each example."
        )
    return array


def _check_str(file: Path, module: ModuleType, name: str) -> str | None:
    value = getattr(module, name, None)
    if value is None:
        return None
    if not isinstance(value, str):
        raise SpecError(
            f"{_where(file, name)} is {_type(value)}; expected a string. Fix: set {name} = '...'."
        )
    return value


def _check_names(file: Path, module: ModuleType, name: str) -> list[str] | None:
    if not _has(module, name):
        return None
    value = _value(file, module, name)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise SpecError(
            f"{_where(file, name)} is {_type(value)}; expected a list of strings. Fix: set {name} = ['a', 'b', ...]."
        )
    return [str(v) for v in value]


def _check_image_shape(spec: Spec, shape: Any) -> tuple[int, ...] | None:
    if shape is None:
        return None
    file = spec.path
    if callable(shape):
        shape = _value(file, spec.namespace, "image_shape")
    if (
        isinstance(shape, (str, bytes))
        or not isinstance(shape, Sequence)
        or len(shape) not in (2, 3)
        or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape)
    ):
        raise SpecError(
            f"{_where(file, 'image_shape')} = {shape!r}; expected (height, width) or (height, width, channels) "
            "of positive ints. Fix: set e.g. image_shape = (8, 8)."
        )
    shape = tuple(int(s) for s in shape)
    width = spec.inputs("train", [0]).shape[1]
    if math.prod(shape) != width:
        raise SpecError(
            f"{_where(file, 'image_shape')} = {shape} holds {math.prod(shape)} values, but one input of train() "
            f"has {width}. Fix: set image_shape to the picture's shape (its product must be {width})."
        )
    return shape


def _check_texts(spec: Spec, texts: Any) -> dict[str, list[str]]:
    if texts is None:
        return {}
    file = spec.path
    if not isinstance(texts, Mapping):
        texts = {"train": texts}
    out = {}
    for split, values in texts.items():
        if split not in SPLITS:
            raise SpecError(
                f"{_where(file, 'texts')} has a key {split!r}; expected keys among {list(SPLITS)}. Fix: rename it."
            )
        if split not in spec.data:
            raise SpecError(
                f"{_where(file, 'texts')} has texts for {split}, but the spec defines no {split}()."
            )
        if isinstance(values, str) or not isinstance(values, Iterable):
            raise SpecError(
                f"{_where(file, 'texts')}[{split!r}] is {_type(values)}; expected a list of strings."
            )
        values = [str(v) for v in values]
        if len(values) != spec.n(split):
            raise SpecError(
                f"{_where(file, 'texts')}[{split!r}] has {len(values)} strings but {split}() has {spec.n(split)} "
                "examples. Fix: give one text per example."
            )
        out[split] = values
    return out


def _check_display(spec: Spec, display: Any) -> dict[str, np.ndarray]:
    if display is None:
        return {}
    file = spec.path
    if not isinstance(display, Mapping):
        raise SpecError(
            f"{_where(file, 'display')}() returned {_type(display)}; expected a dict such as "
            "{'train': X_train_raw, 'query': X_query_raw}. Fix: return a dict of arrays."
        )
    out = {}
    for split, rows in display.items():
        if split not in spec.data:
            raise SpecError(
                f"{_where(file, 'display')}() has rows for {split!r}, which the spec does not define."
            )
        array = np.asarray(rows.to_numpy() if hasattr(rows, "to_numpy") else rows)
        if array.ndim != 2 or array.shape[0] != spec.n(split):
            raise SpecError(
                f"{_where(file, 'display')}()[{split!r}] has shape {array.shape}; expected one row per example of "
                f"{split}(), shape ({spec.n(split)}, n_columns). Fix: return the rows in the same order."
            )
        out[split] = array
    return out


def _check_kind(spec: Spec, kind: Any) -> str:
    if kind is None:
        if spec.texts:
            return "text"
        if spec.image_shape is not None:
            return "image"
        return "tabular"
    if kind not in KINDS:
        raise SpecError(
            f"{_where(spec.path, 'kind')} = {kind!r}; expected one of {list(KINDS)}. Fix: set kind = 'tabular'."
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


def _check_curvature(file: Path, curvature: Any, damping: Any) -> None:
    from datatrace.curvature import Curvature

    if isinstance(curvature, Curvature):
        return
    try:
        _curvature_arguments(curvature, damping)
    except ValueError as err:
        raise SpecError(f"{_where(file, 'curvature')}: {err}") from err


def _curvature_arguments(curvature: Any, damping: Any) -> tuple[Any, Any]:
    """``(curvature, damping)`` for InfluenceFunction: ``"auto"`` becomes an AutoCurvature when the registry
    does not know that name."""
    from datatrace.curvature import Curvature, available, make_curvature

    if isinstance(curvature, Curvature):
        return curvature, "auto"
    if curvature == "auto" and "auto" not in available():
        from datatrace.curvature.auto import AutoCurvature

        return AutoCurvature(damping=damping), "auto"
    make_curvature(curvature, damping)  # validates the name and the damping
    return curvature, damping


def _default_units(task: Task) -> str:
    if isinstance(task, ClassificationTask):
        return "nats"
    if isinstance(task, RegressionTask):
        return "squared-error units"
    return "the loss's units"


def _predict(model: nn.Module, task: Task, source: DataSource) -> Predictions:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float64)
    model = model.eval()
    losses, predicted, confidence, targets = [], [], [], []
    classify = isinstance(task, ClassificationTask)
    with torch.no_grad():
        for _, batch in source.batches(batch_size=1024):
            batch = cast_batch(batch, dtype, None)
            if classify:
                logits = task.outputs(model, batch)
                losses.append(task.loss_from_outputs(logits, batch).double())
                if logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1):
                    p1 = torch.sigmoid(logits.reshape(-1).double())
                    pred = (p1 > 0.5).long()
                    confidence.append(torch.where(pred == 1, p1, 1 - p1))
                else:
                    probs = torch.softmax(logits.double(), dim=1)
                    conf, pred = probs.max(dim=1)
                    confidence.append(conf)
                predicted.append(pred)
                targets.append(batch[1].reshape(-1).long())
            else:
                losses.append(task.loss(model, batch).double())
    loss = torch.cat(losses).numpy()
    if not classify:
        return Predictions(loss)
    return Predictions(
        loss, torch.cat(predicted).numpy(), torch.cat(confidence).numpy(), torch.cat(targets).numpy()
    )
