"""Candidate filtering (apps.shortlist): the candidates' scores are the full scores at those columns, whatever the
route; non-candidates are absent (NaN when dense); the recall of the true top-k is counted correctly; bad input is
refused by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from torch import nn

import datatrace
from datatrace.apps.shortlist import (
    ShortlistScores,
    embedding_similarity,
    score_shortlist,
    select_candidates,
    shortlist_recall,
    tfidf_similarity,
)
from datatrace.attributors.base import Attributor
from datatrace.attributors.projected import ProjectedInfluence, rows_product
from datatrace.projection import RandomProjector
from datatrace.projection.store import GradientStore
from datatrace.scores import Scores
from datatrace.verification.training import fit_full_batch


@pytest.fixture(scope="module")
def problem():
    """Multinomial logistic regression (float64) near its minimum: 60 training examples, 5 features, 3 classes."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(66, 5, generator=g, dtype=torch.float64)
    y = (X[:, :3] + 0.8 * torch.randn(66, 3, generator=g, dtype=torch.float64)).argmax(1)
    task = datatrace.ClassificationTask(weight_decay=1e-2)
    torch.manual_seed(0)
    model = fit_full_batch(nn.Linear(5, 3).double(), task, (X[:60], y[:60]), max_iter=300)
    return model, task, (X[:60], y[:60]), (X[60:], y[60:])


def _similar(train, query):
    return embedding_similarity(query[0], train[0])


@pytest.mark.parametrize("m", [2, 0.25])
def test_influence_function_candidates_equal_full_scores(problem, m):
    model, task, train, query = problem
    inf = datatrace.InfluenceFunction(model, task, progress=False).fit(train)
    short = score_shortlist(inf, query, similarity=_similar(train, query), m=m)
    full = inf.score(query).values
    size = 2 if m == 2 else 15
    assert short.candidates.shape == (6, size) and short.m == size
    expected = full.gather(1, short.candidates)
    assert float((short.values - expected).abs().max()) <= 1e-12 * float(full.abs().max())
    # few candidates in all: only their rows are multiplied; most of the training set: every row, columns kept
    union = int(torch.unique(short.candidates).numel())
    assert (union <= 12) == (m == 2) and (union > 30) == (m == 0.25)  # ALL_ROWS_FRACTION: 15 of 60
    assert short.metadata["shortlist_route"] == "InfluenceFunction.score_candidates"
    assert short.metadata["shortlist_m"] == size and short.metadata["n_train"] == 60
    assert short.metadata["shortlist_union"] == union
    assert short.measurement == inf.score(query).measurement
    # the candidates are the most similar examples, most similar first
    sim = _similar(train, query)
    for q in range(6):
        chosen = sim[q, short.candidates[q].numpy()]
        assert np.all(np.diff(chosen) <= 0) and chosen[-1] >= np.sort(sim[q])[::-1][size - 1]


@pytest.mark.parametrize("stored", [False, True], ids=["memory", "store"])
def test_projected_candidates_equal_full_scores_and_read_only_their_chunks(problem, tmp_path, stored):
    model, task, train, query = problem
    kwargs = {"projector": RandomProjector(dim=12, random_state=0), "dtype": torch.float64, "progress": False}
    if stored:
        kwargs |= {"store_dir": tmp_path / "store", "chunk_size": 10}
    inf = ProjectedInfluence(model, task, **kwargs).fit(train)
    full = inf.score(query).values
    # every query's candidates lie in training rows 0..4 and 30..34 (at most 10 of 60 in all, below
    # ALL_ROWS_FRACTION): chunks 0 and 3 of six
    g = torch.Generator().manual_seed(0)
    pool = torch.cat([torch.arange(5), torch.arange(30, 35)])
    cand = torch.stack([pool[torch.randperm(10, generator=g)[:6]] for _ in range(6)])
    opened: list[int] = []
    if stored:
        blocks = inf.store_.blocks

        def recording(chunks=None):
            opened.extend([] if chunks is None else list(chunks))
            yield from blocks(chunks)

        inf.store_.blocks = recording
    short = score_shortlist(inf, query, cand)
    assert torch.equal(short.candidates, cand)
    assert float((short.values - full.gather(1, cand)).abs().max()) <= 1e-12 * float(full.abs().max())
    assert short.metadata["shortlist_route"] == "ProjectedInfluence.score_candidates"
    assert short.metadata["shortlist_union"] == int(torch.unique(cand).numel())
    if stored:
        assert opened == [0, 3]
    # candidates given with negative indices count from the end, as everywhere
    again = inf.score_candidates(query, cand - 60)
    assert torch.allclose(again, short.values, rtol=0, atol=1e-15)
    # candidates covering most of the training set: the same numbers (in memory: one product with every row)
    wide = torch.stack([torch.randperm(60, generator=g)[:40] for _ in range(6)])
    assert float((inf.score_candidates(query, wide) - full.gather(1, wide)).abs().max()) <= 1e-12 * float(
        full.abs().max()
    )


