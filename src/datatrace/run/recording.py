"""Record a training run as it happens, so that it can be replayed and differentiated later.

:class:`Recorder` wraps the user's own loop. Before each optimizer step it notes which training examples form the
minibatch, the hyper-parameters of every parameter group (so any learning-rate schedule is captured as it was
applied), and a per-step seed that it sets (:func:`set_seed`) (so dropout masks can be drawn again); every
``checkpoint_every`` steps it saves the parameters, buffers and optimizer state. :class:`Recording` reads the
folder back.

The replay (:mod:`datatrace.run.replay`) assumes that step ``t`` minimised

    L_t(theta) = (1/|B_t|) sum_{i in B_t} l(z_i, theta) + sum_b lambda_b/2 ||theta_b||^2

(``task.loss`` and the task's L2 term, as :func:`datatrace.verification.training.fit_minibatch` does) with a
``torch.optim`` SGD, Adam or AdamW step, and checks that assumption against the saved checkpoints.

Folder layout (no pickle anywhere): ``run.json`` (the manifest: optimizer, groups, names, checkpoints with their
sha256, ``complete``), ``steps.jsonl`` (one line per step: seed, example indices, learning rates, other
hyper-parameters when they change), ``state-<t>.safetensors``. The manifest says ``complete: false`` until
:meth:`Recorder.finish` has written the final state, and :class:`Recording` refuses an incomplete folder, so an
interrupted run never looks like a whole one.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler

from datatrace.errors import StoreCorruptedError, bad_value, check_positive_int
from datatrace.fileio import atomic_write, sha256_file, write_json
from datatrace.run.optimizers import describe_optimizer
from datatrace.run.state import TrainState, load_state, restore_training, save_state, state_from_training
from datatrace.run.step_gradients import GradientTrace, load_rows
from datatrace.tasks import Task

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "Recorder", "Recording", "StepRecord", "set_seed", "step_seed"]

FORMAT = "datatrace-run/1"
MANIFEST = "run.json"
STEPS = "steps.jsonl"


def step_seed(seed: int, t: int) -> int:
    """The seed set before step ``t`` of a run recorded with ``seed`` (fits every RNG: below 2**31)."""
    return (int(seed) * 1_000_003 + 7919 * int(t)) % (2**31 - 1)


def set_seed(seed: int) -> None:
    """Seed the CPU generator and, when CUDA is in use, every CUDA generator (``torch.manual_seed`` without its
    per-call bookkeeping: before CUDA is initialised it queues a lazy call with a stack trace each time)."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


@dataclass(frozen=True)
class StepRecord:
    """What step ``t`` used: the seed set before it, the examples of its minibatch and each group's settings."""

    seed: int
    indices: torch.Tensor
    hyper: list[dict[str, Any]]


