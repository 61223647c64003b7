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
largest |score| (:func:`datatrace.apps.shortlist.shortlist_recall`), the same for a random shortlist of the same
size (expected recall m / n), and the seconds of the full and of the shortlist scoring (the shortlist's include
its TF-IDF similarity).

    python docs/examples/shortlist_docstrings.py            # about a minute on one core
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import time
import warnings

import numpy as np
import torch
from sklearn.feature_extraction.text import CountVectorizer
from torch import nn

import datatrace
from datatrace.apps.shortlist import score_shortlist, select_candidates, shortlist_recall, tfidf_similarity
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


def main(n_query: int = 50, seed: int = 0, k: int = 10) -> None:
    torch.set_num_threads(1)
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
    p = sum(x.numel() for x in model.parameters())
    print(f"{n} training docstrings of {len(PACKAGES)} packages, {n_query} queries; p = {p}; accuracy {accuracy:.2f}")

    attributors = {
        "InfluenceFunction (EK-FAC)": datatrace.InfluenceFunction(
            model, task, curvature="ekfac", progress=False
        ),
        "ProjectedInfluence (factorised)": datatrace.ProjectedInfluence(model, task, progress=False),
    }
    for name, influence in attributors.items():
        t0 = time.perf_counter()
        influence.fit(train)
        fit_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = influence.score(query)
        full_seconds = time.perf_counter() - t0
        print(f"\n{name}: fit {fit_seconds:.1f} s, full scoring of {n_query} x {n}: {full_seconds:.2f} s")
        print(
            "   m      m/n   recall@10: proponents opponents |score|   random: proponents opponents |score|"
            "   seconds (incl. TF-IDF)"
        )
        for fraction in (0.05, 0.10, 0.25):
            t0 = time.perf_counter()
            similarity = tfidf_similarity(query_texts, train_texts, sublinear_tf=True)
            short = score_shortlist(influence, query, similarity=similarity, m=fraction)
            seconds = time.perf_counter() - t0
            recall = shortlist_recall(short, full, k=k)
            random_sim = np.random.default_rng(seed + 1).random((n_query, n))
            lucky = score_shortlist(influence, query, select_candidates(random_sim, fraction))
            chance = shortlist_recall(lucky, full, k=k)
            print(
                f"{short.m:5d}  {short.m / n:5.2f}   {recall.proponents:21.2f} {recall.opponents:9.2f} "
                f"{recall.magnitude:7.2f}   {chance.proponents:18.2f} {chance.opponents:9.2f} "
                f"{chance.magnitude:7.2f}   {seconds:8.2f}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.queries, args.seed)