class FixedScores(Attributor):
    """An attributor whose scores are a given matrix (no way to score only some columns)."""

    route = "fixed"

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values
        self.task = datatrace.ClassificationTask()

    def fit(self, train):
        self.n_train_ = self.values.shape[1]
        return self

    def score(self, query, measurement=None):
        return Scores(self.values[: len(query[0])], metadata=self.metadata())

    def self_influence(self):
        return torch.zeros(self.n_train_)


def test_other_attributors_keep_the_columns_of_their_full_score_and_say_so():
    values = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    inf = FixedScores(values).fit(None)
    query = (torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    cand = torch.tensor([[0, 5, 19], [1, 2, 3], [19, 18, 17]])
    short = score_shortlist(inf, query, cand)
    assert torch.equal(short.values, values.gather(1, cand))
    assert short.metadata["shortlist_route"] == "full score, candidate columns kept"


def test_to_dense_leaves_non_candidates_absent_not_zero():
    short = ShortlistScores(
        candidates=torch.tensor([[2, 0], [1, 3]]),
        values=torch.tensor([[0.5, -0.25], [0.0, 1.0]], dtype=torch.float64),
        n_train=4,
        measurement="the query's loss",
    )
    dense = short.to_dense()
    assert isinstance(dense, Scores) and dense.values.shape == (2, 4)
    assert dense.values[0, 2] == 0.5 and dense.values[0, 0] == -0.25 and dense.values[1, 1] == 0.0
    assert torch.isnan(dense.values[0, [1, 3]]).all() and torch.isnan(dense.values[1, [0, 2]]).all()
    assert dense.metadata["shortlist_missing"] == "nan"


def test_recall_of_the_true_top_k_on_a_constructed_case():
    full = torch.tensor(
        [
            [5.0, 4.0, 3.0, -1.0, -2.0, -6.0, 0.5, 0.1],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],  # no opponent at all
        ],
        dtype=torch.float64,
    )
    cand = torch.tensor([[0, 2, 4, 7], [7, 6, 0, 1]])
    short = ShortlistScores(cand, full.gather(1, cand), n_train=8, measurement="loss")
    recall = shortlist_recall(short, Scores(full), k=2)
    # query 0: proponents {0, 1} -> found {0, 2}: 1/2; opponents {5, 4} -> found {4}: 1/2;
    #          |score| {5, 0} -> found {0, 2}: 1/2.  query 1: proponents and |score| {7, 6} found: 1; no opponents.
    np.testing.assert_allclose(recall.per_query_proponents, [0.5, 1.0])
    np.testing.assert_allclose(recall.per_query_magnitude, [0.5, 1.0])
    assert recall.per_query_opponents[0] == 0.5 and math.isnan(recall.per_query_opponents[1])
    assert recall.proponents == 0.75 and recall.opponents == 0.5 and recall.magnitude == 0.75
    assert recall.to_dict() == {"k": 2, "proponents": 0.75, "opponents": 0.5, "magnitude": 0.75}
    # every true top-k example a candidate: recall 1; the full matrix as a plain array is accepted too
    everything = torch.arange(8).repeat(2, 1)
    whole = ShortlistScores(everything, full.clone(), n_train=8, measurement="loss")
    assert shortlist_recall(whole, full.numpy(), k=3).proponents == 1.0


