"""Built-in problems: scikit-learn's handwritten digits with a seeded share of the training labels flipped, and
real text available offline (the standard library's docstrings labelled by what their module does).

The demo (``datatrace demo``), ``docs/examples/mislabelled_digits.py`` and the debugging benchmark all use this one
problem (:func:`flipped_digits`), so that they agree on the data: the 1,797 8x8 digits of :func:`sklearn.datasets.load_digits` with pixels
scaled to [0, 1] (``X / 16``, float64), a seeded stratified split into training and test images, and
``round(flip_fraction * n_train)`` training labels changed to ``(y + s) mod 10`` with ``s`` uniform in 1..9, so
that every flipped label is wrong and the flipped indices are known (the ground truth of mislabel detection, as in
Koh & Liang 2017, section 5.4).

The demo's models (:func:`build_model`: multinomial logistic regression or a small tanh network, float64) are
trained to a tight minimum by full-batch L-BFGS (:func:`train_to_tolerance`, :class:`WarmStartTrainer` for
leave-one-out retraining), because influence functions describe the response of a minimum.

:func:`docstring_texts` is a text classification problem that needs no download: the first paragraph of the
docstring of every public function, class and method of the standard-library modules in
:data:`DOCSTRING_GROUPS`, labelled by the group of its module (files, text, numbers, network, concurrency, data).
It is what ``docs/examples/minilm_docstrings.py`` fine-tunes a pretrained MiniLM on.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from datatrace.errors import bad_value
from datatrace.tasks import ClassificationTask
from datatrace.verification.training import fit_full_batch, objective

__all__ = [
    "DIGITS_IMAGE_SHAPE",
    "DOCSTRING_GROUPS",
    "MODELS",
    "MODEL_NAMES",
    "N_DIGIT_CLASSES",
    "SCHEDULES",
    "DigitsData",
    "QueryLosses",
    "Schedule",
    "WarmStartTrainer",
    "build_model",
    "docstring_texts",
    "flipped_digits",
    "gradient_max",
    "train_to_tolerance",
]

N_DIGIT_CLASSES = 10
DIGITS_IMAGE_SHAPE = (8, 8)
MODELS = ("logreg", "mlp")
MODEL_NAMES = {
    "logreg": "multinomial logistic regression (64 -> 10)",
    "mlp": "tanh MLP (64 -> 32 -> 10)",
}


@dataclass(frozen=True)
class Schedule:
    """L-BFGS budget: target ``max |grad L|``, then iterations and restarts for the first fit and each retrain."""

    tolerance: float
    fit_iter: int
    fit_rounds: int
    retrain_iter: int
    retrain_rounds: int


#: the convex model reaches 1e-9 quickly; the network is given a looser target and a larger budget
SCHEDULES = {
    "logreg": Schedule(tolerance=1e-9, fit_iter=500, fit_rounds=4, retrain_iter=500, retrain_rounds=3),
    "mlp": Schedule(tolerance=1e-8, fit_iter=2000, fit_rounds=2, retrain_iter=1000, retrain_rounds=2),
}


@dataclass(frozen=True)
class DigitsData:
    """A split of the digits. ``y_train`` holds the labels trained on (some flipped); ``y_train_true`` the originals."""

    X_train: np.ndarray  # (n_train, 64) float64 in [0, 1]
    y_train: np.ndarray  # (n_train,) int64, with flipped labels
    y_train_true: np.ndarray  # (n_train,) int64
    flipped: np.ndarray  # (n_train,) bool
    X_test: np.ndarray
    y_test: np.ndarray
    train_rows: np.ndarray  # row numbers in sklearn's digits
    test_rows: np.ndarray

    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X_train, y_train)`` as tensors (float64 pixels, int64 labels as trained on)."""
        return torch.from_numpy(self.X_train), torch.from_numpy(self.y_train)

    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X_test, y_test)`` as tensors (float64 pixels, int64 true labels)."""
        return torch.from_numpy(self.X_test), torch.from_numpy(self.y_test)


def flipped_digits(
    seed: int = 0,
    flip_fraction: float = 0.05,
    n_train: int = 1000,
    n_test: int = 300,
    *,
    flip_seed: int | Sequence[int] | None = None,
    flip_in_index_order: bool = False,
) -> DigitsData:
    """sklearn's digits (X / 16), a seeded stratified split, and ``flip_fraction`` of the training labels flipped.

    Args:
        seed: ``random_state`` of the stratified split (and, by default, of the flips).
        flip_fraction: share of the training labels changed to a different, uniformly random class.
        n_train, n_test: sizes of the split (at most 1,797 together).
        flip_seed: seed of :func:`numpy.random.default_rng` that draws the flips; None: ``[seed, 1]``.
        flip_in_index_order: draw the new classes for the flipped examples in increasing index order rather
            than in the order the examples were drawn (two orders of the same draws, both in use).
    """
    if not 0.0 <= flip_fraction <= 1.0:
        raise bad_value("flip_fraction", flip_fraction, "expected a fraction in [0, 1]", "pass e.g. 0.05")
    X, y = load_digits(return_X_y=True)
    rows = np.arange(len(y))
    train_rows, test_rows = train_test_split(
        rows, train_size=n_train, test_size=n_test, random_state=seed, stratify=y
    )
    train_rows, test_rows = np.sort(train_rows), np.sort(test_rows)
    rng = np.random.default_rng([seed, 1] if flip_seed is None else flip_seed)
    n_flip = round(flip_fraction * n_train)
    y_true = y[train_rows].astype(np.int64)
    y_noisy = y_true.copy()
    flipped = np.zeros(n_train, dtype=bool)
    if n_flip:
        which = rng.choice(n_train, size=n_flip, replace=False)
        if flip_in_index_order:
            which = np.sort(which)
        y_noisy[which] = (y_true[which] + rng.integers(1, N_DIGIT_CLASSES, size=n_flip)) % N_DIGIT_CLASSES
        flipped[which] = True
    return DigitsData(
        X_train=(X[train_rows] / 16.0).astype(np.float64),
        y_train=y_noisy,
        y_train_true=y_true,
        flipped=flipped,
        X_test=(X[test_rows] / 16.0).astype(np.float64),
        y_test=y[test_rows].astype(np.int64),
        train_rows=train_rows,
        test_rows=test_rows,
    )


def build_model(kind: str, seed: int = 0) -> nn.Module:
    """The untrained float64 model: ``"logreg"`` (``Linear(64, 10)``) or ``"mlp"`` (64-32-10, tanh)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "logreg":
            model: nn.Module = nn.Linear(64, N_DIGIT_CLASSES)
        elif kind == "mlp":
            model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, N_DIGIT_CLASSES))
        else:
            raise bad_value("model", kind, f"expected one of {list(MODELS)}", "pass model='logreg' or 'mlp'")
    return model.double()


