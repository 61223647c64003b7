"""Per-example predictions of a spec's model: loss, predicted class and its probability, and retrained models' loss.

Reports and the default query choice need the loss (in the task's units), the predicted class and the model's
probability for it on every example of a data set; :class:`~datatrace.cli.spec_model.Spec` caches one
:class:`Predictions` per data set. :class:`MeanLoss` is the metric of ``debug``'s retraining check: the mean loss
of a model returned by the spec's ``train_fn`` (an ``nn.Module`` or a fitted estimator) on one data set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace.attributors.sklearn import SklearnInfluence
from datatrace.cli.labels import encode_split
from datatrace.data import DataSource, as_data_source, cast_batch
from datatrace.tasks import ClassificationTask, Task

__all__ = ["MeanLoss", "Predictions", "batch_inputs", "batch_targets", "predict"]


def _target_key(task: Task) -> str:
    """Where a dict batch keeps the targets for ``task``: its ``target_key`` (the built-in tasks, Hugging Face's
    ``SequenceClassificationTask``), its ``label_key`` (``CausalLMTask``), else ``"labels"``."""
    for name in ("target_key", "label_key"):
        key = getattr(task, name, None)
        if isinstance(key, str):
            return key
    return "labels"


def batch_targets(task: Task, batch: tuple | Mapping) -> torch.Tensor | None:
    """The targets of a batch: ``batch[1]`` of a tuple ``(x, y, ...)``, the task's target key of a dict (the
    Hugging Face form); None when there are none."""
    if isinstance(batch, Mapping):
        value = batch.get(_target_key(task))
        return value if isinstance(value, torch.Tensor) else None
    return batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None


def batch_inputs(task: Task, batch: tuple | Mapping) -> torch.Tensor:
    """The model inputs of a batch to show in reports: ``batch[0]`` of a tuple; of a dict, the task's
    ``input_key`` (or ``input_ids``, the token ids of a tokenizer's output, or the first tensor that is not the
    targets)."""
    if not isinstance(batch, Mapping):
        return batch[0]
    for key in (getattr(task, "input_key", None), "input_ids"):
        if isinstance(key, str) and isinstance(batch.get(key), torch.Tensor):
            return batch[key]
    target = _target_key(task)
    for key, value in batch.items():
        if key != target and isinstance(value, torch.Tensor):
            return value
    raise ValueError(
        f"a batch with keys {sorted(batch)} holds no model input besides the targets at {target!r}. "
        "Fix: return examples as dicts with the model's inputs (e.g. 'input_ids') and the labels."
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


def predict(model: nn.Module, task: Task, source: DataSource) -> Predictions:
    """Loss, and for a classifier predicted class, its probability and the target, of every example of ``source``."""
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
                targets.append(batch_targets(task, batch).reshape(-1).long())
            else:
                losses.append(task.loss(model, batch).double())
    loss = torch.cat(losses).numpy()
    if not classify:
        return Predictions(loss)
    return Predictions(
        loss, torch.cat(predicted).numpy(), torch.cat(confidence).numpy(), torch.cat(targets).numpy()
    )


class MeanLoss:
    """Picklable ``metric(model)``: mean loss of a retrained model on one of the spec's data sets.

    ``spec`` is a :class:`~datatrace.cli.spec_model.Spec`; ``model`` an ``nn.Module`` (scored with the spec's
    task) or a fitted scikit-learn estimator (scored through its PyTorch equivalent).
    """

    def __init__(self, spec: Any, split: str) -> None:
        self.spec = spec
        self.split = split
        self.__name__ = f"mean {split} loss ({spec.units})"

    def __call__(self, model: Any) -> float:
        spec = self.spec
        if isinstance(model, nn.Module):
            module, task, data = model, spec.task, spec.encoded(self.split)
        else:
            translator = SklearnInfluence(model)
            module, task = translator.module_, translator.task
            data = encode_split(self.split, spec.data[self.split], model)
        return float(predict(module, task, as_data_source(data, self.split)).loss.mean())
