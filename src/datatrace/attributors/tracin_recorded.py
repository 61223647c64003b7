"""TracIn from a recorded run: training gradients collected during training, no second pass over the data.

TracIn (Pruthi et al. 2020) follows the run's own steps: step ``t`` moved the parameters by
``-eta_t (1/|B_t|) sum_{j in B_t} grad l(z_j, theta_t)`` (plain SGD), so dropping example ``i`` from it changes a
query measurement, to first order and without propagating the change through later steps, by
``+(eta_t / |B_t|) grad f_q(theta_t) . grad l(z_i, theta_t)``. Summed over the steps that used ``i``:

    score[q, i] = sum_{t: i in B_t} (eta_t / |B_t|) (P^T grad f_q(theta_{c(t)})) . phi_{t,i}

with ``phi_{t,i} = P^T grad l(z_i, theta_t)`` recorded during training (:mod:`datatrace.run.step_gradients`) and
the query's gradient taken at the last saved state ``c(t) <= t`` (the only parameters kept). Positive for a
proponent, in the measurement's units: datatrace's convention (:data:`datatrace.scores.MEANING`).

Compared with :class:`datatrace.TracIn` (TracInCP: every training example's gradient at every checkpoint, a pass
over the data per checkpoint), the training gradients here are the ones of the steps that actually used each
example, at the parameters of that step, and cost one per-example gradient pass of each minibatch during
training. Adam's preconditioning and momentum are ignored, as in the original method; the exact treatment of the
same run is :class:`~datatrace.attributors.metagradient.Metagradient`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from datatrace.attributors.base import Attributor, Measurement
from datatrace.data import DataLike, as_data_source
from datatrace.errors import bad_value
from datatrace.gradients.functional import FunctionalModel
from datatrace.projection.random import RandomProjector
from datatrace.run.recording import Recording
from datatrace.run.replay import Replay
from datatrace.scores import Scores
from datatrace.tasks import Task

__all__ = ["RecordedTracIn"]


class RecordedTracIn(Attributor):
    """TracIn over the steps of a run recorded with ``Recorder(..., task=task, gradient_dim=k)``.

    Args:
        model: a model of the recorded architecture.
        task: the task of the run (its measurement defines the queries' ``f``).
        recording: a :class:`~datatrace.run.recording.Recording` (with gradients) or its folder.
    """

    fitted_attribute = "replay_"
    route = "TracIn over the recorded steps (projected gradients collected during training)"
    supports_measurement = True

    def __init__(self, model: nn.Module, task: Task, recording: Recording | str) -> None:
        if not isinstance(task, Task):
            raise bad_value("task", task, "a datatrace.Task", "pass e.g. datatrace.ClassificationTask()")
        self.model, self.task = model, task
        self.recording = recording if isinstance(recording, Recording) else Recording(recording)
        if not self.recording.has_gradients:
            raise bad_value(
                "recording",
                str(self.recording.folder),
                "a run recorded with per-step gradients",
                "record it with Recorder(..., task=task, gradient_dim=k) (or fit_minibatch(..., gradient_dim=k))",
            )

    def fit(self, train: DataLike) -> RecordedTracIn:
        """Check the training data against the recording and read the recorded rows (``sum |B_t|`` x ``k``)."""
        self.replay_ = Replay(self.model, self.task, self.recording, train)
        self.n_train_ = self.recording.n_train
        info = self.recording.manifest["gradients"]["projection"]
        self.param_names_ = list(info["params"])
        rows, indices, steps = zip(*self.recording.gradient_files())
        self.rows_ = torch.cat(rows)
        self.indices_ = torch.cat(indices)
        self.steps_ = torch.cat(steps)
        lr = torch.tensor([s.hyper[0]["lr"] for s in self.recording.steps], dtype=torch.float64)
        if any(len({h["lr"] for h in s.hyper}) > 1 for s in self.recording.steps):
            raise bad_value(
                "recording",
                str(self.recording.folder),
                "one learning rate per step (TracIn weighs a step by its rate)",
                "use Metagradient, which follows every parameter group",
            )
        sizes = torch.tensor([len(s.indices) for s in self.recording.steps], dtype=torch.float64)
        self.weights_ = (lr / sizes)[self.steps_]
        saved = torch.tensor(self.recording.checkpoint_steps)
        self.anchor_ = saved[torch.searchsorted(saved, self.steps_, right=True) - 1]
        self.projector_ = RandomProjector(
            dim=int(info["dim"]), kind=info.get("kind", "gaussian"), random_state=int(info["random_state"])
        )
        return self

    def _query_rows(self, query: DataLike, t: int, measurement: Measurement | None) -> torch.Tensor:
        model = self.replay_.model_at(self.replay_.saved(t))
        fmodel = FunctionalModel(model, self.task, params=self.param_names_)
        projector = self.projector_.fit(fmodel, n_points=self.n_train)
        source = as_data_source(query, "query")
        grads = torch.cat(
            [fmodel.per_example_measurement_grads(batch, measurement) for _, batch in source.batches()]
        )
        return projector.project(grads).to(torch.float64)

    def score(self, query: DataLike, measurement: Measurement | None = None) -> Scores:
        """``values[q, i]``: the recorded steps' first-order effects of example ``i`` on query ``q``."""
        self.check_is_fitted()
        self.check_measurement(measurement)
        n_query = len(as_data_source(query, "query"))
        values = torch.zeros(n_query, self.n_train, dtype=torch.float64)
        for anchor in torch.unique(self.anchor_).tolist():
            mask = self.anchor_ == anchor
            q = self._query_rows(query, int(anchor), measurement)
            contributions = (q @ self.rows_[mask].to(torch.float64).T) * self.weights_[mask]
            values.index_add_(1, self.indices_[mask], contributions)
        return Scores(values, self.describe_measurement(measurement), self.metadata())

    def self_influence(self) -> torch.Tensor:
        """``sum_t (eta_t / |B_t|) ||phi_{t,i}||^2``: each example's recorded steps on its own loss."""
        self.check_is_fitted()
        own = self.weights_ * (self.rows_.to(torch.float64) ** 2).sum(1)
        return torch.zeros(self.n_train, dtype=torch.float64).index_add_(0, self.indices_, own)

    def metadata(self) -> dict[str, Any]:
        return self.scores_metadata(
            None,
            recording=str(self.recording.folder),
            projection_dim=int(self.rows_.shape[1]),
            recorded_rows=int(self.rows_.shape[0]),
            query_gradients_at="the last saved state before each step",
        )
