"""Ready tasks for Hugging Face ``transformers`` models, on their data as it is (dicts of tensors).

``transformers`` is an optional extra (``pip install "datatrace[hf]"``); this module never imports it: the tasks
call the model as ``model(**inputs)`` and read ``.logits`` from what it returns, so any model with that interface
works. A ``Dataset`` whose items are dicts (``{"input_ids": ..., "attention_mask": ..., "labels": ...}``, e.g. a
``datasets.Dataset`` with ``with_format("torch")``, or a list of tokenizer outputs) gives dict batches, which every
route passes to the task unchanged.

**Sequence classification** (:class:`SequenceClassificationTask`): ``l_i = -log softmax(z_i)[y_i]`` with
``z_i = model(**inputs_i).logits`` (the inputs are the batch without its labels, so the model never computes its
own batch-mean loss); the measurement is the query's loss; sampled targets are drawn from ``softmax(z_i)``. It is
:class:`~datatrace.ClassificationTask` (closed-form output Hessian, label checks) reading the labels at
``label_key``.

**Causal language modelling** (:class:`CausalLMTask`): with logits ``z_t`` at position ``t`` (which predict token
``t + 1``) and targets ``y_t`` = the labels (``input_ids`` when the batch has no labels) shifted by one, the
per-example loss is the sequence's **summed** negative log-likelihood over its valid next-token positions,

    l_i = - sum_{t : m_it = 1} log softmax(z_it)[y_i,t+1],
    m_it = [y_i,t+1 != -100] * [attention_mask_i,t+1 = 1] * [attention_mask_i,t = 1],

in nats. The sum, not the mean over tokens, so that the measurement is a log-likelihood in natural units: for a
query whose labels are -100 on a prompt, the measurement is ``-log p(completion | prompt)`` and ``score[q, i]`` is
the leave-one-out change of that negative log-likelihood (positive: removing sequence ``i`` would make the
completion less likely). The training objective is then ``(1/n) sum_i l_i + lambda/2 ||theta||^2`` with sequences as
the examples. Hugging Face's own loss is the mean over all tokens of a batch, so a model trained with AdamW's
``weight_decay = w`` on that loss has ``lambda ~ w * (mean valid tokens per sequence)`` in these units: the
regulariser enters the curvature as given, so state ``weight_decay=`` in them.

The output space of a causal LM is ``T x V`` per example. ``fisher="ggn"`` (K-FAC/EK-FAC's default) forms the
exact block-diagonal output Hessian ``diag_t(diag(p_t) - p_t p_t^T)`` and backpropagates one column per valid
position and vocabulary entry, affordable only for short sequences and small vocabularies (K-FAC refuses above
1024 outputs); ``fisher="sampled"`` (one next token drawn per valid position from the model,
:meth:`CausalLMTask.sample_targets`) costs one backward pass per sample and is the choice for language models:
``InfluenceFunction(model, CausalLMTask(), curvature=EKFAC(fisher="sampled"))``. ``curvature="auto"`` takes it by
itself above 1024 outputs per sequence (:mod:`datatrace.curvature.auto`); it takes EK-FAC on the supported layers
only when no route covering every parameter (Arnoldi, CG) is predicted to fit its time budget, so a small model
may get Arnoldi instead (docs/examples/gpt2_completion.py shows both).

**Padding changes nothing** (right or left padding, attention mask 0, labels -100;
tests/hf/test_hf_lm_properties.py, tests/hf/test_hf_architectures.py): left-padded sequences reach the model
right-aligned (:meth:`CausalLMTask.outputs`), so their tokens keep the positions of the unpadded sequence;
padded positions enter neither the loss, the gradients nor EK-FAC's weighted factors; the sampled Fisher draws
only at counted positions, and ``damping="auto"`` counts only the outputs the loss depends on
(:meth:`CausalLMTask.output_counts`). The exception is K-FAC's plain-mean input factor (``KFAC()``'s default),
which averages the inputs over every position, padding included.

**Which routes run** (measured on a one-layer BERT and GPT-2 built from their configs, transformers 5, CPU,
float64, default SDPA attention): every route. K-FAC/EK-FAC and :class:`~datatrace.ProjectedInfluence` with a
:class:`~datatrace.FactorizedProjector` cover the Linear / Conv1D layers and leave out, by name, the embeddings,
LayerNorm (GPT-2's ``lm_head``, whose weight is the token embedding's, is covered through its own use: a copy in
the working model, :func:`datatrace.capture.scope.untie_output_layers`); these are the fast routes. The
matrix-free routes (CG, LiSSA, Arnoldi, diagonal), TracIn and the random projection (``projector="auto"`` when some
parameter is outside the supported layers and the dense matrix fits the projector's cache, hence TRAK; above it
the factorised one on the supported layers) run on every parameter, more slowly: ``vmap`` over examples
fails in the attention-mask code (it branches on ``padding_mask.all()``, with eager attention too), so per-example
gradients are computed one example at a time, and SDPA has no forward-mode AD, so Hessian-vector products use
double backward with the reference attention kernel (the same numbers as ``attn_implementation="eager"``). The
dense routes (``"exact"``, ``"gauss-newton"``) refuse the ``p x p`` matrix by its size and run with ``params=``
restricted to a few layers.

Example (a completion's negative log-likelihood, traced to the training sequences):
    >>> import torch, transformers, datatrace  # doctest: +SKIP
    >>> from datatrace.hf import CausalLMTask, prompt_completion
    >>> from datatrace.curvature.kfac import EKFAC
    >>> config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32)  # doctest: +SKIP
    >>> model = transformers.GPT2LMHeadModel(config)  # doctest: +SKIP
    >>> train = {"input_ids": torch.randint(0, 100, (16, 8))}  # a tokenizer's output, padded, works as is
    >>> inf = datatrace.InfluenceFunction(model, CausalLMTask(), curvature=EKFAC(fisher="sampled"),
    ...                                   progress=False).fit(train)  # doctest: +SKIP
    >>> query = prompt_completion(torch.tensor([5, 17]), torch.tensor([3, 42]))
    >>> inf.score({k: v[None] for k, v in query.items()}).values.shape  # doctest: +SKIP
    torch.Size([1, 16])
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from datatrace.errors import bad_value
from datatrace.tasks import ClassificationTask, RegressionTask, Task, with_targets

logger = logging.getLogger(__name__)

#: the label value that marks a position without a target (cross-entropy's ``ignore_index`` in transformers)
IGNORE_INDEX = -100
#: the model inputs with one entry per position, rolled with the attention mask when a batch is left-padded
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
#: above this many outputs per sequence (positions x vocabulary) the exact output Hessian (``fisher="ggn"``) is
#: refused: it backpropagates one pseudo-gradient per output (K-FAC's own limit is lower, 1024)
MAX_EXACT_OUTPUTS = 4096


def _require_dict(batch: Any, who: str) -> Mapping:
    if not isinstance(batch, Mapping):
        raise bad_value(
            "data",
            f"a batch of type {type(batch).__name__}",
            f"{who} reads dict batches (keys such as 'input_ids', 'attention_mask', 'labels': the Hugging Face form)",
            "pass a Dataset whose items are dicts of tensors (e.g. datasets.Dataset.with_format('torch'), or a "
            "list of tokenizer outputs), or use ClassificationTask for (x, y) tuples",
        )
    return batch


def _require_labels(batch: Mapping, label_key: str, who: str) -> None:
    """A dict batch without ``label_key`` refused by the task's own argument (``label_key=``), naming a likely key
    (``datasets`` names the column ``label``)."""
    if label_key in batch:
        return
    likely = [k for k in batch if k in ("label", "labels", "label_ids", "target", "targets", "y")]
    raise bad_value(
        "label_key",
        label_key,
        f"the batch is a dict with keys {sorted(batch)}, none of them {label_key!r}",
        f"pass {who}(label_key={likely[0]!r})"
        if likely
        else f"name the key of the labels: {who}(label_key=...)",
    )


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: ``output.logits`` (a ``ModelOutput``), ``output[0]`` (``return_dict=False``)
    or the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise bad_value(
        "model",
        f"a model returning {type(output).__name__}",
        "the Hugging Face tasks need the model's output to have .logits (or be a tensor or a tuple led by it)",
        "pass a *ForSequenceClassification / *ForCausalLM model, or write a Task subclass",
    )


def check_model_inputs(
    model: nn.Module, batch: Mapping, who: str, indices: torch.Tensor | None = None
) -> None:
    """What the model's embeddings would otherwise refuse with a bare ``IndexError``: ``input_ids`` outside
    ``0 <= id < config.vocab_size``, and sequences longer than ``config.max_position_embeddings``."""
    config = getattr(model, "config", None)
    ids = batch.get("input_ids")
    if config is None or not isinstance(ids, torch.Tensor) or ids.dim() < 2:
        return
    limit = getattr(config, "max_position_embeddings", None)
    offset = _position_offset(model) if isinstance(limit, int) else 0
    if isinstance(limit, int) and ids.shape[1] > limit - offset:
        why = (
            f", less padding_idx + 1 = {offset}: its positions are counted from after the padding index, as in RoBERTa"
            if offset
            else ""
        )
        raise bad_value(
            "data",
            f"sequences of {ids.shape[1]} tokens",
            f"the model ({type(model).__name__}) has position embeddings for {limit - offset} tokens "
            f"(config.max_position_embeddings = {limit}{why})",
            f"truncate the sequences to at most {limit - offset} tokens (tokenizer(..., truncation=True, "
            f"max_length={limit - offset}))",
        )
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and not ids.is_floating_point():
        bad = (ids < 0) | (ids >= vocab)
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            where = (
                f"example {int(indices[row])}" if indices is not None and row < len(indices) else f"row {row}"
            )
            raise ValueError(
                f"input_ids holds {int(ids[row, col])} at {where}, position {col}, outside the vocabulary of "
                f"{type(model).__name__} (token ids 0..{vocab - 1}, config.vocab_size = {vocab}) that {who} is "
                "given. Fix: tokenise with the tokenizer of this model, or pad with a token id of the vocabulary."
            )


def _position_offset(model: nn.Module) -> int:
    """``padding_idx + 1`` for embeddings that number positions from after the padding index (RoBERTa and its
    family: ``create_position_ids_from_input_ids``), so that only ``max_position_embeddings - padding_idx - 1``
    tokens fit; else 0."""
    for module in model.modules():
        padding_idx = getattr(module, "padding_idx", None)
        if callable(getattr(module, "create_position_ids_from_input_ids", None)) and isinstance(
            padding_idx, int
        ):
            return padding_idx + 1
    return 0


def attention_positions(batch: Any) -> torch.Tensor | None:
    """The batch's ``attention_mask`` as booleans ``(b, T)`` (True: a real token), or ``None`` without one."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return None if mask is None else mask.bool()