def test_tfidf_similarity_finds_the_matching_text():
    train = [
        "the cat sat on the mat",
        "stock prices fell sharply on monday",
        "a dog chased the cat around the garden",
        "interest rates and stock markets",
    ]
    queries = ["stock markets fell", "the cat and the dog", "quantum chromodynamics"]
    sim = tfidf_similarity(queries, train)
    assert sim.shape == (3, 4) and sim.dtype == np.float64
    assert set(select_candidates(sim, 2)[0].tolist()) == {1, 3}
    assert int(select_candidates(sim, 1)[1, 0]) == 2
    assert np.all(sim[2] == 0.0)  # no word in the training vocabulary
    assert tfidf_similarity(train[:1], train)[0, 0] == pytest.approx(1.0)
    # options reach the vectorizer
    assert tfidf_similarity(queries, train, stop_words="english")[1, 0] > 0


def test_embedding_similarity_is_the_cosine():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b[4] = 0.0
    sim = embedding_similarity(a, b.numpy())
    expected = (a / a.norm(dim=1, keepdim=True)) @ (b[:4] / b[:4].norm(dim=1, keepdim=True)).T
    np.testing.assert_allclose(sim[:, :4], expected.numpy(), rtol=1e-12, atol=1e-15)
    assert np.all(sim[:, 4] == 0.0)


def test_select_candidates_sizes_and_ties():
    sim = np.array([[0.5, 0.9, 0.5, 0.1, 0.9]])
    assert select_candidates(sim, 3).tolist() == [[1, 4, 0]]  # ties: smaller index first
    assert select_candidates(sim, 0.5).shape == (1, 3)  # ceil(0.5 * 5)
    assert select_candidates(sim, 1.0).shape == (1, 5)


@pytest.mark.parametrize("m", [0, 6, 1.5, 0.0, True, "10%", None])
def test_bad_m_is_refused_by_name(m):
    with pytest.raises(
        ValueError,
        match=rf"m={m!r}.*is not allowed: expected the number of candidates.*Fix: pass e\.g\. m=0\.1",
    ):
        select_candidates(np.zeros((2, 5)), m)


def test_bad_input_is_refused_by_name(problem):
    model, task, train, query = problem
    inf = datatrace.InfluenceFunction(model, task, progress=False).fit(train)
    sim = _similar(train, query)
    with pytest.raises(
        ValueError, match=r"similarity=.*shape \(n_query, n_train\) = \(6, 60\).*got \(6, 59\).*Fix"
    ):
        score_shortlist(inf, query, similarity=sim[:, :59], m=5)
    with pytest.raises(ValueError, match=r"similarity=.*finite numbers.*Fix"):
        score_shortlist(inf, query, similarity=np.full((6, 60), np.nan), m=5)
    with pytest.raises(
        ValueError, match=r"candidates=None.*either candidates=.*Fix: e\.g\. similarity=tfidf"
    ):
        score_shortlist(inf, query, similarity=sim)
    with pytest.raises(ValueError, match=r"candidates=.*cannot be combined with similarity or m.*Fix"):
        score_shortlist(inf, query, torch.zeros(6, 2, dtype=torch.long), m=3)
    with pytest.raises(ValueError, match=r"candidates=.*row 1 repeats index 4.*Fix: remove the repeats"):
        score_shortlist(inf, query, torch.tensor([[0, 1]] + [[4, 4]] + [[0, 1]] * 4))
    with pytest.raises(IndexError, match=r"candidates contains 60, out of range for 60.*Fix"):
        score_shortlist(inf, query, torch.full((6, 1), 60))
    with pytest.raises(ValueError, match=r"candidates=.*shape \(n_query, m\) = \(6, m\).*Fix"):
        score_shortlist(inf, query, torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"candidates=.*integer indices, got dtype torch.float.*Fix"):
        score_shortlist(inf, query, torch.zeros(6, 2))
    with pytest.raises(ValueError, match=r"influence=.*fitted datatrace attributor.*Fix"):
        score_shortlist(datatrace.InfluenceFunction(model, task), query, similarity=sim, m=5)
    with pytest.raises(ValueError, match=r"query_texts\[1\]=3.*expected a str.*Fix"):
        tfidf_similarity(["a", 3], ["a b"])
    with pytest.raises(ValueError, match=r"train_texts=.*vocabulary.*Fix"):
        tfidf_similarity(["a"], ["", " "])
    with pytest.raises(ValueError, match=r"vectorizer_options=.*TfidfVectorizer.*Fix"):
        tfidf_similarity(["a"], ["a b"], colour="blue")
    with pytest.raises(
        ValueError, match=r"train_embeddings=.*same width as query_embeddings \(4\), got 3.*Fix"
    ):
        embedding_similarity(np.ones((2, 4)), np.ones((3, 3)))


