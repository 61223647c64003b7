"""Candidate filtering: exact scores for a shortlist of training examples per query, and how much it misses.

Scoring every training example against every query costs ``n_query x n_train`` products with the training
features (for a language model's pre-training set, ``n_train`` is the expensive part). A cheap similarity between
queries and training examples, ``sim[q, i]`` (TF-IDF cosine of the texts, :func:`tfidf_similarity`; cosine of
embeddings a sentence encoder or the model gave, :func:`embedding_similarity`; or any ``(n_query, n_train)``
array), picks for each query the ``m`` most similar training examples ``C_q`` (:func:`select_candidates`), and
only those are scored, exactly:

    values[q, j] = score[q, C_q[j]] ~ f_q(theta_{-C_q[j]}) - f_q(theta_hat)

the same number the attributor's ``score(query)`` gives at that column (sign and units of
:data:`datatrace.scores.MEANING`): the curvature stays the one fitted on the *whole* training set. (Fitting an
attributor on the candidates alone would be wrong: its curvature, and its ``1/n``, would be those of another
training set.) Grosse et al. 2023 filter an LLM's pre-training data this way, by TF-IDF, before
computing influence.

Training examples outside ``C_q`` are *not scored*: :class:`ShortlistScores` keeps the candidates and their scores
only, and :meth:`ShortlistScores.to_dense` fills the rest with NaN, never with 0 (a 0 would claim "no influence").
What the shortcut misses is measured by :func:`shortlist_recall` against the full scores of a few queries: the
share of the true top-``k`` proponents (largest positive scores), opponents (most negative) and largest ``|score|``
that the shortlist's own top-``k`` recovers. Since the candidates' scores are exact, a true top-``k`` example is
recovered exactly when it is a candidate.

**What it saves.** The query side (each query's gradient and curvature solve) is the same as for full scoring; the
training side (reading training rows and multiplying by them) shrinks from ``n`` rows to the union ``U`` of all
queries' candidates. So it pays when ``|U|`` is far below ``n``: a large training set, few queries per call, or
queries with overlapping candidates. Gathering scattered rows costs a few times more per row than streaming all of
them, so when the union exceeds :data:`~datatrace.attributors.projected.ALL_ROWS_FRACTION` of the training set
every row is scored and the candidates' columns kept, which costs what full scoring costs. ``docs/examples/shortlist_docstrings.py`` measures
recall and time on a small real text problem.

Which attributors score only the candidates (:func:`score_shortlist`):

* every attributor with a ``score_candidates(query, candidates, measurement)`` method, such as
  :class:`~datatrace.ProjectedInfluence`, whose :meth:`~datatrace.ProjectedInfluence.score_candidates` reads only
  the candidates' feature rows (from a store: the chunks that hold them, memory-mapped) and multiplies by them;
* :class:`~datatrace.InfluenceFunction` (and :class:`~datatrace.SklearnInfluence`): its
  :meth:`~datatrace.InfluenceFunction.score_candidates` multiplies by the candidates' kept gradient rows, or, when
  its gradients are streamed, recomputes only the candidates' gradients (under torch.distributed the rows come in
  one all-reduce);
* any other attributor (e.g. :class:`~datatrace.TRAK`, :class:`~datatrace.TracIn`): its full ``score(query)``, of
  which the candidates' columns are kept (no time saved; the result says so in ``metadata["shortlist_route"]``).

Example:
    >>> import torch, datatrace
    >>> from datatrace.apps.shortlist import score_shortlist, shortlist_recall
    >>> X, y = torch.randn(40, 3, dtype=torch.float64), torch.arange(40) % 2
    >>> model = torch.nn.Linear(3, 2).double()
    >>> task = datatrace.ClassificationTask(weight_decay=0.1)
    >>> model = datatrace.training.fit_full_batch(model, task, (X, y))
    >>> inf = datatrace.InfluenceFunction(model, task, progress=False).fit((X, y))
    >>> short = score_shortlist(inf, (X[:2], y[:2]), similarity=X[:2] @ X.T, m=10)
    >>> short.candidates.shape, short.values.shape
    (torch.Size([2, 10]), torch.Size([2, 10]))
    >>> full = inf.score((X[:2], y[:2]))
    >>> bool(torch.allclose(short.values, full.values.gather(1, short.candidates)))
    True
    >>> 0.0 <= shortlist_recall(short, full, k=3).proponents <= 1.0
    True
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity

from datatrace.apps.common import check_attributor, prepare_query
from datatrace.attributors.base import Attributor, Measurement, check_candidates
from datatrace.data import DataLike, as_data_source
from datatrace.errors import bad_value, check_positive_int, describe
from datatrace.scores import MEANING, Scores, TopK

logger = logging.getLogger(__name__)

__all__ = [
    "ShortlistRecall",
    "ShortlistScores",
    "embedding_similarity",
    "score_shortlist",
    "select_candidates",
    "shortlist_recall",
    "tfidf_similarity",
]

#: relative tolerance (of the largest |full score| of the query) within which :func:`shortlist_recall` accepts that
#: the shortlist's scores are the full scores at the candidates (float32 routes differ in the last bits)
VALUE_RTOL = 1e-3


# -- similarities --------------------------------------------------------------------------------------------------
def _texts(name: str, texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)) or not hasattr(texts, "__len__") or not hasattr(texts, "__iter__"):
        raise bad_value(name, texts, "expected a sequence of strings, one per example", "pass a list of str")
    out = list(texts)
    if not out:
        raise bad_value(name, texts, "expected at least one text", "pass one string per example")
    for j, t in enumerate(out):
        if not isinstance(t, str):
            raise bad_value(
                f"{name}[{j}]", t, "expected a str (every example's text)", "pass the texts as strings"
            )
    return out


def tfidf_similarity(query_texts: Any, train_texts: Any, **vectorizer_options: Any) -> np.ndarray:
    """``sim[q, i]``: cosine similarity of the TF-IDF vectors of query text ``q`` and training text ``i``,
    ``(n_query, n_train)`` float64 in ``[0, 1]``.

    The vocabulary and the inverse document frequencies ``idf(t) = ln((1 + n) / (1 + df(t))) + 1`` come from the
    training texts only (scikit-learn's :class:`~sklearn.feature_extraction.text.TfidfVectorizer` with its
    defaults, overridden by ``vectorizer_options``, e.g. ``sublinear_tf=True`` or ``stop_words="english"``), so
    the similarity does not depend on which queries are asked. A text with no word of the vocabulary has
    similarity 0 with everything.
    """
    queries = _texts("query_texts", query_texts)
    train = _texts("train_texts", train_texts)
    try:
        vectorizer = TfidfVectorizer(**vectorizer_options)
    except TypeError as err:
        raise bad_value(
            "vectorizer_options",
            vectorizer_options,
            f"options of sklearn's TfidfVectorizer ({err})",
            "pass only TfidfVectorizer keyword arguments, e.g. sublinear_tf=True",
        ) from None
    try:
        train_vectors = vectorizer.fit_transform(train)
    except ValueError as err:  # e.g. an empty vocabulary
        raise bad_value(
            "train_texts",
            train_texts,
            f"texts from which TfidfVectorizer can build a vocabulary ({err})",
            "pass non-empty texts, or relax vectorizer_options (e.g. stop_words=None, min_df=1)",
        ) from None
    return np.asarray(cosine_similarity(vectorizer.transform(queries), train_vectors), dtype=np.float64)


def _matrix(name: str, value: Any) -> torch.Tensor:
    try:
        arr = torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError, RuntimeError):
        raise bad_value(
            name, value, "expected a 2-D array of numbers", "pass a numpy array or tensor"
        ) from None
    if arr.dim() != 2 or 0 in arr.shape:
        raise bad_value(
            name, value, f"expected a non-empty 2-D array, got shape {tuple(arr.shape)}", "reshape it"
        )
    if not bool(torch.isfinite(arr).all()):
        raise bad_value(name, value, "expected finite numbers (no NaN or inf)", "clean or impute the values")
    return arr


def embedding_similarity(query_embeddings: Any, train_embeddings: Any) -> np.ndarray:
    """``sim[q, i] = e_q . e_i / (||e_q|| ||e_i||)``: cosine similarity of embeddings (a sentence encoder's
    outputs, the model's own last hidden states, any features), ``(n_query, n_train)`` float64 in ``[-1, 1]``.
    Both arguments are ``(rows, d)`` arrays or tensors with the same ``d``; a zero row has similarity 0."""
    query = _matrix("query_embeddings", query_embeddings)
    train = _matrix("train_embeddings", train_embeddings)
    if query.shape[1] != train.shape[1]:
        raise bad_value(
            "train_embeddings",
            train_embeddings,
            f"rows of the same width as query_embeddings ({query.shape[1]}), got {train.shape[1]}",
            "embed queries and training examples with the same encoder",
        )
    unit_q = query / query.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    unit_t = train / train.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return (unit_q @ unit_t.T).clamp(-1.0, 1.0).numpy()


def _shortlist_size(m: Any, n_train: int) -> int:
    """``m`` as a number of candidates: an int in ``[1, n_train]``, or a fraction in ``(0, 1]`` of ``n_train``
    (rounded up)."""
    if isinstance(m, (bool, np.bool_)):
        pass
    elif isinstance(m, (int, np.integer)) and 1 <= int(m) <= n_train:
        return int(m)
    elif isinstance(m, (float, np.floating)) and 0.0 < float(m) <= 1.0:
        return max(1, math.ceil(float(m) * n_train))
    raise bad_value(
        "m",
        m,
        f"expected the number of candidates per query, an int from 1 to n_train={n_train}, or a fraction of the "
        "training set, a float in (0, 1]",
        "pass e.g. m=0.1 (10% of the training set) or m=500",
    )


def select_candidates(similarity: Any, m: int | float) -> torch.Tensor:
    """Per query, the ``m`` training examples of largest ``similarity[q, i]``, most similar first:
    ``(n_query, m)`` long tensor (ties: the smaller index first).

    Args:
        similarity: ``(n_query, n_train)`` finite numbers (:func:`tfidf_similarity`, :func:`embedding_similarity`,
            or your own; larger means more similar).
        m: candidates per query: an int from 1 to ``n_train``, or a float in ``(0, 1]``, a fraction of the
            training set (rounded up).
    """
    sim = _matrix("similarity", similarity)
    size = _shortlist_size(m, sim.shape[1])
    order = torch.from_numpy(np.argsort(-sim.numpy(), axis=1, kind="stable")[:, :size].copy())
    return order.long()


# -- the result ----------------------------------------------------------------------------------------------------
@dataclass
class ShortlistScores:
    """Exact scores of a shortlist of training examples per query; the other examples are not scored.

    Attributes:
        candidates: ``(n_query, m)`` long, the training indices scored for each query (most similar first when
            chosen by :func:`select_candidates`).
        values: ``(n_query, m)`` float, ``values[q, j] = score[q, candidates[q, j]] ~ f_q(theta_{-i}) -
            f_q(theta_hat)`` with ``i = candidates[q, j]``, as the attributor's full ``score`` would give it.
        n_train: the size of the training set the attributor was fitted on.
        measurement: words for what the query measures.
        metadata: the attributor's ``Scores.metadata`` with ``shortlist_route`` (how the candidates were scored),
            ``shortlist_m``, ``shortlist_union`` (distinct training examples among all queries' candidates) and
            ``shortlist_seconds``.
        meaning: the sign convention in words.
    """

    candidates: torch.Tensor
    values: torch.Tensor
    n_train: int
    measurement: str
    metadata: dict[str, Any] = field(default_factory=dict)
    meaning: str = field(default=MEANING, repr=False)

    @property
    def n_query(self) -> int:
        return int(self.candidates.shape[0])

    @property
    def m(self) -> int:
        """Candidates per query."""
        return int(self.candidates.shape[1])

    def to_dense(self) -> Scores:
        """A :class:`~datatrace.Scores` ``(n_query, n_train)`` holding the candidates' scores and NaN for every
        training example that was not scored (NaN, not 0: nothing is known about them)."""
        dense = torch.full((self.n_query, self.n_train), math.nan, dtype=self.values.dtype)
        dense.scatter_(1, self.candidates, self.values)
        return Scores(dense, self.measurement, dict(self.metadata, shortlist_missing="nan"))

    def _row(self, q: int) -> int:
        if (
            isinstance(q, bool)
            or not isinstance(q, (int, np.integer))
            or not -self.n_query <= q < self.n_query
        ):
            raise IndexError(
                f"q={q!r} is out of range for {self.n_query} queries: allowed is an int with -{self.n_query} <= q < "
                f"{self.n_query}. Fix: pass the row number of the query."
            )
        return int(q) % self.n_query

    def _pick(self, q: int, k: int, sign: float) -> TopK:
        q = self._row(q)
        k = min(check_positive_int("k", k), self.m)
        values, pos = torch.topk(sign * self.values[q], k)
        keep = values > 0
        return TopK(self.candidates[q][pos[keep]], sign * values[keep])

    def proponents(self, q: int, k: int = 10) -> TopK:
        """The ``k`` candidates of query ``q`` with the largest positive scores (largest first): the query's top
        proponents as far as the shortlist knows (:func:`shortlist_recall` says how often they are the true
        ones)."""
        return self._pick(q, k, 1.0)

    def opponents(self, q: int, k: int = 10) -> TopK:
        """The ``k`` candidates of query ``q`` with the most negative scores (most negative first)."""
        return self._pick(q, k, -1.0)

    def top_k(self, k: int) -> TopK:
        """Per query, the ``k`` candidates with the largest ``|score|``, shape ``(n_query, min(k, m))``."""
        k = min(check_positive_int("k", k), self.m)
        _, pos = torch.topk(self.values.abs(), k, dim=1)
        return TopK(torch.gather(self.candidates, 1, pos), torch.gather(self.values, 1, pos))


def score_shortlist(
    influence: Attributor,
    query: DataLike,
    candidates: Any = None,
    *,
    similarity: Any = None,
    m: int | float | None = None,
    measurement: Measurement | None = None,
) -> ShortlistScores:
    """Exact scores of each query's candidate training examples, with the curvature of the whole training set.

    Either pass ``candidates`` (``(n_query, m)`` training indices, a row per query without repeats), or
    ``similarity`` (``(n_query, n_train)``, e.g. :func:`tfidf_similarity`) and ``m`` (an int, or a fraction of the
    training set), from which :func:`select_candidates` chooses them.

    Args:
        influence: a fitted attributor (module docstring: which ones score only the candidates).
        query: the query data, as for ``influence.score``.
        measurement: optional ``(model, batch) -> (batch_size,)`` for attributors that accept one.

    Returns:
        :class:`ShortlistScores`: ``values[q, j] = score[q, candidates[q, j]]``.
    """
    check_attributor(influence, "expected a fitted datatrace attributor", fitted=True)
    n_train = influence.n_train
    n_query = len(as_data_source(prepare_query(influence, query, "query"), "query"))
    if candidates is None:
        if similarity is None or m is None:
            raise bad_value(
                "candidates",
                None,
                "pass either candidates=(n_query, m) training indices, or similarity=(n_query, n_train) with m",
                "e.g. similarity=tfidf_similarity(query_texts, train_texts), m=0.1",
            )
        sim = _matrix("similarity", similarity)
        if tuple(sim.shape) != (n_query, n_train):
            raise bad_value(
                "similarity",
                similarity,
                f"shape (n_query, n_train) = ({n_query}, {n_train}), one row per query and one column per training "
                f"example, got {tuple(sim.shape)}",
                "compute it between these queries and the training data the attributor was fitted on",
            )
        cand = select_candidates(sim, m)
    else:
        if similarity is not None or m is not None:
            raise bad_value(
                "candidates",
                describe(candidates),
                "candidates cannot be combined with similarity or m (they would choose other candidates)",
                "pass candidates alone, or similarity and m alone",
            )
        cand = check_candidates("candidates", candidates, n_query, n_train)
    start = time.perf_counter()
    values, route = _score_candidates(influence, query, cand, measurement)
    seconds = time.perf_counter() - start
    union_size = int(torch.unique(cand).numel())
    meta = influence.metadata()
    meta.update(
        shortlist_route=route,
        shortlist_m=int(cand.shape[1]),
        shortlist_union=union_size,
        shortlist_seconds=seconds,
    )
    logger.info(
        "scored %d candidate(s) per query for %d queries (%d distinct training examples of %d) in %.3g s by %s",
        cand.shape[1],
        n_query,
        union_size,
        n_train,
        seconds,
        route,
    )
    return ShortlistScores(
        candidates=cand,
        values=values.detach().cpu(),
        n_train=n_train,
        measurement=influence.describe_measurement(measurement),
        metadata=meta,
    )


def _score_candidates(
    influence: Attributor, query: DataLike, cand: torch.Tensor, measurement: Measurement | None
) -> tuple[torch.Tensor, str]:
    """The candidates' scores and, in words, how they were computed."""
    own = getattr(influence, "score_candidates", None)
    if callable(own):
        return own(query, cand, measurement), f"{influence.name}.score_candidates"
    logger.info(
        "%s has no way to score only some training examples: its full score is computed and the candidates' "
        "columns kept (no time saved)",
        influence.name,
    )
    full = influence.score(query, measurement).values
    return torch.gather(full, 1, cand.to(full.device)), "full score, candidate columns kept"


# -- what the shortcut misses -----------------------------------------------------------------------------------
@dataclass
class ShortlistRecall:
    """How much of the true top-``k`` the shortlist's own top-``k`` recovers, per query and on average.

    ``per_query_*[q] = |top_k(shortlist, q) & top_k(full, q)| / |top_k(full, q)|`` for the proponents (largest
    positive scores), the opponents (most negative) and the largest ``|score|`` (``magnitude``); NaN for a query
    with no positive (negative) full score, left out of the mean. ``k`` is the size asked for.
    """

    k: int
    proponents: float
    opponents: float
    magnitude: float
    per_query_proponents: np.ndarray
    per_query_opponents: np.ndarray
    per_query_magnitude: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """The averages and ``k``, JSON-ready (NaN as None)."""

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "k": self.k,
            "proponents": clean(self.proponents),
            "opponents": clean(self.opponents),
            "magnitude": clean(self.magnitude),
        }


def _overlap(found: list[set[int]], truth: list[set[int]]) -> np.ndarray:
    return np.array([len(f & t) / len(t) if t else math.nan for f, t in zip(found, truth)], dtype=np.float64)


def _mean(values: np.ndarray) -> float:
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def shortlist_recall(shortlist: ShortlistScores, full: Scores | Any, k: int = 10) -> ShortlistRecall:
    """The recall of the true top-``k`` by the shortlist's top-``k``, for proponents, opponents and ``|score|``.

    Args:
        shortlist: the result of :func:`score_shortlist` for some queries.
        full: the full scores of the same attributor and queries, ``influence.score(query)`` (a
            :class:`~datatrace.Scores` or an ``(n_query, n_train)`` array).
        k: the size of the top lists compared.

    The full scores must agree with the shortlist's at the candidates (within :data:`VALUE_RTOL` of the query's
    largest ``|score|``): otherwise the two come from different attributors or queries and the recall would not
    measure the shortlist. Ties at the ``k``-th place may count as a miss.
    """
    if not isinstance(shortlist, ShortlistScores):
        raise bad_value(
            "shortlist", shortlist, "expected a ShortlistScores", "pass the result of score_shortlist(...)"
        )
    check_positive_int("k", k)
    values = full.values if isinstance(full, Scores) else full
    dense = _matrix("full", values.detach().cpu() if isinstance(values, torch.Tensor) else values)
    want = (shortlist.n_query, shortlist.n_train)
    if tuple(dense.shape) != want:
        raise bad_value(
            "full",
            describe(values),
            f"the full scores of the shortlist's queries, shape (n_query, n_train) = {want}, got "
            f"{tuple(dense.shape)}",
            "pass influence.score(query) for the same queries and training data",
        )
    at_candidates = dense.gather(1, shortlist.candidates)
    scale = dense.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    error = ((at_candidates - shortlist.values.to(torch.float64)).abs() / scale).amax()
    if float(error) > VALUE_RTOL:
        raise bad_value(
            "full",
            describe(values),
            f"the full scores of the same attributor and queries; at the candidates they differ from the "
            f"shortlist's by up to {float(error):.3g} of the largest |score| (allowed: {VALUE_RTOL:g})",
            "score the same queries with the same fitted attributor, e.g. full = influence.score(query)",
        )
    full_scores = Scores(dense)
    kk = min(k, shortlist.n_train)
    sets = {
        "proponents": (
            [set(shortlist.proponents(q, kk).indices.tolist()) for q in range(shortlist.n_query)],
            [set(full_scores.proponents(q, kk).indices.tolist()) for q in range(shortlist.n_query)],
        ),
        "opponents": (
            [set(shortlist.opponents(q, kk).indices.tolist()) for q in range(shortlist.n_query)],
            [set(full_scores.opponents(q, kk).indices.tolist()) for q in range(shortlist.n_query)],
        ),
        "magnitude": (
            [set(row) for row in shortlist.top_k(kk).indices.tolist()],
            [set(row) for row in full_scores.top_k(kk).indices.tolist()],
        ),
    }
    per = {name: _overlap(found, truth) for name, (found, truth) in sets.items()}
    return ShortlistRecall(
        k=k,
        proponents=_mean(per["proponents"]),
        opponents=_mean(per["opponents"]),
        magnitude=_mean(per["magnitude"]),
        per_query_proponents=per["proponents"],
        per_query_opponents=per["opponents"],
        per_query_magnitude=per["magnitude"],
    )
