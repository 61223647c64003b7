"""The realistic-model catalogue: models trained the way people train them, with retraining ground truth.

Every problem here is a float32 model trained by :func:`datatrace.verification.training.fit_minibatch` (Adam on
shuffled minibatches for a fixed number of epochs, dropout and BatchNorm in train mode), on data that ships with
an installed package (scikit-learn's digits and breast cancer sets; the standard library's own docstrings as
text). None of them sits at a minimum of its objective, which is the normal case the defaults must handle. The
float64 L-BFGS problems of :mod:`common` stay as exactness oracles. ``lm`` is a small GPT-2
(``transformers.GPT2LMHeadModel`` from a config, nothing downloaded) trained by AdamW on 32-token windows of the
same docstrings, with :class:`datatrace.hf.CausalLMTask` (summed next-token NLL per sequence) as its task;
``bench_lm.py`` benchmarks it.

Each :class:`Problem` gives its data, a model built from an init seed, the task (cross-entropy, or the LM's
summed NLL, plus the L2 term the training used, so that influence and training see the same objective), the training recipe, and the
ground truth: :func:`ground_truth` retrains on ``n_subsets`` random half subsets with ``n_seeds`` seeds each
(:func:`datatrace.verification.retrain.subsets`, cached under ``benchmarks/results/cache/``; the seeds give the
split-half noise ceiling of the LDS). ``scale="ci"`` builds the same problem at a size the test suite can afford.

Units and signs are datatrace's: ``score[q, i] ~ f_q(theta_{-i}) - f_q(theta_hat)``, the measurement being query
``q``'s loss.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import datatrace
from datatrace import datasets as docstring_sets
from datatrace.verification import retrain
from datatrace.verification.training import fit_minibatch

CACHE_DIR = Path(__file__).resolve().parent / "results" / "cache"

#: the language-model problem's size (``lm``): vocabulary, tokens per sequence, sequences, AdamW budget
LM_VOCAB, LM_LENGTH, LM_TRAIN, LM_TEST, LM_EPOCHS, LM_LR = 512, 32, 512, 64, 20, 3e-3


# --------------------------------------------------------------------------------------------------------------
# Data (all offline)
# --------------------------------------------------------------------------------------------------------------
def _split(n: int, n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n_train + n_test > n:
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {n} examples available.")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:n_train], perm[n_train : n_train + n_test]


def digits_data(n_train: int, n_test: int, seed: int, image: bool = False) -> tuple[tuple, tuple]:
    """scikit-learn's 8x8 digits, pixels ``X / 16`` in float32 (``(n, 1, 8, 8)`` when ``image``), labels int64."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    tr, te = _split(len(X), n_train, n_test, seed)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    if image:
        X = X.reshape(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.int64)
    return (X[tr], y[tr]), (X[te], y[te])


def breast_cancer_data(n_train: int, n_test: int, seed: int) -> tuple[tuple, tuple]:
    """scikit-learn's breast cancer set (30 features, 2 classes), standardised with the training split's moments."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    tr, te = _split(len(X), n_train, n_test, seed)
    mean, std = X[tr].mean(0), X[tr].std(0) + 1e-12
    X = torch.tensor((X - mean) / std, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    return (X[tr], y[tr]), (X[te], y[te])


#: the text classes: the standard library's modules grouped by what they do (an example is one docstring)
DOCSTRING_GROUPS = docstring_sets.DOCSTRING_GROUPS


def _public_docstring_words() -> list[tuple[list[str], int]]:
    """(lower-case words of a docstring, group) for the groups' public objects, in a fixed order (with repeats)."""
    out: list[tuple[list[str], int]] = []
    for label, modules in enumerate(DOCSTRING_GROUPS.values()):
        for module_name in modules:
            module = importlib.import_module(module_name)
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_"):
                    continue
                objects = [obj]
                if inspect.isclass(obj):
                    objects += [
                        v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and callable(v)
                    ]
                for item in objects:
                    if not (inspect.isroutine(item) or inspect.isclass(item)):
                        continue
                    doc = inspect.getdoc(item)
                    out.append((re.findall(r"[a-z]+", (doc or "").lower()), label))
    return out


