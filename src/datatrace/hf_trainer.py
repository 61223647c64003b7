"""Record a Hugging Face ``Trainer`` run for replay, metagradients and recorded TracIn.

:func:`record_trainer` attaches a :class:`~datatrace.run.recording.Recorder` to a ``transformers.Trainer`` before
``trainer.train()``: the training sampler is wrapped so that the example indices of every minibatch are noted in
the order the data loader draws them, and a callback notes each optimizer step (``on_step_begin``, before the
forward pass, so the per-step seed also fixes dropout), saves states every ``checkpoint_every`` steps with the
Trainer's optimizer and learning-rate scheduler, and finishes the recording at the end of training.

What a replay assumes, and what is refused here by name when the Trainer's settings break it:

* step ``t`` minimises the batch mean of the task's per-example loss: true for sequence classification
  (``SequenceClassificationTask``: the model's cross-entropy is the batch mean); a causal LM's loss in
  ``transformers`` is the mean over the batch's *tokens*, which the per-sequence tasks do not reproduce, so only
  use it where each example has the same number of target tokens;
* one optimizer step per minibatch (``gradient_accumulation_steps=1``), one process, no label smoothing, a
  map-style training set;
* gradient clipping at ``args.max_grad_norm`` (recorded) and the optimizer ``torch.optim.AdamW``, ``Adam`` or
  ``SGD`` (``optim="adamw_torch"`` or ``"adamw_torch_fused"``; anything else is refused by
  :func:`~datatrace.run.optimizers.describe_optimizer` at the first step).

Replay with the training set and the Trainer's collator: :func:`replay_data` gives the data loader to pass as the
training data of :class:`~datatrace.Metagradient` or :class:`~datatrace.run.replay.Replay`. Attention dropout
inside a fused kernel (SDPA) draws its mask in the kernel, which the differentiable replay (reference attention)
does not reproduce: train with ``attention_probs_dropout_prob=0`` (or ``attn_pdrop=0``) to differentiate the run.

``transformers`` is imported only by this module (extra ``hf``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import transformers
from torch.utils.data import DataLoader, Sampler

from datatrace.errors import bad_value
from datatrace.run.recording import Recorder, Recording

logger = logging.getLogger(__name__)

__all__ = ["TrainerRecording", "record_trainer", "replay_data"]


class _NotedSampler(Sampler):
    """Passes ``inner``'s indices on and keeps them, one list per epoch (one ``__iter__``)."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.epochs: list[list[int]] = []

    def __iter__(self) -> Iterator[int]:
        seen: list[int] = []
        self.epochs.append(seen)
        for i in self.inner:
            seen.append(int(i))
            yield i

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:  # accelerate calls it on samplers that have it
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)


class TrainerRecording(transformers.TrainerCallback):
    """The callback :func:`record_trainer` adds: it opens the :class:`Recorder` when training begins (the
    Trainer's optimizer and scheduler exist then), notes each step's minibatch and finishes at the end.
    ``recording`` is the finished :class:`~datatrace.Recording` after ``trainer.train()``."""

    def __init__(
        self, trainer: transformers.Trainer, folder: str | os.PathLike[str], **recorder_kw: Any
    ) -> None:
        self.trainer = trainer
        self.folder = folder
        self.recorder_kw = recorder_kw
        self.recorder: Recorder | None = None
        self.recording: Recording | None = None
        self.sampler: _NotedSampler | None = None
        self._epoch = 0
        self._offset = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        scheduler = kwargs.get("lr_scheduler")
        scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrappers hold the torch objects
        optimizer = kwargs["optimizer"]
        optimizer = getattr(optimizer, "optimizer", optimizer)
        self.recorder = Recorder(
            self.folder,
            kwargs["model"],
            optimizer,
            n_train=len(self.trainer.train_dataset),
            max_grad_norm=float(args.max_grad_norm) if args.max_grad_norm else None,
            schedulers=[scheduler] if scheduler is not None else [],
            **self.recorder_kw,
        )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is None or self.sampler is None:
            raise RuntimeError("record_trainer: a step began before training did; call trainer.train()")
        self.recorder.begin_step(self._next_batch(args.per_device_train_batch_size))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None and self.recorder.t > 0:
            self.recording = self.recorder.finish()
            logger.info("recorded the Trainer's %d steps in %s", self.recording.n_steps, self.folder)

    def _next_batch(self, size: int) -> list[int]:
        """The indices of the next minibatch: the next ``size`` noted indices of the current epoch (fewer at its
        end), moving to the next epoch when it is used up."""
        epochs = self.sampler.epochs  # type: ignore[union-attr]
        while self._epoch < len(epochs) and self._offset >= len(epochs[self._epoch]):
            if self._epoch + 1 >= len(epochs):
                break
            self._epoch, self._offset = self._epoch + 1, 0
        if self._epoch >= len(epochs) or self._offset >= len(epochs[self._epoch]):
            raise RuntimeError(
                "record_trainer: the data loader drew no indices for this step (its sampler was replaced, e.g. by "
                "a distributed or batch-rebalancing sampler); record with one process and the default sampler"
            )
        batch = epochs[self._epoch][self._offset : self._offset + size]
        self._offset += len(batch)
        return batch


