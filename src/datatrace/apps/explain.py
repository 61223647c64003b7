"""Explain predictions: which training examples helped or hurt each query, and by how much.

For every query ``q`` the attributor's score row ``score[q, :]`` estimates, for each training example ``i``,
``f_q(theta_{-i}) - f_q(theta_hat)``: the change of the query's measurement (by default its loss, in the loss's
units) if ``i`` were removed and the model retrained. On a loss:

* **proponents** are the largest *positive* scores: removing them would raise the query's loss, so they helped
  the model get this query right;
* **opponents** are the most *negative* scores: removing them would lower the query's loss, so they pushed the
  model towards its mistake.

Example:
    >>> import torch, datatrace
    >>> from datatrace.apps import explain
    >>> X, y = torch.randn(30, 2, dtype=torch.float64), torch.arange(30) % 2
    >>> model = torch.nn.Linear(2, 2).double()
    >>> task = datatrace.ClassificationTask(weight_decay=0.1)
    >>> from datatrace.verification.training import fit_full_batch
    >>> model = fit_full_batch(model, task, (X, y))
    >>> inf = datatrace.InfluenceFunction(model, task, progress=False).fit((X, y))
    >>> [e.query_index for e in explain(inf, (X[:2], y[:2]), k=3)]
    [0, 1]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from datatrace.apps.common import check_attributor
from datatrace.apps.shortlist import ShortlistScores
from datatrace.attributors.base import Attributor, Measurement
from datatrace.errors import check_indices, check_positive_int
from datatrace.scores import MEANING, Scores, TopK

logger = logging.getLogger(__name__)

__all__ = ["Explanation", "explain"]


@dataclass
class Explanation:
    """The most helpful and most harmful training examples of one query.

    Attributes:
        query_index: the row of the query in the query data (and in the score matrix).
        proponents: the up-to-``k`` training examples with the largest *positive* scores, largest first
            (``indices``, ``values``); removing one would raise the query's measurement by about ``value``.
        opponents: the up-to-``k`` training examples with the most *negative* scores, most negative first;
            removing one would change the measurement by about ``value`` (< 0).
        measurement: words for what the query measures (e.g. ``"the query's loss"``).
        score_row: ``(n_train,)`` float64, the whole row ``score[query_index, :]``.
        meaning: the sign convention in words.
    """

    query_index: int
    proponents: TopK
    opponents: TopK
    measurement: str
    score_row: np.ndarray
    meaning: str = field(default=MEANING, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (without the full score row)."""
        return {
            "query_index": self.query_index,
            "measurement": self.measurement,
            "proponents": [
                {"index": int(i), "score": float(v)}
                for i, v in zip(self.proponents.indices.tolist(), self.proponents.values.tolist())
            ],
            "opponents": [
                {"index": int(i), "score": float(v)}
                for i, v in zip(self.opponents.indices.tolist(), self.opponents.values.tolist())
            ],
            "meaning": self.meaning,
        }


def explain(
    influence: Attributor | Scores,
    query: Any,
    indices: Any = None,
    k: int = 5,
    measurement: Measurement | None = None,
) -> list[Explanation]:
    """The ``k`` strongest proponents and opponents of each query.

    Args:
        influence: any fitted :class:`~datatrace.attributors.base.Attributor` (:class:`~datatrace.InfluenceFunction`,
            :class:`~datatrace.TracIn`, projected influence, ...). A :class:`~datatrace.Scores` already computed
            for the queries is accepted too (then ``query`` is ignored and may be ``None``), and so is a
            :class:`~datatrace.apps.ShortlistScores` (proponents and opponents among each query's candidates;
            ``score_row`` is NaN for the training examples that were not scored).
        query: the query data (same forms as the attributor's ``score``).
        indices: which query rows to explain (default: all), in the order given.
        k: at most this many proponents and opponents per query (fewer when fewer scores have that sign).
        measurement: optional ``(model, batch) -> (batch_size,)`` passed to ``influence.score`` (e.g. a predicted
            probability instead of the loss; routes without ``measurement=`` support raise a ValueError).

    Returns:
        one :class:`Explanation` per requested query.
    """
    check_positive_int("k", k)
    if isinstance(influence, ShortlistScores):
        influence = influence.to_dense()  # NaN for the training examples not on the shortlist: never picked
    if isinstance(influence, Scores):
        scores = influence
    else:
        check_attributor(
            influence,
            "expected a fitted attributor with a score(query) method, a datatrace.Scores or ShortlistScores",
        )
        scores = influence.score(query, measurement)
    rows = (
        torch.arange(scores.n_query)
        if indices is None
        else check_indices("indices", indices, scores.n_query).reshape(-1)
    )
    values = scores.values.detach().to("cpu", torch.float64)
    out = []
    for q in rows.tolist():
        out.append(
            Explanation(
                query_index=int(q),
                proponents=scores.proponents(int(q), k),
                opponents=scores.opponents(int(q), k),
                measurement=scores.measurement,
                score_row=values[q].numpy().copy(),
            )
        )
    logger.debug("explained %d queries with k=%d", len(out), k)
    return out