def gradient_max(model: nn.Module, task: ClassificationTask, data: tuple) -> float:
    """``max |grad L(theta)|`` of the training objective on ``data`` (how far from a stationary point)."""
    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    value = objective(model, task, [(x.to(params[0].dtype), y)], len(y))
    grads = torch.autograd.grad(value, params)
    return max(float(g.abs().max()) for g in grads)


@contextlib.contextmanager
def _quiet_training_log() -> Iterator[None]:
    """Silence fit_full_batch's per-call warning; the demo checks and reports convergence itself."""
    training_logger = logging.getLogger("datatrace.verification.training")
    previous = training_logger.level
    training_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        training_logger.setLevel(previous)


def train_to_tolerance(
    model: nn.Module,
    task: ClassificationTask,
    data: tuple,
    *,
    tolerance: float = 1e-9,
    max_iter: int = 500,
    rounds: int = 4,
) -> nn.Module:
    """``fit_full_batch`` (full-batch L-BFGS), restarted up to ``rounds`` times until ``max |grad L| <=
    tolerance``. Returns a trained copy with the reached ``max |grad L|`` stored as ``model.grad_max``."""
    with _quiet_training_log():
        for _ in range(rounds):
            model = fit_full_batch(model, task, data, max_iter=max_iter, tolerance_grad=tolerance)
            reached = gradient_max(model, task, data)
            if reached <= 10 * tolerance:  # L-BFGS's own stop test differs slightly from this recomputation
                break
    model.grad_max = reached
    return model