def left_padding(batch: Mapping) -> torch.Tensor | None:
    """Per example, its number of leading padded positions (``attention_mask`` 0 before the first real token),
    shape ``(b,)``; ``None`` without a 2-d attention mask."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return (mask.cumsum(dim=1) == 0).sum(dim=1)


def shift_positions(x: torch.Tensor, offsets: torch.Tensor, sign: int) -> torch.Tensor:
    """Each row ``x[i]`` rolled along the positions (dim 1) so that position ``t`` reads ``x[i, t + sign *
    offsets[i]]`` (cyclically): ``sign=1`` moves left padding to the right end, ``sign=-1`` moves it back. A gather,
    without branching on the values (``torch.func`` transforms run it too)."""
    T = x.shape[1]
    idx = (torch.arange(T, device=x.device)[None, :] + sign * offsets.to(x.device)[:, None]) % T
    idx = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, idx)


def model_inputs(batch: Mapping, label_key: str) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model: the batch without its labels (so the model computes no loss)."""
    return {k: v for k, v in batch.items() if k != label_key}


def right_aligned(batch: Mapping, label_key: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """:func:`model_inputs` with left-padded sequences moved to the left end (the inputs of :data:`TOKEN_INPUTS`
    rolled by the example's :func:`left_padding`; other inputs, e.g. ``pixel_values``, as they are), and those
    offsets (``None`` without an attention mask).

    The real tokens then sit at positions ``0..L-1`` as in the unpadded sequence (the ``position_ids`` of
    ``generate``; absolute position embeddings would otherwise see them shifted), and no real token follows a padded
    one, so eager attention in float64 meets no fully masked row (NaN). Right-padded batches are unchanged."""
    inputs = model_inputs(batch, label_key)
    offsets = left_padding(batch)
    if offsets is not None:
        shape = batch["attention_mask"].shape
        inputs = {
            k: shift_positions(v, offsets, 1)
            if k in TOKEN_INPUTS and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[:2] == shape
            else v
            for k, v in inputs.items()
        }
    return inputs, offsets


def call_model(model: nn.Module, inputs: Mapping) -> Any:
    """``model(**inputs)``, with transformers' refusal of a decoder-only classifier without a padding token made
    a message naming the fix."""
    try:
        return model(**inputs)
    except ValueError as err:
        if "no padding token is defined" not in str(err):
            raise
        raise bad_value(
            "model",
            type(model).__name__,
            "config.pad_token_id is None, and this classifier finds each sequence's last token by the padding id "
            "(transformers refuses batches of more than one sequence without it)",
            "set model.config.pad_token_id = tokenizer.pad_token_id (often tokenizer.eos_token_id for GPT-2 or "
            "Llama) before passing the model",
        ) from err


def aligned_positions(batch: Any) -> torch.Tensor | None:
    """The attention mask as the model sees it (:func:`right_aligned`): padded positions are not data."""
    mask = attention_positions(batch)
    offsets = left_padding(batch) if mask is not None else None
    return mask if offsets is None else shift_positions(mask, offsets, 1)


class _SequenceLabels:
    """What the sequence tasks share on top of their built-in task: dict batches, labels at ``label_key`` (checked
    by name), and the attention mask as the model sees it as the position mask."""

    def __init__(self, weight_decay: float | Mapping[str, float] = 0.0, *, label_key: str = "labels") -> None:
        super().__init__(weight_decay, target_key=label_key)  # type: ignore[call-arg]
        self.label_key = label_key

    def position_mask(self, batch: Any) -> torch.Tensor | None:
        """The attention mask as the model sees it (:func:`right_aligned`): padded positions are not data."""
        return aligned_positions(batch)

    def _reads_dicts(self) -> bool:
        return True

    def _targets(self, batch: Any) -> torch.Tensor:
        _require_labels(_require_dict(batch, type(self).__name__), self.label_key, type(self).__name__)
        return super()._targets(batch)  # type: ignore[misc]


class SequenceClassificationTask(_SequenceLabels, ClassificationTask):
    """Cross-entropy of ``model(**inputs).logits`` against ``batch[label_key]``, one value per sequence.

    The batch is a dict (``input_ids``, ``attention_mask``, ``token_type_ids``... and the labels); every key but
    ``label_key`` is passed to the model. Labels are class indices ``0 <= y < num_labels`` (checked on every batch,
    :meth:`~datatrace.ClassificationTask.check_batch`); the output Hessian and the sampled targets (softmax) have
    closed forms. The measurement is the query's loss, ``-log p(y_q | x_q)`` in nats.

    Args:
        weight_decay: the L2 strength the model was trained with (:class:`~datatrace.Task`).
        label_key: the key of the labels (default ``"labels"``).
    """

    def check_batch(self, model: nn.Module, batch: Any, indices: torch.Tensor | None = None) -> Any:
        """:func:`check_model_inputs` (token ids in the vocabulary, sequences within the position embeddings), a
        model whose ``config.problem_type`` is not single-label classification refused by name, labels per token
        (a language model's) refused, then :meth:`ClassificationTask.check_batch
        <datatrace.ClassificationTask.check_batch>` (labels)."""
        batch = _require_dict(batch, type(self).__name__)
        check_model_inputs(model, batch, type(self).__name__, indices)
        config = getattr(model, "config", None)
        problem = getattr(config, "problem_type", None)
        labels = batch.get(self.label_key)
        if problem is None and getattr(config, "num_labels", None) == 1:
            if isinstance(labels, torch.Tensor) and labels.is_floating_point():
                problem = "regression"  # what transformers infers: one output, real-valued labels
        fixes = {
            "regression": "use datatrace.hf.SequenceRegressionTask (squared error of the logits against the labels)",
            "multi_label_classification": "write a datatrace.Task subclass whose outputs are datatrace.hf.logits_of("
            "model(**datatrace.hf.model_inputs(batch, 'labels'))) and whose loss_from_outputs is the summed binary "
            "cross-entropy, torch.nn.functional.binary_cross_entropy_with_logits(outputs, batch['labels'], "
            "reduction='none').sum(dim=1)",
        }
        if problem in fixes:
            raise bad_value(
                "task",
                type(self).__name__,
                f"{type(model).__name__} has config.problem_type={problem!r}, and SequenceClassificationTask is "
                "the cross-entropy of one class index per sequence (problem_type 'single_label_classification')",
                fixes[problem],
            )
        ids = batch.get("input_ids")
        if (
            isinstance(labels, torch.Tensor)
            and isinstance(ids, torch.Tensor)
            and labels.dim() == 2
            and labels.shape == ids.shape
            and labels.shape[1] > 1
            and not labels.is_floating_point()
        ):
            raise bad_value(
                self.label_key,
                labels,
                "one label per token (a language model's labels); SequenceClassificationTask takes one class index "
                "per sequence",
                "use datatrace.hf.CausalLMTask with a *ForCausalLM model, or labels of shape (batch,)",
            )
        return super().check_batch(model, batch, indices)

    def outputs(self, model: nn.Module, batch: Mapping) -> torch.Tensor:
        """``model(**inputs).logits``, shape ``(b, num_labels)``; left-padded sequences are given right-aligned
        (:func:`right_aligned`), so left padding changes no score."""
        batch = _require_dict(batch, type(self).__name__)
        return logits_of(call_model(model, right_aligned(batch, self.label_key)[0]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight_decay={self.weight_decay!r}, label_key={self.label_key!r})"


class SequenceRegressionTask(_SequenceLabels, RegressionTask):
    """Squared error of ``model(**inputs).logits`` against ``batch[label_key]``, summed over the outputs (no factor
    1/2), one value per sequence: a ``*ForSequenceClassification`` model with ``problem_type="regression"``
    (``num_labels`` real-valued targets per sequence; transformers' own loss is the mean squared error of a batch).

    It is :class:`~datatrace.RegressionTask` (closed-form output Hessian ``2 I``, Gaussian sampled targets) on dict
    batches: every key but ``label_key`` is passed to the model.

    Args:
        weight_decay: the L2 strength the model was trained with, in the units of this summed loss.
        label_key: the key of the labels (default ``"labels"``).
    """

    def check_batch(self, model: nn.Module, batch: Any, indices: torch.Tensor | None = None) -> Any:
        """:func:`check_model_inputs` (token ids in the vocabulary, sequences within the position embeddings)."""
        batch = _require_dict(batch, type(self).__name__)
        check_model_inputs(model, batch, type(self).__name__, indices)
        return super().check_batch(model, batch, indices)

    def outputs(self, model: nn.Module, batch: Mapping) -> torch.Tensor:
        """``model(**inputs).logits``, shape ``(b, num_labels)`` (left padding right-aligned, :func:`right_aligned`)."""
        batch = _require_dict(batch, type(self).__name__)
        return logits_of(call_model(model, right_aligned(batch, self.label_key)[0]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight_decay={self.weight_decay!r}, label_key={self.label_key!r})"


class CausalLMTask(Task):
    """Next-token negative log-likelihood of a sequence, summed over its valid positions (module docstring).

    The batch is a dict with ``input_ids``, optionally ``attention_mask`` (0 on padding) and ``labels`` (the
    targets, ``-100`` where a position has none, e.g. the prompt of a prompt/completion pair; ``input_ids`` when
    absent). The logits at position ``t`` predict the target at ``t + 1``; a position counts when its target is not
    -100 and is not padding. ``outputs`` are the logits ``(b, T, V)``; the loss, its output gradient and output
    Hessian (block-diagonal over positions) are closed forms, so every Gauss-Newton route applies.

    The measurement is the loss of the query sequence: its negative log-likelihood in nats, or, with labels -100
    on a prompt, ``-log p(completion | prompt)``.

    Args:
        weight_decay: the L2 strength in the units of this loss (module docstring: summed, not token-mean).
        label_key: the key of the labels (default ``"labels"``).
        input_key: the key of the token ids (default ``"input_ids"``), used as targets when there are no labels.
    """

    def __init__(
        self,
        weight_decay: float | Mapping[str, float] = 0.0,
        *,
        label_key: str = "labels",
        input_key: str = "input_ids",
    ) -> None:
        super().__init__(weight_decay)
        for name, key in (("label_key", label_key), ("input_key", input_key)):
            if not isinstance(key, str):
                raise bad_value(
                    name, key, "expected a string (a key of the batch dicts)", f"pass e.g. {name}='labels'"
                )
        self.label_key = label_key
        self.input_key = input_key

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(weight_decay={self.weight_decay!r}, label_key={self.label_key!r}, "
            f"input_key={self.input_key!r})"
        )

    # -- targets -------------------------------------------------------------------------------------------------
    def _labels(self, batch: Mapping) -> torch.Tensor:
        batch = _require_dict(batch, type(self).__name__)
        key = self.label_key if self.label_key in batch else self.input_key
        if key not in batch:
            raise bad_value(
                "input_key",
                self.input_key,
                f"the batch is a dict with keys {sorted(batch)}, with neither {self.input_key!r} nor "
                f"{self.label_key!r}",
                "name the key of the token ids (input_key=) or of the labels (label_key=)",
            )
        return batch[key]

    def next_tokens(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """``(targets, valid)``, both ``(b, T - 1)``: the target of the logits at each position ``t < T - 1`` (the
        label at ``t + 1``, 0 where invalid) and whether it counts (label not -100, neither position ``t + 1`` nor
        the position ``t`` predicting it padding: with left padding, the padded position before the first token
        predicts nothing)."""
        labels = self._labels(batch)
        target = labels[:, 1:]
        valid = target != IGNORE_INDEX
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):  # both the predicted token and the one predicting it are real
            valid = valid & (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
        return torch.where(valid, target, torch.zeros_like(target)).long(), valid

    # -- the loss ------------------------------------------------------------------------------------------------
    def outputs(self, model: nn.Module, batch: Mapping) -> torch.Tensor:
        """``model(**inputs).logits``, shape ``(b, T, V)`` (the labels are not passed to the model).

        Left-padded sequences are given to the model right-aligned (:func:`right_aligned`) and their logits rolled
        back, so left padding changes no score."""
        batch = _require_dict(batch, type(self).__name__)
        inputs, offsets = right_aligned(batch, self.label_key)
        logits = logits_of(call_model(model, inputs))
        if offsets is not None and logits.dim() == 3:
            logits = shift_positions(logits, offsets, -1)
        if logits.dim() != 3:
            raise ValueError(
                f"CausalLMTask expects logits of shape (batch, sequence, vocabulary), got {tuple(logits.shape)}. "
                "Fix: pass a *ForCausalLM / *LMHeadModel model, or SequenceClassificationTask for a classifier."
            )
        return logits

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """``l_i = - sum_t m_it log softmax(z_it)[y_i,t+1]``, shape ``(b,)``."""
        target, valid = self.next_tokens(batch)
        logp = torch.log_softmax(outputs[:, :-1], dim=-1)
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return -(picked * valid.to(picked.dtype)).sum(dim=1)

    def loss_terms(self, model: nn.Module, batch: Mapping) -> torch.Tensor:
        """The loss split by the token each term predicts: ``(b, T)``, column ``t`` the negative log-likelihood of
        token ``t`` given the tokens before it (0 for token 0 and where it does not count); rows sum to
        :meth:`loss`. Token-wise influence (:func:`datatrace.apps.tokens.token_influence`) splits scores by it."""
        outputs = self.outputs(model, batch)
        target, valid = self.next_tokens(batch)
        logp = torch.log_softmax(outputs[:, :-1], dim=-1)
        terms = -(logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * valid.to(logp.dtype))
        return torch.cat([torch.zeros_like(terms[:, :1]), terms], dim=1)

    def describe_measurement(self) -> str:
        if type(self).measurement is Task.measurement:
            return "the query sequence's negative log-likelihood (nats, summed over its labelled next tokens)"
        return super().describe_measurement()

    # -- output-space maths --------------------------------------------------------------------------------------
    def _probabilities(self, outputs: torch.Tensor, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        _, valid = self.next_tokens(batch)
        p = torch.softmax(outputs.detach()[:, :-1], dim=-1)
        return p, valid

    def output_gradient(self, outputs: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """``dl/dz_t = m_t (softmax(z_t) - onehot(y_t+1))`` (zero at the last position), flattened to ``(b, T V)``."""
        target, valid = self.next_tokens(batch)
        p = torch.softmax(outputs.detach()[:, :-1], dim=-1)
        g = (p - torch.nn.functional.one_hot(target, p.shape[-1]).to(p.dtype)) * valid.unsqueeze(-1).to(
            p.dtype
        )
        g = torch.cat([g, torch.zeros_like(g[:, :1])], dim=1)
        return g.reshape(outputs.shape[0], -1)

    def output_hessian_factors(self, outputs: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """Block-diagonal ``L`` with ``L_t = m_t (diag(sqrt p_t) - p_t sqrt(p_t)^T)`` (``L_t L_t^T = diag(p_t) -
        p_t p_t^T``, softmax cross-entropy's Hessian), shape ``(b, T V, T V)``."""
        p, valid = self._probabilities(outputs, batch)
        b, t1, V = p.shape
        if (t1 + 1) * V > MAX_EXACT_OUTPUTS:
            raise bad_value(
                "fisher",
                "ggn",
                f"the exact output Hessian of a causal LM has one block per position: {t1 + 1} positions x {V} "
                f"tokens = {(t1 + 1) * V} outputs per sequence, and one pseudo-gradient per output (limit "
                f"{MAX_EXACT_OUTPUTS})",
                "use fisher='sampled' with K-FAC/EK-FAC (curvature=EKFAC(fisher='sampled'): one next token drawn per "
                "position, one backward pass) or fisher='empirical' with ProjectedInfluence",
            )
        sq = p.sqrt()
        blocks = (torch.diag_embed(sq) - p[..., :, None] * sq[..., None, :]) * valid[..., None, None].to(
            p.dtype
        )
        T = t1 + 1
        L = torch.zeros(b, T, V, T, V, dtype=p.dtype, device=p.device)
        idx = torch.arange(t1, device=p.device)
        L[:, idx, :, idx, :] = blocks.permute(1, 0, 2, 3)
        return L.reshape(b, T * V, T * V)

    def output_counts(self, outputs: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """``V`` logits per position whose next token counts (label not -100, not padding), shape ``(b,)``: the
        outputs the loss depends on (padding and the last position carry none)."""
        _, valid = self.next_tokens(batch)
        return valid.sum(dim=1) * outputs.shape[-1]

    def position_mask(self, batch: Any) -> torch.Tensor | None:
        """The attention mask as the model sees it (:func:`right_aligned`): padded positions are not data."""
        return aligned_positions(batch)

    def distribution_counts(self, outputs: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """One next-token distribution per position whose next token counts, shape ``(b,)``."""
        _, valid = self.next_tokens(batch)
        return valid.sum(dim=1)

    def sample_targets(self, outputs: torch.Tensor, batch: Mapping, generator: torch.Generator) -> dict:
        """The batch with ``labels`` drawn from the model: one next token per valid position from
        ``softmax(z_t)``, -100 elsewhere (the positions that count stay the same).

        Draws are made for the valid positions only, in order (example by example, position by position), so
        padding does not consume random numbers: the same sequences padded to another length get the same
        samples from the same generator state."""
        p, valid = self._probabilities(outputs, batch)
        labels = torch.full(valid.shape, IGNORE_INDEX, dtype=torch.long, device=p.device)
        if bool(valid.any()):
            labels[valid] = torch.multinomial(p[valid], 1, replacement=True, generator=generator).reshape(-1)
        labels = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels], dim=1)
        return with_targets(batch, labels, self.label_key)

    def check_batch(self, model: nn.Module, batch: Any, indices: torch.Tensor | None = None) -> Any:
        """Token ids and labels as int64; labels are -100 or token ids ``0 <= y < V`` (``V`` from the model's
        config when it has one), else a ValueError naming the example."""
        batch = _require_dict(batch, type(self).__name__)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise bad_value(
                "model",
                type(model).__name__,
                "CausalLMTask scores a decoder-only language model (the logits at position t predict input token "
                "t + 1); an encoder-decoder model (config.is_encoder_decoder) predicts its labels from another "
                "sequence, through decoder inputs that CausalLMTask does not build",
                "use a *ForCausalLM model, or write a Task whose outputs are model(**inputs, "
                "decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels)).logits and whose "
                "loss is the summed cross-entropy against the labels (-100 ignored)",
            )
        check_model_inputs(model, batch, type(self).__name__, indices)
        out = dict(batch)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        for key in (self.input_key, self.label_key):
            value = out.get(key)
            if not isinstance(value, torch.Tensor):
                continue
            if value.is_floating_point() or value.dim() != 2:
                raise bad_value(
                    key,
                    f"a tensor of {value.dtype} {tuple(value.shape)}",
                    "CausalLMTask reads token ids as integers of shape (batch, sequence)",
                    "tokenise with padding to one length per batch (e.g. padding='max_length') and keep ids integer",
                )
            value = value.long()
            allowed = value >= 0 if key == self.input_key else (value >= 0) | (value == IGNORE_INDEX)
            if isinstance(vocab, int):
                allowed &= (value < vocab) | (value == IGNORE_INDEX)
            if not bool(allowed.all()):
                row, col = (int(i) for i in (~allowed).nonzero()[0])
                where = (
                    f"example {int(indices[row])}"
                    if indices is not None and row < len(indices)
                    else f"row {row}"
                )
                raise ValueError(
                    f"{key} holds {int(value[row, col])} at {where}, position {col}: allowed are token ids 0.."
                    f"{'V-1' if vocab is None else vocab - 1}{' and -100 (no target)' if key == self.label_key else ''}. "
                    "Fix: check the tokenizer matches the model, and mark positions without a target with -100."
                )
            out[key] = value
        return out


def prompt_completion(
    prompt_ids: torch.Tensor, completion_ids: torch.Tensor, pad_to: int | None = None, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """One query example whose :class:`CausalLMTask` measurement is ``-log p(completion | prompt)``: ``input_ids``
    the concatenation, ``labels`` -100 on the prompt, right-padded to ``pad_to`` (mask 0, labels -100).

    Returns a dict of 1-d tensors (one example, as a Dataset item)."""
    prompt_ids = torch.as_tensor(prompt_ids).long().reshape(-1)
    completion_ids = torch.as_tensor(completion_ids).long().reshape(-1)
    if prompt_ids.numel() == 0:
        raise bad_value(
            "prompt_ids", prompt_ids, "a prompt needs at least one token", "pass e.g. the BOS token"
        )
    ids = torch.cat([prompt_ids, completion_ids])
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), completion_ids])
    length = ids.numel() if pad_to is None else pad_to
    if length < ids.numel():
        raise bad_value(
            "pad_to", pad_to, f"the example has {ids.numel()} tokens", f"pass pad_to >= {ids.numel()}"
        )
    pad = length - ids.numel()
    return {
        "input_ids": torch.cat([ids, torch.full((pad,), pad_id, dtype=torch.long)]),
        "attention_mask": torch.cat(
            [torch.ones(ids.numel(), dtype=torch.long), torch.zeros(pad, dtype=torch.long)]
        ),
        "labels": torch.cat([labels, torch.full((pad,), IGNORE_INDEX, dtype=torch.long)]),
    }


__all__ = [
    "IGNORE_INDEX",
    "MAX_EXACT_OUTPUTS",
    "TOKEN_INPUTS",
    "CausalLMTask",
    "SequenceClassificationTask",
    "SequenceRegressionTask",
    "check_model_inputs",
    "logits_of",
    "model_inputs",
    "prompt_completion",
]