class Recorder:
    """Records a training run driven by the user's own loop (plain PyTorch).

    Example::

        recorder = Recorder("run/", model, optimizer, n_train=len(dataset))
        for epoch in range(epochs):
            for batch in recorder.iterate(loader):       # a DataLoader over `dataset`
                loss = task.loss(model, batch).mean()    # + the task's L2 term, if any
                optimizer.zero_grad(); loss.backward(); optimizer.step(); scheduler.step()
        recorder.finish()

    Without a DataLoader, call ``recorder.begin_step(indices)`` right before each step's forward pass, with the
    indices of that minibatch's examples in the training set.

    Args:
        folder: an empty or new folder (``overwrite=True`` replaces a recording there).
        model, optimizer: the live model and its ``torch.optim`` SGD, Adam or AdamW optimizer.
        n_train: the size of the training set the indices refer to (default: ``len(loader.dataset)`` of the first
            :meth:`iterate`).
        seed: the run's seed; step ``t`` is preceded by ``set_seed(step_seed(seed, t))``.
        checkpoint_every: steps between saved states (the replay restarts from them and checks itself on them).
        task, gradient_dim: with both, every step also records each minibatch example's training-loss gradient
            at the step's starting parameters, randomly projected to ``gradient_dim`` dimensions
            (:mod:`datatrace.run.step_gradients`), for :class:`~datatrace.attributors.tracin_recorded.RecordedTracIn`;
            :meth:`begin_step` then needs the batch (``iterate`` passes it).
        max_grad_norm: the loop clips the gradient with ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)``
            (2-norm over all trained parameters) before each step; the replay does the same, differentiably.
        schedulers: learning-rate schedulers (anything with ``state_dict`` / ``load_state_dict`` whose state is
            JSON) saved with every state, so that a resumed run continues their schedule.
        resume: continue an interrupted recording in ``folder`` (``complete: false``) from its last saved state;
            with no recording there, start a new one. Run the same loop again from its start: :meth:`iterate`
            skips the first :attr:`resumed_from` minibatches of the data order without loading them, and the first
            step after them restores the model, the optimizer (state and every group's hyper-parameters) and the
            schedulers as they were saved, so the run goes on as if never stopped; a loop that calls
            :meth:`begin_step` itself skips its first ``resumed_from`` steps. The steps noted after that state are
            dropped and recorded again.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        n_train: int | None = None,
        seed: int = 0,
        checkpoint_every: int = 100,
        overwrite: bool = False,
        task: Task | None = None,
        gradient_dim: int | None = None,
        max_grad_norm: float | None = None,
        schedulers: Sequence[Any] = (),
        resume: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise bad_value("model", model, "a torch.nn.Module", "pass the model being trained")
        self.kind, hyper = describe_optimizer(optimizer)
        self.model, self.optimizer = model, optimizer
        self.checkpoint_every = check_positive_int("checkpoint_every", checkpoint_every)
        self.seed = int(seed)
        self.n_train = None if n_train is None else check_positive_int("n_train", n_train)
        self.folder = Path(folder)
        self.schedulers = list(schedulers)
        for k, scheduler in enumerate(self.schedulers):
            if not (
                callable(getattr(scheduler, "state_dict", None))
                and callable(getattr(scheduler, "load_state_dict", None))
            ):
                raise bad_value(
                    f"schedulers[{k}]",
                    scheduler,
                    "a learning-rate scheduler with state_dict() and load_state_dict()",
                    "pass torch.optim.lr_scheduler objects (or leave them out: the rates are recorded anyway)",
                )
        previous = None
        if (self.folder / MANIFEST).exists():
            if resume:
                previous = _interrupted_manifest(self.folder)
            elif not overwrite:
                raise bad_value(
                    "folder",
                    str(folder),
                    "a folder without a recording (it already holds run.json)",
                    "choose a new folder, pass overwrite=True to replace that recording, or resume=True to "
                    "continue an interrupted one",
                )
        self.resumed_from = 0
        self._skip = 0
        self._restore: TrainState | None = None
        self._restore_entry: dict[str, Any] = {}
        self._names = {id(p): n for n, p in model.named_parameters()}
        if previous is not None:
            self._resume(previous, optimizer, hyper, task, gradient_dim, max_grad_norm)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in [
            *self.folder.glob("state-*.safetensors"),
            *self.folder.glob("grads-*.safetensors"),
            self.folder / STEPS,
        ]:
            if old.exists():
                old.unlink()
        groups = self._groups(optimizer, hyper)
        self._last_hyper = hyper
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            "complete": False,
            "optimizer": self.kind,
            "groups": groups,
            "seed": self.seed,
            "checkpoint_every": self.checkpoint_every,
            "n_train": self.n_train,
            "modules_in_eval": [],
            "steps": 0,
            "checkpoints": {},
            "final": None,
            "dtype": str(next(model.parameters()).dtype),
            "gradients": None,
            "max_grad_norm": None if max_grad_norm is None else float(max_grad_norm),
        }
        self._trace = self._make_trace(task, gradient_dim, groups)
        if self._trace is not None:
            self.manifest["gradients"] = {"projection": self._trace.fingerprint(), "files": {}}
        self.t = 0
        self._steps = open(self.folder / STEPS, "w", encoding="utf-8")
        write_json(self.folder / MANIFEST, self.manifest)

    def _groups(self, optimizer: torch.optim.Optimizer, hyper: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The manifest's groups: each group's parameter names and hyper-parameters (foreign tensors refused)."""
        groups = []
        for g, group in enumerate(optimizer.param_groups):
            unknown = [p for p in group["params"] if id(p) not in self._names]
            if unknown:
                raise bad_value(
                    f"optimizer.param_groups[{g}]",
                    f"{len(unknown)} tensors that are not parameters of model",
                    "an optimizer over the model's own parameters",
                    "build the optimizer from model.parameters() (or a subset of them)",
                )
            groups.append({"params": [self._names[id(p)] for p in group["params"]], "hyper": hyper[g]})
        return groups

    def _make_trace(
        self, task: Task | None, gradient_dim: int | None, groups: list[dict[str, Any]]
    ) -> GradientTrace | None:
        if gradient_dim is None:
            return None
        if not isinstance(task, Task):
            raise bad_value(
                "task",
                task,
                "a datatrace.Task when gradient_dim is given",
                "pass the task whose loss is trained",
            )
        if self.n_train is None:
            raise bad_value("n_train", None, "the training set's size when gradient_dim is given", "pass it")
        dim = check_positive_int("gradient_dim", gradient_dim)
        trainable = [n for g in groups for n in g["params"]]
        return GradientTrace(self.model, task, trainable, dim, self.seed, self.n_train)

    # -- resuming -------------------------------------------------------------------------------------------------
    def _resume(
        self,
        manifest: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        hyper: list[dict[str, Any]],
        task: Task | None,
        gradient_dim: int | None,
        max_grad_norm: float | None,
    ) -> None:
        """Continue ``manifest``'s interrupted recording from its last saved state (see ``resume``)."""
        groups = self._groups(optimizer, hyper)
        given = {
            "optimizer": self.kind,
            "groups' parameters": [g["params"] for g in groups],
            "seed": self.seed,
            "checkpoint_every": self.checkpoint_every,
            "max_grad_norm": None if max_grad_norm is None else float(max_grad_norm),
        }
        saved = {
            "optimizer": manifest["optimizer"],
            "groups' parameters": [g["params"] for g in manifest["groups"]],
            "seed": manifest["seed"],
            "checkpoint_every": manifest["checkpoint_every"],
            "max_grad_norm": manifest.get("max_grad_norm"),
        }
        if self.n_train is not None and manifest.get("n_train") is not None:
            given["n_train"], saved["n_train"] = self.n_train, manifest["n_train"]
        for key, value in given.items():
            if value != saved[key]:
                raise bad_value(
                    "resume",
                    True,
                    f"the same run as the interrupted recording in {self.folder}, whose {key} is {saved[key]!r} "
                    f"(this Recorder's: {value!r})",
                    "resume with the run's own settings, or record a new run in another folder",
                )
        self.n_train = self.n_train if self.n_train is not None else manifest.get("n_train")
        self._trace = self._make_trace(task, gradient_dim, groups)
        fingerprint = None if self._trace is None else self._trace.fingerprint()
        if fingerprint != (manifest.get("gradients") or {}).get("projection"):
            raise bad_value(
                "gradient_dim",
                gradient_dim,
                "the per-step gradient settings (task, gradient_dim) of the interrupted recording",
                "resume with the same task and gradient_dim",
            )
        t = max(int(k) for k in manifest["checkpoints"])
        entry = manifest["checkpoints"][str(t)]
        path = self.folder / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise StoreCorruptedError(f"{path} is missing or does not match its sha256; record the run again")
        with open(self.folder / STEPS, encoding="utf-8") as handle:
            lines = handle.readlines()[:t]
        if len(lines) < t or not all(line.endswith("\n") for line in lines):
            raise StoreCorruptedError(
                f"{self.folder / STEPS} holds {len(lines)} whole steps before the saved state of step {t}; record "
                "the run again"
            )
        kept_files = {e["file"] for e in manifest["checkpoints"].values()}
        kept_files |= set((manifest.get("gradients") or {}).get("files", {}))
        for stale in [*self.folder.glob("state-*.safetensors"), *self.folder.glob("grads-*.safetensors")]:
            if stale.name not in kept_files:
                stale.unlink()
        atomic_write(self.folder / STEPS, lambda tmp: Path(tmp).write_text("".join(lines), encoding="utf-8"))
        last_hyper = [dict(g["hyper"]) for g in manifest["groups"]]
        self._recorded = []
        for line in lines:
            row = json.loads(line)
            last_hyper = [dict(h) for h in row["hyper"]] if "hyper" in row else last_hyper
            self._recorded.append(row["idx"])
        self._last_hyper = last_hyper
        self.manifest = manifest
        self.t = self.resumed_from = self._skip = t
        self._restore = load_state(path)
        self._restore_entry = entry
        self._steps = open(self.folder / STEPS, "a", encoding="utf-8")
        logger.info("resuming the recording in %s from step %d", self.folder, t)

    def _skipped(self, indices: list[int]) -> None:
        """One minibatch of the data order skipped on resume, compared with the recorded one."""
        t = self.resumed_from - self._skip
        self._skip -= 1
        if [int(i) for i in indices] != self._recorded[t] and not getattr(self, "_warned_order", False):
            self._warned_order = True
            logger.warning(
                "resuming %s: minibatch %d of the data order differs from the recorded one (a loader that shuffles "
                "without its own generator, or another loop). The recording stays consistent (the steps before "
                "the saved state are the ones recorded; the steps after it record what they use), but the run "
                "will not be the one that was interrupted.",
                self.folder,
                t,
            )

    def _restore_now(self) -> None:
        """Put the saved state back into the live model, optimizer and schedulers (first step after resuming)."""
        state, entry = self._restore, self._restore_entry
        self._restore = None
        if state is None:
            return
        restore_training(state, self.model, self.optimizer, self._names, entry.get("hyper", self._last_hyper))
        for scheduler, saved in zip(self.schedulers, entry.get("schedulers", [])):
            scheduler.load_state_dict(saved)

    # -- the loop ---------------------------------------------------------------------------------------------
    def begin_step(self, indices: Sequence[int] | torch.Tensor, batch: Any = None) -> None:
        """Note step ``t``'s minibatch (indices into the training set), save a state when due, set the seed.
        ``batch`` (the minibatch itself) is needed when the recorder collects gradients."""
        if self._steps.closed:
            raise RuntimeError("this Recorder has finished; start a new one for another run")
        idx = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        if not idx:
            raise bad_value("indices", indices, "the minibatch's example indices (at least one)", "pass them")
        if self.n_train is not None and (min(idx) < 0 or max(idx) >= self.n_train):
            raise bad_value(
                "indices",
                f"values from {min(idx)} to {max(idx)}",
                f"indices into the training set of n_train={self.n_train} examples",
                "pass the positions of the minibatch's examples in the training set",
            )
        self._skip = (
            0  # called directly: the loop skipped the recorded steps itself (iterate drops them first)
        )
        if self._restore is not None:
            self._restore_now()
        if self.t == 0:
            self.manifest["modules_in_eval"] = [n for n, m in self.model.named_modules() if not m.training]
        if self.t % self.checkpoint_every == 0:
            self._save(f"state-{self.t:08d}.safetensors", "checkpoints")
        if self._trace is not None:
            if batch is None:
                raise bad_value(
                    "batch",
                    None,
                    "the minibatch, since this Recorder collects gradients",
                    "pass begin_step(idx, batch)",
                )
            self._trace.add(self.t, idx, batch)
        _, hyper = describe_optimizer(self.optimizer)
        line: dict[str, Any] = {
            "seed": step_seed(self.seed, self.t),
            "idx": idx,
            "lr": [h["lr"] for h in hyper],
        }
        if any({**h, "lr": 0} != {**o, "lr": 0} for h, o in zip(hyper, self._last_hyper)):
            line["hyper"] = hyper
            self._last_hyper = hyper
        self._steps.write(json.dumps(line) + "\n")  # flushed with each saved state and by finish()
        set_seed(line["seed"])
        self.t += 1

    def iterate(self, loader: DataLoader) -> Iterator[Any]:
        """The batches of ``loader`` (one epoch), each preceded by :meth:`begin_step` with its indices."""
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            raise bad_value(
                "loader",
                loader,
                "a torch DataLoader over a map-style Dataset (the recording names examples by index)",
                "wrap the data in a map-style Dataset, or call begin_step(indices) yourself",
            )
        if loader.batch_sampler is None:
            raise bad_value(
                "loader.batch_size",
                None,
                "a DataLoader that forms minibatches",
                "pass batch_size to the DataLoader",
            )
        size = len(loader.dataset)  # type: ignore[arg-type]
        if self.n_train is None:
            self.n_train = size
            self.manifest["n_train"] = self.n_train
        elif size != self.n_train:
            raise bad_value(
                "loader.dataset",
                f"{size} examples",
                f"the training set of n_train={self.n_train} examples that the recorded indices refer to",
                "iterate loaders over the same dataset (its indices are recorded), or pass n_train=len(dataset)",
            )
        pending: collections.deque[list[int]] = collections.deque()
        twin = DataLoader(
            loader.dataset,
            batch_sampler=_NotingSampler(loader.batch_sampler, pending, self),
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context if loader.num_workers else None,
            generator=loader.generator,
            prefetch_factor=loader.prefetch_factor if loader.num_workers else None,
        )
        for batch in twin:
            self.begin_step(pending.popleft(), batch if self._trace is not None else None)
            yield batch

    def finish(self) -> Recording:
        """Save the final state, mark the recording complete and return it opened."""
        if self.t == 0:
            raise RuntimeError(
                "no step was recorded: call begin_step (or iterate) before each optimizer step"
            )
        if self.n_train is None:
            raise bad_value("n_train", None, "the training set's size", "pass n_train= to the Recorder")
        self._steps.close()
        self.manifest["steps"] = self.t
        self.manifest["n_train"] = self.n_train
        self.manifest["steps_sha256"] = sha256_file(self.folder / STEPS)
        self._save(f"state-{self.t:08d}.safetensors", "final")
        self.manifest["complete"] = True
        write_json(self.folder / MANIFEST, self.manifest)
        logger.info("recorded %d steps of %s in %s", self.t, self.kind, self.folder)
        return Recording(self.folder)

    def _save(self, filename: str, where: str) -> None:
        if not self._steps.closed:
            self._steps.flush()
        if self._trace is not None and self._trace.pending():
            name = filename.replace("state-", "grads-")
            trace = self._trace
            digest = atomic_write(self.folder / name, trace.write, checksum=True)
            self.manifest["gradients"]["files"][name] = digest
        state = state_from_training(self.model, self.optimizer, self._names, self.t)
        digest = atomic_write(self.folder / filename, lambda tmp: save_state(state, tmp), checksum=True)
        entry: dict[str, Any] = {"file": filename, "sha256": digest}
        entry["hyper"] = describe_optimizer(self.optimizer)[1]
        if self.schedulers:
            entry["schedulers"] = [_json_state(k, s.state_dict()) for k, s in enumerate(self.schedulers)]
        if where == "final":
            self.manifest["final"] = {"t": self.t, **entry}
        else:
            self.manifest["checkpoints"][str(self.t)] = entry
        write_json(self.folder / MANIFEST, self.manifest)


