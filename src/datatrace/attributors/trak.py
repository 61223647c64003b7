"""TRAK-style ensembles (Park et al. 2023): projected influence averaged over independently trained models.

A single network's linearisation around ``theta_hat`` is noisy: which training examples look influential depends
on the seed and the end point of training. TRAK averages projected attributions over models trained with
different seeds (or on different subsets), which removes much of that noise. Here every model gets its own
:class:`~datatrace.attributors.projected.ProjectedInfluence` with the same settings (and its own feature store,
``store_dir/model-<j>``), and the ensemble's score is the mean of the members' scores

    score[q, i] = (1/M) sum_j score_j[q, i]  ~  f_q(theta_{-i}) - f_q(theta_hat),

in the same units and with the same sign (:data:`datatrace.scores.MEANING`).

Reference: Park, Georgiev, Ilyas, Leclerc and Madry (2023), "TRAK: Attributing Model Behavior at Scale", ICML.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datatrace.attributors.base import Attributor, Measurement
from datatrace.attributors.projected import ProjectedInfluence
from datatrace.data import DataLike
from datatrace.errors import bad_value, check_folder, check_positive_int
from datatrace.projection import Projector
from datatrace.projection.scoring import StreamingTopK
from datatrace.scores import Scores, TopK
from datatrace.tasks import Task

__all__ = ["TRAK"]


class TRAK(Attributor):
    """An ensemble of :class:`ProjectedInfluence` over independently trained models: scores are averaged.

    Args:
        models: the independently trained models (same architecture, same task).
        task: the task; every other keyword argument is passed to each :class:`ProjectedInfluence`.
        projector, store_dir: as for :class:`ProjectedInfluence` (each member stores in ``store_dir/model-<j>``).
    """

    fitted_attribute = "n_train_"
    route = "TRAK ensemble of projected influence"

    def __init__(
        self,
        models: list[nn.Module],
        task: Task,
        projector: Projector | str = "auto",
        store_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        if (
            not isinstance(models, (list, tuple))
            or not models
            or not all(isinstance(m, nn.Module) for m in models)
        ):
            raise bad_value(
                "models", models, "expected a non-empty list of nn.Module", "pass [model_1, model_2, ...]"
            )
        self.models = list(models)
        self.task = task
        self.projector = projector
        self.store_dir = check_folder("store_dir", store_dir)
        self.kwargs = kwargs
        self.members = [
            ProjectedInfluence(
                m,
                task,
                projector=projector,
                store_dir=None if store_dir is None else Path(store_dir) / f"model-{j}",
                **kwargs,
            )
            for j, m in enumerate(self.models)
        ]

    def fit(self, train: DataLike) -> TRAK:
        for member in self.members:
            member.fit(train)
        self.n_train_ = self.members[0].n_train_
        return self

    def score(self, query: DataLike, measurement: Measurement | None = None) -> Scores:
        """The mean over models of the projected influence scores, ``(n_query, n_train)``."""
        self.check_is_fitted()
        self.check_measurement(measurement)
        total = None
        for member in self.members:
            values = member.score(query).values
            total = values if total is None else total + values
        return Scores(total / len(self.members), self.task.describe_measurement(), self.metadata())

    def metadata(self) -> dict[str, Any]:
        """``Scores.metadata``: the ensemble size and every member's own metadata."""
        return self.scores_metadata(n_models=len(self.members), members=[m.metadata() for m in self.members])

    def _mean_blocks(self, query: DataLike, query_block: int) -> Iterator[torch.Tensor]:
        """The averaged scores of ``query_block`` queries at a time (query features computed once per member)."""
        feats = [m.query_features(query) for m in self.members]
        for s in range(0, feats[0].shape[0], query_block):
            yield sum(
                m.score_features(f[s : s + query_block]).values for f, m in zip(feats, self.members)
            ) / len(self.members)

    def top_k(
        self, query: DataLike, k: int, measurement: Measurement | None = None, query_block: int = 256
    ) -> TopK:
        """Per query, the ``k`` training examples with the largest ``|score|`` of the averaged scores (as
        :meth:`datatrace.Scores.top_k`), computed for ``query_block`` queries at a time."""
        self.check_is_fitted()
        self.check_measurement(measurement)
        k = min(check_positive_int("k", k), self.n_train_)
        indices, values = [], []
        for block in self._mean_blocks(query, query_block):
            _, i = torch.topk(block.abs(), k, dim=1)
            indices.append(i)
            values.append(torch.gather(block, 1, i))
        return TopK(torch.cat(indices), torch.cat(values))

    def proponents_opponents(self, query: DataLike, k: int, query_block: int = 256) -> StreamingTopK:
        """Proponents and opponents of the averaged scores, computed for ``query_block`` queries at a time."""
        self.check_is_fitted()
        k = min(check_positive_int("k", k), self.n_train_)
        pos_i, pos_v, neg_i, neg_v = [], [], [], []
        for block in self._mean_blocks(query, query_block):
            v, i = torch.topk(block, k, dim=1)
            pos_v.append(v)
            pos_i.append(i)
            v, i = torch.topk(-block, k, dim=1)
            neg_v.append(-v)
            neg_i.append(i)
        return StreamingTopK(
            TopK(torch.cat(pos_i), torch.cat(pos_v)), TopK(torch.cat(neg_i), torch.cat(neg_v))
        )

    def self_influence(self) -> torch.Tensor:
        """The mean over models of the members' self-influence, shape ``(n_train,)``."""
        self.check_is_fitted()
        return torch.stack([m.self_influence() for m in self.members]).mean(dim=0)
