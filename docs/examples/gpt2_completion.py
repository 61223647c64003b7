"""Which training documents made a small GPT-2 write that completion, and through which of their words?

    python docs/examples/gpt2_completion.py            # about a minute on two CPU cores
    python docs/examples/gpt2_completion.py --small    # a few seconds (the setting the tests run)

1. Real text available offline: the docstrings of a few standard-library modules (``statistics``, ``heapq``,
   ``textwrap``...), cut into sentences, one training document per sentence, with a word-level vocabulary built
   here (the most frequent words; the rest is ``<unk>``). Documents are right-padded to one length (attention mask
   0, labels -100), the form a tokenizer with ``padding="max_length"`` gives.
2. A GPT-2 built from ``transformers.GPT2Config`` (no download) is trained on them with AdamW on Hugging Face's
   own loss (the mean next-token cross-entropy of a batch).
3. A prompt (the opening words of a training sentence) is completed greedily by the model, and the completion
   is attributed to the training documents with ``datatrace.InfluenceFunction(model, CausalLMTask())`` and its
   default curvature (``"auto"``): ``score[q, i] ~`` the change of ``-log p(completion | prompt)`` (nats) if
   document ``i`` were removed and the model retrained; positive: document ``i`` made the completion more likely
   (a proponent).
4. ``datatrace.apps.tokens.token_influence`` splits each top document's score over the tokens it predicts (the
   parts sum to the score exactly); the most influential tokens are printed marked ``[[word +0.012]]``.

Weight decay: Hugging Face's loss is a mean over the tokens of a batch, CausalLMTask's a sum per sequence, so
AdamW's ``weight_decay = w`` is stated to datatrace as ``w * (mean tokens per document)`` (datatrace.hf). AdamW's
decay is decoupled from the gradient, so this is the usual approximation, not an identity.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import re
import time

import torch

import datatrace
from datatrace.apps.tokens import token_influence
from datatrace.hf import IGNORE_INDEX, CausalLMTask, prompt_completion

#: the modules whose docstrings (the module's and its public functions' and classes') are the training text
MODULES = (
    "statistics", "heapq", "bisect", "textwrap", "string", "fractions", "decimal", "random", "json", "csv",
    "functools", "itertools", "collections", "argparse", "logging", "pathlib", "dataclasses", "inspect",
)  # fmt: skip
PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
WORD = re.compile(r"[a-z]+|[0-9]+|[.,:;()]")

SETTINGS = {
    # documents, vocabulary, tokens per document, GPT-2 size, training epochs
    "small": {"n_docs": 32, "vocab": 80, "length": 10, "n_layer": 1, "n_embd": 16, "epochs": 25},
    "full": {"n_docs": 240, "vocab": 400, "length": 14, "n_layer": 2, "n_embd": 48, "epochs": 25},
}


def sentences() -> list[list[str]]:
    """The standard-library docstrings as lower-case word sequences, one per sentence (at least 5 words), in a
    fixed order (module by module, names sorted)."""
    out = []
    for name in MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""]
        for attr in sorted(dir(module)):
            obj = getattr(module, attr)
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                if getattr(obj, "__module__", None) == name:
                    docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            for sentence in re.split(r"(?<=[.!?])\s+|\n\s*\n", doc):
                words = WORD.findall(sentence.lower())
                if sum(w.isalpha() for w in words) >= 5 and words not in out:
                    out.append(words)
    return out


def build_data(n_docs: int, vocab_size: int, length: int) -> tuple[dict, list[str], list[list[str]]]:
    """``(train, vocabulary, documents)``: ``train`` the tokenised documents as a dict of ``(n, length)`` columns
    (``input_ids`` starting with ``<bos>``, ``attention_mask``, ``labels`` -100 on padding)."""
    docs = [words[: length - 1] for words in sentences()[:n_docs]]
    counts = collections.Counter(w for words in docs for w in words)
    vocab = [PAD, UNK, BOS] + [w for w, _ in counts.most_common(vocab_size - 3)]
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.zeros(len(docs), length, dtype=torch.long)
    mask = torch.zeros(len(docs), length, dtype=torch.long)
    for row, words in enumerate(docs):
        tokens = [index[BOS]] + [index.get(w, index[UNK]) for w in words]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    train = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}
    return train, vocab, docs


class Documents(torch.utils.data.Dataset):
    """Items ``{column: values[i]}``: the form of a tokenised Hugging Face dataset."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def train_gpt2(train: dict, vocab_size: int, setting: dict, weight_decay: float, seed: int = 0):
    """A GPT-2 from its config, trained with AdamW on Hugging Face's mean next-token loss."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=train["input_ids"].shape[1],
        n_layer=setting["n_layer"],
        n_embd=setting["n_embd"],
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=weight_decay)
    loader = torch.utils.data.DataLoader(Documents(train), batch_size=16, shuffle=True)
    model.train()
    for _ in range(setting["epochs"]):
        for batch in loader:
            loss = model(**batch).loss  # Hugging Face's own loss: the mean over the batch's labelled tokens
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def greedy_completion(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The ``steps`` most likely next tokens after ``prompt``, one at a time."""
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids[None]).logits[0, -1]
            logits[:3] = -torch.inf  # never <pad>, <unk> or <bos>
            ids = torch.cat([ids, logits.argmax().reshape(1)])
    return ids[len(prompt) :]