class WarmStartTrainer:
    """``train_fn`` for leave-one-out retraining: L-BFGS on the subset, starting from the trained weights.

    Picklable (so joblib workers can run it). A warm start gives the same minimum as a cold one on a convex model
    and, for a network, the nearby minimum that influence functions describe, in a fraction of the time.
    """

    def __init__(self, model: nn.Module, task: ClassificationTask, schedule: Schedule) -> None:
        self.model = model
        self.task = task
        self.schedule = schedule

    def __call__(self, data: tuple) -> nn.Module:
        s = self.schedule
        return train_to_tolerance(
            self.model,
            self.task,
            data,
            tolerance=s.tolerance,
            max_iter=s.retrain_iter,
            rounds=s.retrain_rounds,
        )


class QueryLosses:
    """``evaluate(model)`` for leave-one-out retraining: the loss of every query example, followed by the model's
    ``max |grad L|`` (set by :func:`train_to_tolerance`) so that convergence of every retrain can be reported."""

    def __init__(self, task: ClassificationTask, X: torch.Tensor, y: torch.Tensor) -> None:
        self.task = task
        self.X = X
        self.y = y

    def __call__(self, model: nn.Module) -> np.ndarray:
        with torch.no_grad():
            losses = self.task.loss(model.eval(), (self.X, self.y)).to(torch.float64).numpy()
        return np.concatenate([losses, [float(getattr(model, "grad_max", 0.0))]])


#: the classes of :func:`docstring_texts`: standard-library modules grouped by what they do
DOCSTRING_GROUPS: dict[str, tuple[str, ...]] = {
    "files": ("os", "os.path", "pathlib", "shutil", "tempfile", "glob", "fnmatch", "filecmp", "zipfile", "tarfile"),
    "text": ("re", "string", "textwrap", "difflib", "unicodedata", "codecs", "html", "html.parser"),
    "numbers": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator"),
    "network": ("socket", "ssl", "http.client", "http.server", "urllib.request", "urllib.parse", "email.message",
                "smtplib", "ftplib", "ipaddress"),
    "concurrency": ("threading", "multiprocessing", "asyncio", "concurrent.futures", "queue", "subprocess",
                    "selectors", "signal"),
    "data": ("json", "csv", "pickle", "sqlite3", "collections", "itertools", "functools", "heapq", "bisect",
             "dataclasses", "enum", "datetime", "calendar"),
}  # fmt: skip


def _first_paragraph(doc: str, max_chars: int) -> str:
    """The docstring's first paragraph on one line, cut at a word boundary to at most ``max_chars`` characters."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    if len(paragraph) <= max_chars:
        return paragraph
    return paragraph[:max_chars].rsplit(" ", 1)[0]


def docstring_texts(
    groups: dict[str, Sequence[str]] | None = None, min_words: int = 5, max_chars: int = 300
) -> tuple[list[str], np.ndarray, list[str]]:
    """Real text offline: the standard library's docstrings, labelled by the group of their module.

    For each group of ``groups`` (default :data:`DOCSTRING_GROUPS`) and each of its modules, every public object
    (no leading underscore) that is a function or a class, and the public methods of those classes, gives one
    example: the first paragraph of its docstring on one line (at most ``max_chars`` characters, cut at a word),
    when it has at least ``min_words`` words. A text that occurs twice (inherited or re-exported objects) is kept
    once, with the label of its first occurrence. The order is fixed (groups, modules, names sorted), so a seeded
    split is reproducible on one Python version; the texts themselves differ between versions.

    Returns:
        ``(texts, labels, class_names)``: the strings, their class indices (int64, into ``class_names``) and the
        group names.
    """
    groups = DOCSTRING_GROUPS if groups is None else groups
    if not isinstance(groups, dict) or not groups:
        raise bad_value(
            "groups",
            groups,
            "expected a non-empty dict {class name: [module names]}",
            "pass e.g. {'files': ['os'], 'text': ['re']}, or None for DOCSTRING_GROUPS",
        )
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, modules in enumerate(groups.values()):
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise bad_value(
                    "groups",
                    module_name,
                    f"a module that imports here ({type(err).__name__}: {err})",
                    "list modules of the standard library (or installed packages)",
                ) from err
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                    continue
                items = [obj]
                if inspect.isclass(obj):
                    items += [
                        v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and callable(v)
                    ]
                for item in items:
                    text = _first_paragraph(inspect.getdoc(item) or "", max_chars)
                    if len(re.findall(r"\w+", text)) < min_words or text in seen:
                        continue
                    seen.add(text)
                    texts.append(text)
                    labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64), list(groups)