def _json_state(k: int, state: dict[str, Any]) -> dict[str, Any]:
    """A scheduler's ``state_dict`` as JSON (checked: it must survive the round trip unchanged)."""
    try:
        text = json.dumps(state)
    except (TypeError, ValueError) as err:
        raise bad_value(
            f"schedulers[{k}]",
            type(state).__name__,
            f"a scheduler whose state_dict() is JSON (numbers, strings, lists), not one holding {err}",
            "leave that scheduler out of schedulers= (its rates are recorded anyway; resuming then needs you to "
            "restore it yourself)",
        ) from None
    return json.loads(text)


def _read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the recording in ``folder``: a refusal for a folder without one, or a foreign or unreadable
    one."""
    path = folder / MANIFEST
    if not path.is_file():
        raise bad_value("folder", str(folder), "a folder written by datatrace.Recorder", "pass that folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StoreCorruptedError(
            f"{path} is not a readable recording manifest ({err}); record the run again"
        ) from None
    if manifest.get("format") != FORMAT:
        raise bad_value(
            "folder",
            str(folder),
            f"a recording of format {FORMAT}, got {manifest.get('format')!r}",
            "record the run again",
        )
    return manifest


def _interrupted_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the interrupted recording in ``folder``; a refusal for a complete, foreign or unreadable one,
    or one without a saved state yet."""
    manifest = _read_manifest(folder)
    if manifest.get("complete"):
        raise bad_value(
            "resume",
            True,
            f"an interrupted recording, but the one in {folder} is complete",
            "open it with datatrace.Recording(folder), or record a new run in another folder",
        )
    if not manifest.get("checkpoints"):
        raise bad_value(
            "resume",
            True,
            f"an interrupted recording with at least one saved state; {folder} has none",
            "record the run again (overwrite=True)",
        )
    return manifest


