"""Candidate filtering on a small real text problem: how much of the true top-10 a TF-IDF shortlist keeps.

The texts are the docstrings of Python's standard library (functions, classes and methods of nine packages, no
download): the task is to tell which package a docstring comes from. A two-layer network on binary bag-of-words
features is trained with Adam; influence is fitted on the whole training set, then every query is scored two
ways:

* in full: ``influence.score(query)``, the ground truth of the shortcut;
* by shortlist (:func:`datatrace.apps.shortlist.score_shortlist`): only the ``m`` training docstrings most similar
  to the query, by TF-IDF cosine of the raw texts (the model never sees TF-IDF: its inputs are binary counts of
  another, smaller vocabulary), are scored, exactly.

It prints, for m = 5%, 10% and 25% of the training set, the recall of the true top-10 proponents, opponents and
largest |score| (:func:`datatrace.apps.shortlist.shortlist_recall`) for three similarities: TF-IDF of the texts,
the cosine of the model's own hidden layer (:func:`datatrace.apps.shortlist.embedding_similarity`), and random
numbers (chance: recall m / n); then the seconds of scoring all queries in full and by shortlist.

Part 2 times the training side alone (reading training feature rows and multiplying by them, the part of the cost
that grows with the training set; the query side, gradients and solve, is the same for both) on a store of
200,000 random rows of 256 numbers and 50,000 of 2048: all rows against each query's shortlist, for one query
and for 50.

    python docs/examples/shortlist_docstrings.py            # a few minutes on one core
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import math
import pkgutil
import shutil
import tempfile
import time
import warnings

import numpy as np
import torch
from sklearn.feature_extraction.text import CountVectorizer
from torch import nn

import datatrace
from datatrace.apps.shortlist import (
    embedding_similarity,
    score_shortlist,
    select_candidates,
    shortlist_recall,
    tfidf_similarity,
)
from datatrace.attributors.projected import rows_product
from datatrace.projection.scoring import score_against_store
from datatrace.projection.store import GradientStore
from datatrace.verification.training import fit_minibatch

PACKAGES = (
    "asyncio",
    "email",
    "xml",
    "logging",
    "unittest",
    "importlib",
    "http",
    "multiprocessing",
    "urllib",
)


def docstrings(packages: tuple[str, ...] = PACKAGES, min_words: int = 8) -> tuple[list[str], list[int]]:
    """Distinct docstrings of the functions, classes and methods defined in ``packages`` (their test modules
    left out) and the package each comes from, in a fixed order."""
    texts, labels, seen = [], [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, package in enumerate(packages):
            root = importlib.import_module(package)
            modules = [root]
            for info in pkgutil.walk_packages(getattr(root, "__path__", []), package + "."):
                if "test" in info.name.split(".")[1:] or info.name.endswith("__main__"):
                    continue
                try:
                    modules.append(importlib.import_module(info.name))
                except Exception:  # a module that needs a platform or extra we lack
                    continue
            for module in sorted(modules, key=lambda m: m.__name__):
                for _, obj in sorted(vars(module).items()):
                    if getattr(obj, "__module__", None) != module.__name__:
                        continue
                    members = [obj]
                    if inspect.isclass(obj):
                        members += [v for _, v in sorted(vars(obj).items()) if inspect.isfunction(v)]
                    for member in members:
                        if not (inspect.isfunction(member) or inspect.isclass(member)):
                            continue
                        doc = inspect.getdoc(member)
                        if doc and len(doc.split()) >= min_words and doc not in seen:
                            seen.add(doc)
                            texts.append(doc)
                            labels.append(label)
    return texts, labels


def _seconds(fn, *args, repeat: int | None = None):
    """``fn(*args)`` and the seconds it took (the best of ``repeat`` runs, default ``REPEAT``: the machine may be
    shared)."""
    best = math.inf
    for _ in range(REPEAT if repeat is None else repeat):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return out, best


REPEAT = 3
FRACTIONS = (0.05, 0.10, 0.25)


def recall_and_time(n_query: int, seed: int, k: int, store_dir: str) -> None:
    """Part 1: the docstring classifier, recall of the true top-k and seconds (module docstring)."""
    texts, labels = docstrings()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    query_idx, train_idx = order[:n_query], order[n_query:]
    train_texts = [texts[i] for i in train_idx]
    query_texts = [texts[i] for i in query_idx]
    counts = CountVectorizer(binary=True, max_features=600, min_df=2).fit(train_texts)

    def as_tensors(some: list[str], idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.as_tensor(counts.transform(some).toarray(), dtype=torch.float32)
        return X, torch.as_tensor(np.asarray(labels)[idx], dtype=torch.long)

    train, query = as_tensors(train_texts, train_idx), as_tensors(query_texts, query_idx)
    n = len(train_texts)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(600, 24), nn.ReLU(), nn.Linear(24, len(PACKAGES)))
    task = datatrace.ClassificationTask(weight_decay=1e-3)
    model = fit_minibatch(model, task, train, epochs=30, batch_size=32, lr=3e-3, seed=seed)
    with torch.no_grad():
        accuracy = float((model(query[0]).argmax(1) == query[1]).float().mean())
        hidden_train, hidden_query = model[:2](train[0]), model[:2](query[0])
    p = sum(x.numel() for x in model.parameters())
    print(
        f"{n} training docstrings of {len(PACKAGES)} packages, {n_query} queries; p = {p}; accuracy {accuracy:.2f}"
    )

    tfidf, tfidf_seconds = _seconds(
        functools.partial(tfidf_similarity, sublinear_tf=True), query_texts, train_texts
    )
    hidden, hidden_seconds = _seconds(embedding_similarity, hidden_query, hidden_train)
    similarities = {
        "TF-IDF of the texts": tfidf,
        "model's hidden layer": hidden,
        "random (chance)": np.random.default_rng(seed + 1).random((n_query, n)),
    }
    print(
        f"similarity seconds for all queries: TF-IDF {tfidf_seconds:.3f}, hidden layer {hidden_seconds:.4f}"
    )
    attributors = {
        "InfluenceFunction, EK-FAC": datatrace.InfluenceFunction(
            model, task, curvature="ekfac", progress=False
        ),
        "ProjectedInfluence, factorised, store on disk": datatrace.ProjectedInfluence(
            model, task, store_dir=store_dir, progress=False
        ),
    }
    for name, influence in attributors.items():
        _, fit_seconds = _seconds(influence.fit, train, repeat=1)
        full, full_seconds = _seconds(influence.score, query)
        print(f"\n{name}: fit {fit_seconds:.1f} s")
        print(f"  {'similarity':22s} {'m':>5s} {'m/n':>5s}   recall@{k}: proponents opponents |score|")
        for label, similarity in similarities.items():
            for fraction in FRACTIONS:
                short = score_shortlist(influence, query, select_candidates(similarity, fraction))
                recall = shortlist_recall(short, full, k=k)
                print(
                    f"  {label:22s} {short.m:5d} {short.m / n:5.2f}   {recall.proponents:21.2f} "
                    f"{recall.opponents:9.2f} {recall.magnitude:7.2f}"
                )
        print(
            f"  seconds, all {n_query} queries in one call, TF-IDF candidates: full scoring {full_seconds:.3f}"
        )
        for fraction in FRACTIONS:
            cand = select_candidates(tfidf, fraction)
            short, seconds = _seconds(score_shortlist, influence, query, cand)
            print(
                f"    shortlist of {fraction:.0%}: {seconds:.3f} (+ {tfidf_seconds:.3f} for TF-IDF); all queries' "
                f"candidates together: {short.metadata['shortlist_union']} of {n} examples, scored by "
                f"{short.metadata['shortlist_route']}"
            )


def store_at_scale(n: int, dim: int, seed: int, n_query: int = 50) -> None:
    """Part 2: the training side alone at a larger scale: queries against a store of ``n`` random feature rows of
    ``dim`` numbers, all rows (``score_against_store``, what ``score`` does) or each query's shortlist (the union of
    the shortlists read once, ``rows_product``, what ``score_candidates`` does), for one query and for
    ``n_query`` queries with independent shortlists (their union is most of the store once ``n_query m`` nears
    ``n``, which is why ``score_candidates`` then scores every row instead, ``ALL_ROWS_FRACTION``)."""
    directory = tempfile.mkdtemp(prefix="shortlist-scale-")
    try:
        g = torch.Generator().manual_seed(seed)
        store = GradientStore.create(directory, n=n, dim=dim, chunk_size=16384)
        store.fill(lambda a, b: torch.randn(b - a, dim, generator=g), progress=False)
        queries = torch.randn(n_query, dim, generator=g)
        list(store.blocks())  # every chunk hashed once (the first read of a chunk checks its sha256)
        rng = np.random.default_rng(seed)
        print(f"\ntraining side against a store of {n} rows of {dim} float32 (warm), milliseconds:")
        print(f"  {'':26s} {'1 query':>9s} {f'{n_query} queries':>11s}   rows read for {n_query} queries")
        _, one = _seconds(score_against_store, queries[:1], store, repeat=7)
        _, many = _seconds(score_against_store, queries, store, repeat=7)
        print(f"  {'all rows':26s} {1000 * one:9.1f} {1000 * many:11.1f}   {n}")
        for fraction in FRACTIONS:
            m = int(fraction * n)
            cand = torch.from_numpy(np.stack([rng.choice(n, m, replace=False) for _ in range(n_query)]))
            union_one = torch.unique(cand[0])
            union, inverse = torch.unique(cand, return_inverse=True)

            def shortlist(q, rows, inv):
                return torch.gather(rows_product(q, store, rows), 1, inv)

            _, one = _seconds(
                shortlist, queries[:1], union_one, torch.searchsorted(union_one, cand[:1]), repeat=7
            )
            _, many = _seconds(shortlist, queries, union, inverse, repeat=7)
            print(
                f"  {f'shortlist of {fraction:.0%} (scattered)':26s} {1000 * one:9.1f} {1000 * many:11.1f}   {len(union)}"
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(
    n_query: int = 50, seed: int = 0, k: int = 10, store_dir: str | None = None, scale: int = 200_000
) -> None:
    torch.set_num_threads(1)
    if store_dir is None:
        with tempfile.TemporaryDirectory(prefix="shortlist-store-") as temporary:
            recall_and_time(n_query, seed, k, temporary)
    else:
        recall_and_time(n_query, seed, k, store_dir)
    if scale:
        store_at_scale(scale, 256, seed)
        store_at_scale(scale // 4, 2048, seed)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store-dir", default=None, help="where ProjectedInfluence keeps its features")
    parser.add_argument(
        "--scale",
        type=int,
        default=200_000,
        help="rows of the first store of part 2 (the second has a quarter of them, 8x wider; 0: skip part 2)",
    )
    args = parser.parse_args()
    main(args.queries, args.seed, store_dir=args.store_dir, scale=args.scale)