def marked(words: list[str], parts: torch.Tensor, top: int) -> str:
    """The document (``<bos>`` first) with its ``top`` most influential tokens (by |part|) marked
    ``[[word +0.012]]``; ``parts`` holds one value per position, padding included."""
    tokens = [BOS, *words]
    parts = parts[: len(tokens)]
    strongest = set(parts.abs().topk(min(top, len(parts))).indices.tolist())
    return " ".join(f"[[{w} {float(parts[t]):+.3g}]]" if t in strongest else w for t, w in enumerate(tokens))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a few seconds: the setting the tests run")
    parser.add_argument("--top", type=int, default=5, help="training documents shown")
    parser.add_argument("--completion", type=int, default=3, help="tokens the model completes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    setting = SETTINGS["small" if args.small else "full"]

    # 1. text and vocabulary
    train, vocab, docs = build_data(setting["n_docs"], setting["vocab"], setting["length"])
    tokens_per_doc = float(train["attention_mask"].sum(1).sub(1).double().mean())  # predicted tokens
    adamw_decay = 1e-2
    task = CausalLMTask(weight_decay=adamw_decay * tokens_per_doc)

    # 2. train
    start = time.perf_counter()
    model = train_gpt2(train, len(vocab), setting, adamw_decay)
    train_seconds = time.perf_counter() - start

    # 3. a completion of the opening words of a training sentence, attributed with the default curvature
    source = 1  # the document whose opening words are the prompt
    prompt = train["input_ids"][source, :4]
    completion = greedy_completion(model, prompt, args.completion)
    query = {k: v[None] for k, v in prompt_completion(prompt, completion).items()}
    start = time.perf_counter()
    influence = datatrace.InfluenceFunction(model, task, progress=False).fit(Documents(train))
    scores = influence.score(query)
    fit_seconds = time.perf_counter() - start
    values = scores.values[0]
    top = values.topk(min(args.top, len(values))).indices

    # 4. the top documents' scores, token by token
    start = time.perf_counter()
    parts = token_influence(influence, query, top)[0]  # (top, length)
    token_seconds = time.perf_counter() - start

    words = lambda ids: " ".join(vocab[int(i)] for i in ids)  # noqa: E731
    info = influence.curvature_.info
    route = info.get("auto_choice", scores.metadata["route"])
    fisher = f" (fisher={info['fisher']!r})" if "fisher" in info else ""
    total = sum(p.numel() for p in model.parameters())
    print(
        f"{len(docs)} documents, {len(vocab)} words, GPT-2 with {total:,} parameters trained in "
        f"{train_seconds:.1f} s.\nPrompt: {words(prompt[1:])!r} -> completion {words(completion)!r}.\n"
        f"curvature='auto' chose {route!r}{fisher} on {influence.functional_model.num_params:,} parameters, "
        f"{len(influence.params_left_out_)} tensors left out; scores in {fit_seconds:.1f} s, units "
        f"{scores.metadata['units']!r}.\nWhy: {info.get('auto_reason')}\n\nscore = change of "
        "-log p(completion | prompt) in nats if the document were removed and the model retrained (positive: it "
        "made the completion more likely); [[word part]]: the strongest parts of the score by token.\n"
    )
    for rank, (i, row) in enumerate(zip(top.tolist(), parts)):
        print(f"{rank + 1}. document {i} ({float(values[i]):+.4g}): {marked(docs[i], row, 3)}")
    return {
        "vocab": vocab,
        "documents": docs,
        "prompt": prompt,
        "completion": completion,
        "query": query,
        "scores": scores,
        "top": top,
        "token_parts": parts,
        "influence": influence,
        "model": model,
        "seconds": {"train": train_seconds, "influence": fit_seconds, "tokens": token_seconds},
    }


if __name__ == "__main__":
    main()