def _docstrings() -> list[tuple[str, int]]:
    """(lower-case words of a docstring, class) for every distinct docstring of the groups' public objects."""
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    for words, label in _public_docstring_words():
        key = " ".join(words[:64])
        if len(words) < 5 or key in seen:
            continue
        seen.add(key)
        out.append((key, label))
    return out


def docstring_data(n_train: int, n_test: int, seed: int, vocab: int, length: int) -> tuple[tuple, tuple]:
    """The standard library's docstrings labelled by module group (:data:`DOCSTRING_GROUPS`), as token ids.

    Tokens are lower-case words; the ``vocab - 2`` most frequent words of the training split get ids ``2..``
    (0 pads, 1 is any other word); each docstring keeps its first ``length`` words. Returns ``((ids, labels),
    (ids, labels))`` with ids ``(n, length)`` int64. The texts depend on the Python version: the ground-truth
    cache is keyed by a hash of the data, so another version computes its own.
    """
    examples = _docstrings()
    tr, te = _split(len(examples), n_train, n_test, seed)
    counts = Counter(w for i in tr for w in examples[i][0].split()[:length])
    ids = {
        w: k + 2
        for k, (w, _) in enumerate(sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[: vocab - 2])
    }

    def encode(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.zeros(len(rows), length, dtype=torch.int64)
        for r, i in enumerate(rows):
            words = examples[i][0].split()[:length]
            tokens[r, : len(words)] = torch.tensor([ids.get(w, 1) for w in words])
        return tokens, torch.tensor([examples[i][1] for i in rows], dtype=torch.int64)

    return encode(tr), encode(te)


#: the language-model vocabulary's reserved ids: end of a docstring, and any word outside the vocabulary
LM_EOS, LM_UNK = 0, 1


def docstring_lm_data(n_train: int, n_test: int, seed: int, vocab: int, length: int) -> tuple[dict, dict]:
    """The standard library's docstrings as one word stream cut into sequences of ``length`` tokens (causal LM).

    Every distinct docstring of :data:`DOCSTRING_GROUPS`' public objects (its lower-case words, at least 5),
    followed by an end-of-docstring token (id 0), in a fixed order, concatenated and cut into consecutive
    non-overlapping windows of ``length`` tokens; ``n_train`` and ``n_test`` windows are drawn at random (seeded).
    The ``vocab - 2`` most frequent words of the training windows get ids ``2..`` (1 is any other word). Returns
    ``({"input_ids": (n_train, length)}, {"input_ids": (n_test, length)})`` int64: the Hugging Face form that
    :class:`datatrace.hf.CausalLMTask` reads (every position is a target, no padding).
    """
    seen: set[str] = set()
    stream: list[str | None] = []
    for words, _ in _public_docstring_words():
        key = " ".join(words)
        if len(words) < 5 or key in seen:
            continue
        seen.add(key)
        stream += [*words, None]  # None: the end of a docstring
    windows = [stream[k : k + length] for k in range(0, len(stream) - length + 1, length)]
    tr, te = _split(len(windows), n_train, n_test, seed)
    counts = Counter(w for i in tr for w in windows[i] if w is not None)
    ids = {
        w: k + 2
        for k, (w, _) in enumerate(sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[: vocab - 2])
    }

    def encode(rows: np.ndarray) -> dict[str, torch.Tensor]:
        tokens = [[LM_EOS if w is None else ids.get(w, LM_UNK) for w in windows[i]] for i in rows]
        return {"input_ids": torch.tensor(tokens, dtype=torch.int64)}

    return encode(tr), encode(te)


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """Conv(1->c1, 3x3) -> BatchNorm -> ReLU -> max-pool 2 -> Conv(c1->c2) -> BatchNorm -> ReLU -> dropout -> Linear.

    ``smooth=True`` (a :data:`VARIANTS` setting): GELU and average pooling instead of ReLU and max-pooling;
    ``batch_norm=False``: no BatchNorm layers."""

    def __init__(
        self,
        c1: int = 8,
        c2: int = 16,
        dropout: float = 0.1,
        classes: int = 10,
        smooth: bool = False,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        act = nn.GELU if smooth else nn.ReLU
        norm = nn.BatchNorm2d if batch_norm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            norm(c1),
            act(),
            nn.AvgPool2d(2) if smooth else nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            norm(c2),
            act(),
            nn.Flatten(),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(c2 * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TextEncoder(nn.Module):
    """Token + position embeddings -> one Transformer encoder layer (self-attention with the padding mask, LayerNorm,
    feed-forward with ``activation``, dropout) -> mean over the real tokens -> Linear. Token id 0 is padding."""

    def __init__(
        self,
        vocab: int,
        length: int,
        dim: int = 32,
        heads: int = 2,
        classes: int = 6,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.1, batch_first=True, activation=activation
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == 0
        h = self.encoder(self.embed(tokens) + self.position[: tokens.shape[-1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(-2) / keep.sum(-2).clamp_min(1.0))


def gpt2(vocab: int, length: int, dim: int = 64, layers: int = 2, heads: int = 4) -> nn.Module:
    """A small GPT-2 (``transformers.GPT2LMHeadModel`` from a ``GPT2Config``; nothing downloaded): ``layers``
    blocks of width ``dim`` with ``heads`` attention heads, ``length`` positions, the output layer tied to the
    token embedding, dropout 0.1 (the config's defaults), float32, PyTorch's default attention kernel (SDPA)."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=length, n_embd=dim, n_layer=layers, n_head=heads,
        bos_token_id=LM_EOS, eos_token_id=LM_EOS,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _mlp(sizes: tuple[int, ...], activation: type[nn.Module] = nn.ReLU) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers[:-1])


# --------------------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How a model is trained: :func:`fit_minibatch`'s settings.

    ``weight_decay`` is the task's L2 term (in the objective that influence sees) for ``"adam"``/``"sgd"``; for
    ``"adamw"`` it is AdamW's decoupled decay, which is not part of the objective (the task then has no L2 term and
    the curvature's damping stands in for it)."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class Problem:
    """One catalogue problem: a data set, an architecture, a recipe. ``arch`` holds the architecture's settings."""

    name: str
    data_kind: str  # "digits" | "digits-image" | "breast-cancer" | "docstrings" | "docstrings-lm"
    model_kind: str  # "mlp" | "mlp-gelu" | "cnn" | "text" | "gpt2"
    arch: tuple = ()
    n_train: int = 1000
    n_test: int = 200
    split_seed: int = 0
    recipe: Recipe = field(default_factory=Recipe)
    description: str = ""

    # -- identity --------------------------------------------------------------------------------------------
    def key(self) -> str:
        """A short cache name: the problem's name, sizes and a hash of every setting."""
        settings = asdict(self)
        settings.pop("description")
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return f"{self.name}-{self.n_train}-{self.n_test}-{digest}"

    # -- pieces ----------------------------------------------------------------------------------------------
    def data(self) -> tuple[tuple, tuple]:
        if self.data_kind == "digits":
            return digits_data(self.n_train, self.n_test, self.split_seed)
        if self.data_kind == "digits-image":
            return digits_data(self.n_train, self.n_test, self.split_seed, image=True)
        if self.data_kind == "breast-cancer":
            return breast_cancer_data(self.n_train, self.n_test, self.split_seed)
        if self.data_kind == "docstrings":
            vocab, length = self.arch[0], self.arch[1]
            return docstring_data(self.n_train, self.n_test, self.split_seed, vocab, length)
        if self.data_kind == "docstrings-lm":
            vocab, length = self.arch[0], self.arch[1]
            return docstring_lm_data(self.n_train, self.n_test, self.split_seed, vocab, length)
        raise ValueError(f"unknown data_kind {self.data_kind!r}")

    def task(self) -> datatrace.Task:
        """The loss training minimises per example and influence sees: cross-entropy plus the recipe's L2 term for
        the classifiers; for the language model the sequence's summed next-token NLL (``CausalLMTask()``), its
        AdamW decay being decoupled (:class:`Recipe`)."""
        decay = 0.0 if self.recipe.optimizer == "adamw" else self.recipe.weight_decay
        if self.model_kind == "gpt2":
            from datatrace.hf import CausalLMTask

            return CausalLMTask(weight_decay=decay)
        return datatrace.ClassificationTask(weight_decay=decay)

    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised float32 model (PyTorch's default init under ``torch.manual_seed(seed)``)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.model_kind == "mlp":
                return _mlp(self.arch)
            if self.model_kind == "mlp-gelu":
                return _mlp(self.arch, nn.GELU)
            if self.model_kind == "cnn":
                return DigitsCNN(*self.arch)
            if self.model_kind == "text":
                return TextEncoder(*self.arch)
            if self.model_kind == "gpt2":
                return gpt2(*self.arch)
        raise ValueError(f"unknown model_kind {self.model_kind!r}")

    def train_fn(self) -> Trainer:
        return Trainer(self)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.build_model(0).parameters())

    def summary(self) -> str:
        return f"{self.name}: {self.description} ({self.num_params():,} parameters, {self.n_train} train / {self.n_test} test)"


class Trainer:
    """Picklable ``train_fn(data, seed) -> model``: a fresh model from ``seed``, trained by the problem's recipe."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem

    def __call__(self, data: Any, seed: int = 0) -> nn.Module:
        r = self.problem.recipe
        with torch.random.fork_rng(devices=[]):
            torch.set_num_threads(1)
            model = self.problem.build_model(seed)
            return fit_minibatch(
                model,
                self.problem.task(),
                data,
                epochs=r.epochs,
                batch_size=r.batch_size,
                lr=r.lr,
                optimizer=r.optimizer,
                weight_decay=r.weight_decay if r.optimizer == "adamw" else 0.0,
                seed=seed,
                copy_model=False,
            )


def _digits_mlp(name: str, hidden: tuple[int, ...], description: str, **kw: Any) -> Problem:
    return Problem(name, "digits", "mlp", (64, *hidden, 10), description=description, **kw)


#: the catalogue, full size (benchmarks)
CATALOGUE: dict[str, Problem] = {
    p.name: p
    for p in (
        _digits_mlp("mlp-small", (32,), "digits, MLP 64-32-10 ReLU, Adam 30 epochs, batch 32"),
        _digits_mlp("mlp-large", (128,), "digits, MLP 64-128-10 ReLU, Adam 30 epochs, batch 32"),
        Problem(
            "tabular",
            "breast-cancer",
            "mlp",
            (30, 64, 32, 2),
            n_train=400,
            n_test=169,
            recipe=Recipe(epochs=40),
            description="breast cancer (30 standardised features), MLP 30-64-32-2 ReLU, Adam 40 epochs, batch 32",
        ),
        Problem(
            "cnn",
            "digits-image",
            "cnn",
            (8, 16, 0.1, 10),
            recipe=Recipe(epochs=20, lr=3e-3),
            description="digits 8x8 images, Conv-BN-ReLU-pool-Conv-BN-ReLU-dropout-Linear, Adam 20 epochs, batch 32",
        ),
        Problem(
            "text",
            "docstrings",
            "text",
            (1000, 32, 32, 2, len(DOCSTRING_GROUPS)),
            n_train=1200,
            n_test=200,
            recipe=Recipe(epochs=15, lr=2e-3),
            description="stdlib docstrings by module group (6 classes), Embedding + Transformer encoder layer "
            "(attention with padding mask, LayerNorm, dropout) + mean pooling, Adam 15 epochs, batch 32",
        ),
        Problem(
            "lm",
            "docstrings-lm",
            "gpt2",
            (LM_VOCAB, LM_LENGTH, 64, 2, 4),
            n_train=LM_TRAIN,
            n_test=LM_TEST,
            recipe=Recipe(epochs=LM_EPOCHS, batch_size=32, lr=LM_LR, optimizer="adamw", weight_decay=0.01),
            description=f"stdlib docstrings as a word stream cut into {LM_LENGTH}-token sequences (vocabulary "
            f"{LM_VOCAB}), GPT-2 (2 layers, width 64, 4 heads, dropout 0.1, tied output layer), AdamW "
            f"(decoupled decay 0.01) {LM_EPOCHS} epochs, batch 32; loss: summed next-token NLL per sequence",
        ),
    )
}


def _variant(base: str, name: str, arch: tuple, description: str, model_kind: str | None = None) -> Problem:
    """Catalogue problem ``base`` with another architecture setting (same data, split and recipe)."""
    original = CATALOGUE[base]
    kind = model_kind or original.model_kind
    return replace(original, name=name, model_kind=kind, arch=arch, description=description)


#: variants outside the catalogue (not in its tables): the same data and recipe with a smooth activation, for
#: the metagradient's single-model study (``bench_metagradient.py``; a ReLU network's training run is not a
#: differentiable function of its data weights, a GELU network's is)
VARIANTS: dict[str, Problem] = {
    p.name: p
    for p in (
        _variant(
            "mlp-small",
            "mlp-small-gelu",
            (64, 32, 10),
            "digits, MLP 64-32-10 GELU, Adam 30 epochs, batch 32 (mlp-small with a smooth activation)",
            model_kind="mlp-gelu",
        ),
        _variant(
            "cnn",
            "cnn-gelu",
            (8, 16, 0.1, 10, True),
            "the cnn problem with GELU and average pooling instead of ReLU and max-pooling",
        ),
        _variant(
            "cnn", "cnn-gelu-no-bn", (8, 16, 0.1, 10, True, False), "cnn-gelu without its BatchNorm layers"
        ),
        _variant(
            "text",
            "text-gelu",
            (1000, 32, 32, 2, len(DOCSTRING_GROUPS), "gelu"),
            "the text problem with GELU in the encoder layer's feed-forward instead of ReLU",
        ),
    )
}


def problem(name: str, scale: str = "full") -> Problem:
    """A catalogue problem (or a :data:`VARIANTS` one) by name; ``scale="ci"`` shrinks the data and the budget
    for the test suite."""
    known = {**CATALOGUE, **VARIANTS}
    if name not in known:
        raise ValueError(f"unknown catalogue problem {name!r}; expected one of {sorted(known)}")
    full = known[name]
    if scale == "full":
        return full
    if scale != "ci":
        raise ValueError(f"scale must be 'full' or 'ci', got {scale!r}")
    small = {"n_train": min(full.n_train, 120), "n_test": min(full.n_test, 16)}
    recipe = Recipe(**{**asdict(full.recipe), "epochs": 3})
    return Problem(**{**asdict(full), **small, "recipe": recipe, "name": full.name + "-ci"})


# --------------------------------------------------------------------------------------------------------------
# Trained models and ground truth (cached)
# --------------------------------------------------------------------------------------------------------------
def trained(p: Problem, seed: int = 0) -> nn.Module:
    """The model trained on all of ``p``'s training data from ``seed``, cached as a state dict (safetensors)."""
    from safetensors.torch import load_model, save_model

    path = CACHE_DIR / p.key() / f"model-seed{seed}.safetensors"
    model = p.build_model(seed)
    if path.exists():
        load_model(model, path)  # save_model/load_model: GPT-2's output layer shares the embedding's tensor
        return model.eval()
    model = p.train_fn()(p.data()[0], seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_model(model, str(tmp))
    tmp.replace(path)
    return model.eval()


def ground_truth(
    p: Problem, n_subsets: int = 50, n_seeds: int = 2, n_jobs: int = 2, progress: bool = True
) -> retrain.SubsetResult:
    """Query losses of models retrained from scratch on ``n_subsets`` random half subsets x ``n_seeds`` seeds."""
    train, query = p.data()
    return retrain.subsets(
        p.train_fn(),
        train,
        retrain.evaluator(p.task(), query),
        n_subsets=n_subsets,
        fraction=0.5,
        n_seeds=n_seeds,
        random_state=0,
        n_jobs=n_jobs,
        cache_dir=CACHE_DIR / p.key() / f"subsets-{n_subsets}x{n_seeds}",
        progress=progress,
    )


def accuracy(model: nn.Module, data: Any) -> float:
    """Test accuracy; for the language model the share of next tokens predicted right (argmax)."""
    with torch.no_grad():
        if isinstance(data, dict):
            ids = data["input_ids"]
            logits = model(input_ids=ids).logits[:, :-1]
            return float((logits.argmax(-1) == ids[:, 1:]).float().mean())
        return float((model(data[0]).argmax(-1) == data[1]).float().mean())


def perplexity(model: nn.Module, data: dict) -> float:
    """A language model's perplexity on ``data``: exp of the mean next-token NLL (nats per token)."""
    with torch.no_grad():
        ids = data["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(nll.exp())


Score = Callable[[np.ndarray], float]

__all__ = [
    "CATALOGUE",
    "DOCSTRING_GROUPS",
    "VARIANTS",
    "DigitsCNN",
    "Problem",
    "Recipe",
    "TextEncoder",
    "Trainer",
    "accuracy",
    "breast_cancer_data",
    "digits_data",
    "docstring_data",
    "docstring_lm_data",
    "gpt2",
    "ground_truth",
    "perplexity",
    "problem",
    "trained",
]