def test_recall_refuses_full_scores_of_something_else(problem):
    model, task, train, query = problem
    inf = datatrace.InfluenceFunction(model, task, progress=False).fit(train)
    short = score_shortlist(inf, query, similarity=_similar(train, query), m=10)
    full = inf.score(query)
    assert 0.0 <= shortlist_recall(short, full, k=5).magnitude <= 1.0
    with pytest.raises(
        ValueError, match=r"full=.*differ from the shortlist's by up to.*Fix: score the same queries"
    ):
        shortlist_recall(short, 2 * full.values, k=5)
    with pytest.raises(
        ValueError, match=r"full=.*shape \(n_query, n_train\) = \(6, 60\), got \(5, 60\).*Fix"
    ):
        shortlist_recall(short, full.values[:5], k=5)
    with pytest.raises(ValueError, match=r"shortlist=.*ShortlistScores.*Fix"):
        shortlist_recall(full, full, k=5)
    with pytest.raises(ValueError, match=r"k=0.*Fix"):
        shortlist_recall(short, full, k=0)


def test_scikit_learn_text_classifier_with_string_labels():
    """TF-IDF features, a LogisticRegression with string labels, the texts themselves as the similarity."""
    words = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "cast"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 5)) for _ in range(46)]
    labels = np.array(
        [
            "pos" if sum(t.count(w) for w in words[:3]) >= sum(t.count(w) for w in words[3:6]) else "neg"
            for t in texts
        ]
    )
    X = TfidfVectorizer().fit(texts[:40]).transform(texts).toarray()
    estimator = LogisticRegression(tol=1e-10, max_iter=10_000).fit(X[:40], labels[:40])
    inf = datatrace.from_sklearn(estimator, X[:40], labels[:40])
    query = (X[40:], labels[40:])
    short = score_shortlist(inf, query, similarity=tfidf_similarity(texts[40:], texts[:40]), m=8)
    full = inf.score(query).values
    assert torch.allclose(short.values, full.gather(1, short.candidates), rtol=1e-10, atol=1e-14)
    assert shortlist_recall(short, full, k=3).k == 3


@pytest.mark.parametrize("stored", [False, True], ids=["tensor", "store"])
def test_rows_product_in_small_blocks_equals_the_product_with_the_rows(tmp_path, stored):
    g = torch.Generator().manual_seed(4)
    F = torch.randn(50, 6, generator=g, dtype=torch.float64)
    queries = torch.randn(3, 6, generator=g, dtype=torch.float64)
    features = F
    if stored:
        features = GradientStore.create(tmp_path / "s", n=50, dim=6, dtype=torch.float64, chunk_size=7)
        features.fill(lambda a, b: F[a:b], progress=False)
    idx = torch.tensor([0, 1, 2, 6, 7, 13, 20, 21, 22, 23, 48, 49])  # rows in 6 of the 8 chunks
    got = rows_product(queries, features, idx, block_bytes=2 * 6 * 8)  # two rows per block
    assert torch.allclose(got, queries @ F[idx].T, rtol=1e-14, atol=1e-14)


def test_explain_takes_shortlist_scores(problem):
    """explain(ShortlistScores): the proponents / opponents among each query's candidates, equal to the
    shortlist's own picks; the score row is NaN off the shortlist."""
    from datatrace.apps import explain

    model, task, train, query = problem
    inf = datatrace.InfluenceFunction(model, task, progress=False).fit(train)
    short = score_shortlist(inf, query, similarity=_similar(train, query), m=10)
    for e in explain(short, None, k=3):
        assert torch.equal(e.proponents.indices, short.proponents(e.query_index, 3).indices)
        assert torch.equal(e.opponents.indices, short.opponents(e.query_index, 3).indices)
        on_list = np.zeros(60, dtype=bool)
        on_list[short.candidates[e.query_index].numpy()] = True
        assert np.isnan(e.score_row[~on_list]).all() and np.isfinite(e.score_row[on_list]).all()