def record_trainer(
    trainer: transformers.Trainer,
    folder: str | os.PathLike[str],
    *,
    seed: int | None = None,
    checkpoint_every: int = 100,
    overwrite: bool = False,
) -> TrainerRecording:
    """Record ``trainer``'s next ``train()`` call in ``folder`` (see the module docstring for what is checked).

    Returns the callback; after training, its ``recording`` is the finished :class:`~datatrace.Recording`.
    ``seed`` (default: ``trainer.args.seed``) seeds each step (dropout); ``checkpoint_every``: steps between
    saved states.
    """
    if not isinstance(trainer, transformers.Trainer):
        raise bad_value("trainer", trainer, "a transformers.Trainer", "pass the Trainer you will train")
    args = trainer.args
    checks = {
        "args.gradient_accumulation_steps": (
            args.gradient_accumulation_steps,
            1,
            "one optimizer step per minibatch (the replay steps on each minibatch)",
        ),
        "args.label_smoothing_factor": (args.label_smoothing_factor, 0.0, "the task's plain cross-entropy"),
        "args.world_size": (args.world_size, 1, "one process (the recording notes one data order)"),
    }
    for name, (value, allowed, why) in checks.items():
        if value != allowed:
            raise bad_value(
                name, value, f"{allowed!r}: {why}", f"train with {name.split('.')[-1]}={allowed!r}"
            )
    if trainer.train_dataset is None or not hasattr(trainer.train_dataset, "__len__"):
        raise bad_value(
            "trainer.train_dataset",
            type(trainer.train_dataset).__name__,
            "a map-style dataset with a length (the recording names examples by index)",
            "pass a Dataset (or datasets.Dataset) as train_dataset",
        )
    callback = TrainerRecording(
        trainer,
        folder,
        seed=int(args.seed if seed is None else seed),
        checkpoint_every=checkpoint_every,
        overwrite=overwrite,
    )
    original = trainer._get_train_sampler

    def noted_sampler(*a: Any, **kw: Any) -> Sampler:
        inner = original(*a, **kw)
        if inner is None:
            raise bad_value(
                "trainer.train_dataset",
                type(trainer.train_dataset).__name__,
                "a dataset the Trainer draws with a sampler",
                "pass a map-style Dataset",
            )
        callback.sampler = _NotedSampler(inner)
        return callback.sampler

    trainer._get_train_sampler = noted_sampler  # type: ignore[method-assign]
    trainer.add_callback(callback)
    return callback


def replay_data(trainer: transformers.Trainer) -> DataLoader:
    """The training set as the Trainer's collator forms its batches (columns the model does not take removed),
    for :class:`~datatrace.Metagradient` / :class:`~datatrace.run.replay.Replay` of a recorded Trainer run."""
    dataset = trainer.train_dataset
    try:
        import datasets  # the Trainer removes a datasets.Dataset's unused columns on the dataset itself
    except ImportError:
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        dataset, collator = (
            trainer._remove_unused_columns(dataset, description="replay"),
            trainer.data_collator,
        )
    else:
        collator = trainer._get_collator_with_removed_columns(trainer.data_collator, description="replay")
    return DataLoader(dataset, batch_size=trainer.args.per_device_train_batch_size, collate_fn=collator)
