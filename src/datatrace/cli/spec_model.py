"""The loaded spec: what the commands read from a spec file once :func:`datatrace.cli.spec.load_spec` has checked it.

:class:`Spec` holds the spec's model (for an estimator, its exact PyTorch equivalent, :func:`datatrace.from_sklearn`),
task and data sets, and gives the views the commands need: the data as the model takes it (labels encoded by
:mod:`datatrace.cli.labels`), labels and inputs in words and rows for reports, cached predictions
(:mod:`datatrace.cli.predictions`), and the fitted influence function. :data:`NEEDS` says which spec names each
command needs. Scores follow the convention of :data:`datatrace.scores.MEANING`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from datatrace.attributors.influence import InfluenceFunction
from datatrace.cli.labels import DecodedTrainFn, encode_split, short_label
from datatrace.cli.predictions import MeanLoss, Predictions, batch_inputs, batch_targets, predict
from datatrace.curvature import AutoCurvature, Curvature, available, make_curvature
from datatrace.data import DataLike, DataSource, as_data_source
from datatrace.errors import SpecError
from datatrace.tasks import ClassificationTask, Task

__all__ = [
    "KINDS",
    "NEEDS",
    "REQUIREMENTS_TEXT",
    "SPLITS",
    "Spec",
    "curvature_arguments",
    "fit_influence",
    "take",
]

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

REQUIREMENTS_TEXT = (
    "Every command needs train() and either model() with task() (a PyTorch model) or estimator() (a fitted "
    "scikit-learn model). explain also needs query() (or validation()); value needs validation(); "
    "audit --fairness needs groups() and query() (or validation()); debug uses validation() when defined and "
    "needs train_fn(subset) with validation() for its retraining check."
)


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
    #: ``tokens(i)``: the token strings of training example ``i`` (one per loss term), for token-wise influence
    tokens: Callable[[int], Any] | None = None
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
                f"define. {REQUIREMENTS_TEXT} Fix: add {' and '.join(missing)} to {self.path.name}."
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
            # influence is taken with respect to these (requires_grad=True); frozen ones are held fixed
            "num_trainable_params": int(sum(p.numel() for p in self.model.parameters() if p.requires_grad)),
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
            self._encoded[split] = encode_split(split, self.data[split], self.estimator)
        return self._encoded[split]

    def source(self, split: str) -> DataSource:
        """``encoded(split)`` as an indexed :class:`~datatrace.data.DataSource` (cached)."""
        if split not in self._sources:
            self._sources[split] = as_data_source(self.encoded(split), f"{split}()")
        return self._sources[split]

    def _targets(self, split: str, indices: Any) -> torch.Tensor | None:
        """The targets of examples ``indices`` of ``split`` (``batch[1]``, or the task's key of a dict batch)."""
        batch = self.source(split).get(indices)
        y = batch_targets(self.task, batch)
        if y is not None and isinstance(batch, Mapping) and y.dim() > 1:
            return None  # a dict batch's per-token labels (a language model's): no label per example
        return y

    def labels(self, split: str) -> np.ndarray | None:
        """The labels of ``split`` as the spec gave them (second element of each example, or the task's key of
        dict examples), or None."""
        data = self.data[split]
        if isinstance(data, (tuple, list)):
            if len(data) < 2:
                return None
            y = data[1]
            return y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        y = self._targets(split, torch.arange(self.n(split)))
        return None if y is None else y.detach().cpu().numpy()

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
            y = self._targets(split, [int(index)])
            if y is not None and y.numel() == 1 and not y.is_floating_point():
                return self.class_name(int(y.reshape(-1)[0]))
        labels = self.labels(split)
        if labels is None:
            return "—"
        return short_label(labels[int(index)])

    def label_texts(self, split: str) -> list[str]:
        """:meth:`label_text` of every example of ``split``, computed in one pass."""
        if self.is_classifier:
            y = self._targets(split, torch.arange(self.n(split)))
            if y is not None and y.dim() == 1 and not y.is_floating_point():
                names = {}
                out = []
                for value in y.tolist():
                    if value not in names:
                        names[value] = self.class_name(value)
                    out.append(names[value])
                return out
        return [self.label_text(split, i) for i in range(self.n(split))]

    def inputs(self, split: str, indices: Sequence[int]) -> np.ndarray:
        """The model inputs of examples ``indices`` of ``split`` (first element, or the input key of dict
        examples, e.g. the token ids), flattened to rows."""
        batch = self.source(split).get(list(indices))
        x = batch_inputs(self.task, batch)
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
            self._predictions[split] = predict(self.model, self.task, self.source(split))
        return self._predictions[split]

    # -- influence ---------------------------------------------------------------------------------------------
    def influence_data(self, split: str) -> DataLike:
        """``split`` in the form the influence object of :meth:`fit_influence` takes (:meth:`encoded`)."""
        return self.encoded(split)

    def fit_influence(self, curvature: Any = None, damping: Any = None, progress: bool = True) -> Any:
        """A fitted :class:`~datatrace.InfluenceFunction` on ``encoded("train")`` (see :func:`fit_influence`).

        ``curvature`` and ``damping`` default to the spec's. For an estimator this is the influence function of
        its exact PyTorch equivalent, so every command handles both kinds of spec the same way.
        """
        return fit_influence(
            self.model,
            self.task,
            self.encoded("train"),
            self.curvature if curvature is None else curvature,
            self.damping if damping is None else damping,
            progress=progress,
        )

    def retrain_fn(self) -> Callable[..., Any] | None:
        """``train_fn`` taking subsets of ``encoded("train")`` (an estimator's labels are decoded back to its
        ``classes_`` before the spec's ``train_fn`` sees them); None when the spec has no ``train_fn``."""
        if self.train_fn is None:
            return None
        if self.estimator is None:
            return self.train_fn
        return DecodedTrainFn(self.train_fn, np.asarray(self.estimator.classes_))

    def loss_metric(self, split: str = "validation") -> Callable[[Any], float]:
        """``metric(model) -> float``: the mean loss on ``split`` (in :attr:`units`) of a model returned by
        ``train_fn`` (an ``nn.Module`` or a fitted estimator)."""
        return MeanLoss(self, split)


def curvature_arguments(curvature: Any, damping: Any) -> tuple[Any, Any]:
    """``(curvature, damping)`` for InfluenceFunction: ``"auto"`` becomes an AutoCurvature when the registry
    does not know that name; a bad name or damping raises the registry's ValueError."""
    if isinstance(curvature, Curvature):
        return curvature, "auto"
    if curvature == "auto" and "auto" not in available():
        return AutoCurvature(damping=damping), "auto"
    make_curvature(curvature, damping)  # validates the name and the damping
    return curvature, damping


def fit_influence(
    model: nn.Module, task: Task, train: DataLike, curvature: Any, damping: Any, progress: bool = True
) -> InfluenceFunction:
    """``InfluenceFunction(model, task, curvature, damping).fit(train)``, with ``curvature`` resolved by
    :func:`curvature_arguments`: the one way every command (and the demo) fits its influence function."""
    route, damp = curvature_arguments(curvature, damping)
    return InfluenceFunction(model, task, curvature=route, damping=damp, progress=progress).fit(train)


def take(data: Any, indices: Sequence[int]) -> Any:
    """Examples ``indices`` of ``data`` in the same form (tuple of arrays/tensors, or a ``Subset``)."""
    idx = [int(i) for i in indices]
    if isinstance(data, (tuple, list)):
        out = []
        for a in data:
            if isinstance(a, torch.Tensor):
                out.append(a[torch.as_tensor(idx, dtype=torch.long)])
            else:
                out.append(np.asarray(a)[idx])
        return tuple(out)
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Dataset):
        return Subset(data, idx)
    raise TypeError(f"cannot take examples from {type(data).__name__}")  # pragma: no cover - checked by spec