class _NotingSampler(Sampler):
    """A batch sampler that passes ``inner``'s batches on and notes each one's indices, in order; while the recorder
    resumes, it drops the batches of the steps already recorded (so they are never loaded)."""

    def __init__(self, inner: Iterable[list[int]], pending: collections.deque, recorder: Recorder) -> None:
        self.inner, self.pending, self.recorder = inner, pending, recorder

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:
            if self.recorder._skip:
                self.recorder._skipped(list(batch))
                continue
            self.pending.append(list(batch))
            yield batch

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


class Recording:
    """A complete recorded run (read-only): its steps, its saved states and its optimizer."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        manifest = _read_manifest(self.folder)
        if not manifest.get("complete"):
            raise bad_value(
                "folder",
                str(folder),
                f"a complete recording; this one stopped after {manifest.get('steps', 0)} noted steps without "
                "Recorder.finish()",
                "run the training again with the Recorder and call finish() at the end",
            )
        self.manifest = manifest
        steps_path = self.folder / STEPS
        if sha256_file(steps_path) != manifest["steps_sha256"]:
            raise StoreCorruptedError(
                f"{steps_path} does not match its sha256 in run.json; record the run again"
            )
        self.kind: str = manifest["optimizer"]
        self.groups: list[list[str]] = [g["params"] for g in manifest["groups"]]
        self.n_train: int = int(manifest["n_train"])
        self.n_steps: int = int(manifest["steps"])
        self.modules_in_eval: list[str] = list(manifest.get("modules_in_eval", []))
        self.max_grad_norm: float | None = manifest.get("max_grad_norm")
        hyper = [dict(g["hyper"]) for g in manifest["groups"]]
        self.steps: list[StepRecord] = []
        with open(steps_path, encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                if "hyper" in row:
                    hyper = [dict(h) for h in row["hyper"]]
                step_hyper = [{**h, "lr": lr} for h, lr in zip(hyper, row["lr"])]
                self.steps.append(StepRecord(int(row["seed"]), torch.tensor(row["idx"]), step_hyper))
        if len(self.steps) != self.n_steps:
            raise StoreCorruptedError(
                f"{steps_path} holds {len(self.steps)} steps, run.json says {self.n_steps}"
            )
        self._files = {int(t): e for t, e in manifest["checkpoints"].items()}
        self._files[self.n_steps] = manifest["final"]

    @property
    def checkpoint_steps(self) -> list[int]:
        """The steps ``t`` whose state (before step ``t``; ``n_steps`` is the final state) is saved."""
        return sorted(self._files)

    def state(self, t: int, device: torch.device | str | None = None) -> TrainState:
        """The saved state before step ``t`` (checked against its sha256)."""
        if t not in self._files:
            raise bad_value(
                "t", t, f"a saved step, one of {self.checkpoint_steps[:10]}...", "pick a saved step"
            )
        path = self.folder / self._files[t]["file"]
        if not path.is_file() or sha256_file(path) != self._files[t]["sha256"]:
            raise StoreCorruptedError(f"{path} is missing or does not match its sha256; record the run again")
        return load_state(path, device)

    @property
    def has_gradients(self) -> bool:
        """Whether the run was recorded with ``gradient_dim`` (per-step projected gradients)."""
        return bool(self.manifest.get("gradients"))

    def gradient_files(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(rows, indices, steps)`` of every gradient file, in step order (each checked against its sha256)."""
        if not self.has_gradients:
            raise bad_value(
                "recording",
                str(self.folder),
                "a run recorded with gradient_dim= (per-step gradients)",
                "record the run with Recorder(..., task=task, gradient_dim=k)",
            )
        for name, digest in sorted(self.manifest["gradients"]["files"].items()):
            path = self.folder / name
            if not path.is_file() or sha256_file(path) != digest:
                raise StoreCorruptedError(
                    f"{path} is missing or does not match its sha256; record the run again"
                )
            yield load_rows(path)

    def examples_per_step(self) -> torch.Tensor:
        """``(n_train,)``: how many steps used each example (its number of visits)."""
        counts = torch.zeros(self.n_train, dtype=torch.long)
        for s in self.steps:
            counts.index_add_(0, s.indices, torch.ones_like(s.indices))
        return counts

    def __repr__(self) -> str:
        return (
            f"Recording({str(self.folder)!r}: {self.n_steps} {self.kind} steps over {self.n_train} examples)"
        )
