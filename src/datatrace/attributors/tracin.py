"""TracIn (Pruthi et al. 2020, "Estimating Training Data Influence by Tracing Gradient Descent"), TracInCP variant.

TracIn follows the training *trajectory* instead of assuming a minimum. Say the model was trained by SGD on
mean-over-batch losses,

    theta_{t+1} = theta_t - eta_t * [ (1/B) sum_{j in batch_t} grad l(z_j, theta_t) + grad R(theta_t) ],

with mini-batch size ``B`` and ``R`` the L2 term of :mod:`datatrace.tasks`. Leaving example ``i`` out of the batch
it was in (its term dropped, the normaliser ``1/B`` kept: the ``eps = -1`` removal of the influence-function
convention) changes ``theta_{t+1}`` by ``+(eta_t / B) grad l(z_i, theta_t)``, so a query measurement ``f_q`` after
that step changes, to first order in ``eta_t``, by

    f_q(theta_{t+1} without i) - f_q(theta_{t+1})  ~  +(eta_t / B) * grad f_q(theta_t) . grad l(z_i, theta_t).

Removing a helpful example *raises* the query loss, so this is positive for a proponent, exactly as in datatrace's
leave-one-out convention (``score[q, i] ~ f_q(theta_{-i}) - f_q(theta_hat)``, in the measurement's units).
TracInCP sums these effects over the steps that used ``i`` and evaluates each interval of steps at the checkpoint
that starts it:

    score[q, i] = sum_c (eta_c / B) * grad f_q(theta_c) . grad l(z_i, theta_c)                      (TracInCP)

Assumptions and approximations, stated plainly:

* **Units.** ``eta_c`` is the learning rate used after checkpoint ``c`` and ``B`` the training mini-batch size
  (``batch_size_train``; the losses were averaged over the batch, PyTorch's default). The weight of checkpoint
  ``c`` is ``eta_c / B``. Use ``batch_size_train="full"`` for full-batch gradient descent (``B = n``) and
  ``batch_size_train=1`` if ``learning_rates`` already hold ``eta_c / B`` or the losses were summed.
* **Visits.** Every example is visited once per checkpoint interval (checkpoints one epoch apart). If checkpoint
  ``c`` stands for ``E_c`` epochs, pass ``learning_rates[c] = E_c * eta_c`` (and the mean rate for a schedule
  that changes inside an interval).
* **First order, no propagation.** The effect of a step is taken to first order in ``eta`` and is not carried
  through the later steps (nor through the re-convergence that actual retraining would do); the gradients of
  all steps in an interval are replaced by those at its checkpoint. Plain SGD is assumed: momentum and adaptive
  optimisers (Adam) rescale the steps, which this formula ignores.
* **What it estimates.** The change of the measurement at the end of the recorded trajectory when ``i``'s
  updates are skipped: the same units and sign as leave-one-out retraining, but not a converged-retraining
  estimate. Compare with :func:`datatrace.verification.retrain.leave_one_out` before trusting it for that.
* **Weight decay** does not depend on ``i`` and drops out of the difference; it needs no input here.

Memory: :meth:`TracIn.fit` keeps ``n_checkpoints x n_train x p`` gradient entries (``p`` parameters in scope, or
the projector's output dimension). For large models pass a ``projector`` or restrict ``params``. With one of
datatrace's projectors (:class:`~datatrace.projection.RandomProjector`, or
:class:`~datatrace.projection.FactorizedProjector`, which never forms a full per-example gradient) the projector
is fitted afresh at every checkpoint (its matrix depends on its seed and the parameter layout only, so every
checkpoint and every query uses the same ``P``) and the scores become ``sum_c (eta_c / B) (P^T grad f_q)
. (P^T grad l_i)``: a Johnson-Lindenstrauss estimate of the same number, with relative error of order
``1/sqrt(k)`` (Pruthi et al. use the same device). The user's projector object is copied, never fitted in place.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from datatrace.attributors.base import Attributor, Measurement
from datatrace.data import DataLike, DataSource, as_data_source
from datatrace.errors import bad_value, check_bool, check_finite, check_positive_int, describe
from datatrace.gradients.functional import (
    FunctionalModel,
    check_model_and_task,
    per_example_rows,
    prepare_model,
)
from datatrace.params import select_parameters
from datatrace.scores import Scores
from datatrace.tasks import Task

__all__ = ["TracIn", "load_checkpoint"]

logger = logging.getLogger(__name__)

Checkpoint = Mapping[str, torch.Tensor] | str | os.PathLike


def load_checkpoint(checkpoint: Checkpoint, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A state dict from a mapping, a ``torch.save`` file or a safetensors file, without unpickling objects.

    Files ending in ``.safetensors`` are read with safetensors; any other file with
    ``torch.load(weights_only=True, map_location="cpu")`` (tensors and plain containers only), falling back to
    safetensors for a safetensors file with another suffix. ``name`` is used in error messages.
    """
    if isinstance(checkpoint, Mapping):
        state = dict(checkpoint)
        where = f"{name} (a mapping)"
    elif isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        where = f"{name} ({path})"
        if not path.is_file():
            raise FileNotFoundError(
                f"{name}={str(path)!r} is not an existing file. Fix: pass the path of a file saved with "
                "torch.save(model.state_dict(), path) or safetensors.torch.save_file, or the state dict itself."
            )
        state = _read_state_file(path, name)
    else:
        raise bad_value(
            name,
            checkpoint,
            "expected a state dict (a mapping of parameter names to tensors) or the path of a checkpoint file",
            "pass model.state_dict() or the path it was saved to with torch.save / safetensors",
        )
    not_tensors = {str(k): type(v).__name__ for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if not_tensors or not all(isinstance(k, str) for k in state):
        nested = [k for k, v in state.items() if isinstance(v, Mapping)]
        hint = (
            f" It looks like a training checkpoint with the state dict nested under {nested!r}: pass "
            f"torch.load(path, weights_only=True)[{nested[0]!r}] instead."
            if nested
            else ""
        )
        raise ValueError(
            f"{where} is not a state dict: entries {dict(list(not_tensors.items())[:8])} are not tensors "
            f"(a state dict maps parameter names to tensors).{hint} Fix: save and pass model.state_dict()."
        )
    if not state:
        raise ValueError(f"{where} is empty. Fix: pass model.state_dict() of the checkpointed model.")
    return state


def _read_state_file(path: Path, name: str) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"{name}={str(path)!r} could not be read as a safetensors file: {err}. Fix: pass a file written "
                "by safetensors.torch.save_file(model.state_dict(), path)."
            ) from err
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as err:  # pickle.UnpicklingError, RuntimeError, EOFError, ...: all mean "not loadable safely"
        try:
            return load_file(str(path), device="cpu")
        except Exception:
            pass
        raise ValueError(
            f"{name}={str(path)!r} could not be loaded with torch.load(weights_only=True): {_short(err)}. datatrace never "
            "unpickles arbitrary objects. Fix: save a plain state dict, torch.save(model.state_dict(), path), or "
            "use safetensors; or load the file yourself and pass the state dict."
        ) from err
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"{name}={str(path)!r} holds a {type(loaded).__name__}, not a state dict. Fix: save "
            "model.state_dict() (not the model object) and pass that file."
        )
    return dict(loaded)


def _short(err: BaseException) -> str:
    """The informative line of an exception message (torch.load's are long and advise weights_only=False)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.split("Please use")[0].strip()
    return (lines[0] if lines else type(err).__name__)[:300]


def _check_learning_rates(learning_rates: Any, n_checkpoints: int) -> list[float]:
    if isinstance(learning_rates, torch.Tensor):
        learning_rates = (
            learning_rates.reshape(-1).tolist() if learning_rates.dim() else learning_rates.item()
        )
    if isinstance(learning_rates, (int, float)) and not isinstance(learning_rates, bool):
        learning_rates = [learning_rates] * n_checkpoints
    if isinstance(learning_rates, (str, bytes)) or not isinstance(learning_rates, Sequence):
        try:
            learning_rates = list(learning_rates)
        except TypeError:
            raise bad_value(
                "learning_rates",
                learning_rates,
                "expected one learning rate per checkpoint (a list of floats) or one float for all",
                "pass e.g. learning_rates=[0.1, 0.1, 0.01]",
            ) from None
    rates = list(learning_rates)
    if len(rates) != n_checkpoints:
        raise bad_value(
            "learning_rates",
            learning_rates,
            f"expected one learning rate per checkpoint: {n_checkpoints} checkpoint(s) but {len(rates)} rate(s)",
            f"pass {n_checkpoints} learning rates, the one used in the interval after each checkpoint",
        )
    out = []
    for c, rate in enumerate(rates):
        if isinstance(rate, bool):
            rate = "bool"
        try:
            value = float(rate)
        except (TypeError, ValueError):
            value = float("nan")
        if not (math.isfinite(value) and value >= 0):
            raise bad_value(
                f"learning_rates[{c}]", rate, "expected a finite number >= 0", "pass the SGD learning rate"
            )
        out.append(value)
    return out


class TracIn(Attributor):
    """TracInCP influence: checkpoint-weighted dot products of query and training gradients.

    ``score[q, i] = sum_c (eta_c / B) * grad f_q(theta_c) . grad l(z_i, theta_c)``: the first-order rise of query
    ``q``'s measurement when example ``i``'s SGD updates are skipped (see the module docstring for the derivation
    and the assumptions). Positive: ``i`` is a proponent; the units are the measurement's, as for every datatrace
    attributor.

    Args:
        model: an ``nn.Module`` of the trained architecture (its own weights are not used unless a checkpoint leaves
            some entries out; the model is never modified).
        task: the :class:`~datatrace.Task` (its ``loss`` for training examples, ``measurement`` for queries).
        checkpoints: a non-empty list of state dicts (``model.state_dict()``) or paths to files written with
            ``torch.save(state_dict, path)`` (read with ``weights_only=True``) or ``safetensors`` (``*.safetensors``).
            Each must hold every parameter in scope, with the model's names and shapes.
        learning_rates: ``eta_c`` for each checkpoint (the rate used in the interval after it), or one float for
            all. Fold the number of epochs a checkpoint stands for into it (see the module docstring).
        batch_size_train: the training mini-batch size ``B`` (losses averaged over the batch); ``"full"`` for
            full-batch gradient descent (``B = len(train)``); ``1`` if ``learning_rates`` already hold ``eta_c/B``.
            Required, because a wrong ``B`` silently rescales every score.
        params: parameter name patterns in scope (``None``: every trainable parameter).
        projector: optional. A datatrace projector (:mod:`datatrace.projection`, anything with
            ``fit(fmodel, n_points)`` and ``project_vjps(batch, root)``: copied, then fitted at each checkpoint);
            or any object with ``project(grads) -> Tensor (b, k)``, or a callable doing the same, applied to the full
            gradient rows. It must be one fixed linear map.
        dtype: working precision (float64 by default; ``None`` keeps the model's).
        batch_size: examples per gradient batch (default: the data's own, or 256).
        progress: show tqdm progress bars.

    Example:
        >>> import torch, datatrace
        >>> from datatrace.attributors.tracin import TracIn
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> ckpts = [{k: v.clone() for k, v in model.state_dict().items()}]
        >>> tracin = TracIn(model, datatrace.RegressionTask(), ckpts, [0.1], batch_size_train=4, progress=False)
        >>> tracin.fit((X, y)).score((X[:2], y[:2])).values.shape
        torch.Size([2, 20])
    """

    fitted_attribute = "train_grads_"
    route = "TracInCP"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoints: Sequence[Checkpoint],
        learning_rates: Sequence[float] | float,
        *,
        batch_size_train: int | str,
        params: str | list[str] | None = None,
        projector: Any = None,
        dtype: torch.dtype | None = torch.float64,
        batch_size: int | None = None,
        progress: bool = True,
    ) -> None:
        check_model_and_task(model, task, dtype, model_fix="pass the network (any checkpoint's)")
        if isinstance(checkpoints, (str, os.PathLike, Mapping)) or not isinstance(checkpoints, Sequence):
            raise bad_value(
                "checkpoints",
                checkpoints,
                "expected a list of state dicts or checkpoint file paths",
                "wrap a single checkpoint in a list: checkpoints=[state_dict]",
            )
        if len(checkpoints) == 0:
            raise bad_value(
                "checkpoints", checkpoints, "expected at least one checkpoint", "pass a list of them"
            )
        for c, ckpt in enumerate(checkpoints):
            if not isinstance(ckpt, (Mapping, str, os.PathLike)):
                raise bad_value(
                    f"checkpoints[{c}]",
                    ckpt,
                    "expected a state dict or the path of a checkpoint file",
                    "pass model.state_dict() or the path it was saved to",
                )
        rates = _check_learning_rates(learning_rates, len(checkpoints))
        if batch_size_train != "full":
            if isinstance(batch_size_train, str):
                raise bad_value(
                    "batch_size_train", batch_size_train, "expected a positive int or 'full'", "pass e.g. 32"
                )
            check_positive_int("batch_size_train", batch_size_train)
        if projector is not None and not (hasattr(projector, "project") or callable(projector)):
            raise bad_value(
                "projector",
                projector,
                "expected a datatrace projector, an object with project(grads) -> (b, k), or a callable",
                "pass e.g. a datatrace random projector, or None for full gradients",
            )
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        check_bool("progress", progress)
        self.model = model
        self.task = task
        self.checkpoints = list(checkpoints)
        self.learning_rates = rates
        self.batch_size_train = batch_size_train
        self.params = params
        self.projector = projector
        self.dtype = dtype
        self.batch_size = batch_size
        self.progress = progress

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _at_checkpoint(self, c: int) -> FunctionalModel:
        """Load checkpoint ``c`` into the private working copy and view it as a FunctionalModel."""
        name = f"checkpoints[{c}]"
        state = load_checkpoint(self.checkpoints[c], name)
        reference: dict[str, torch.Tensor] = self._reference_state_
        scope = self._scope_names_
        missing = [k for k in scope if k not in state]
        unexpected = [k for k in state if k not in reference]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(
                    f"lacks the parameter(s) in scope {missing[:10]}" + (" ..." if len(missing) > 10 else "")
                )
            if unexpected:
                parts.append(
                    f"has key(s) the model does not know {unexpected[:10]}"
                    + (" ..." if len(unexpected) > 10 else "")
                )
            hint = ""
            if unexpected and all(k.startswith("module.") for k in unexpected):
                hint = (
                    " The keys start with 'module.': the checkpoint was saved from a DistributedDataParallel or "
                    "DataParallel wrapper; save model.module.state_dict() or strip the prefix."
                )
            raise ValueError(
                f"{name} {' and '.join(parts)}. The model's keys are {list(reference)[:10]}"
                + (" ..." if len(reference) > 10 else "")
                + f".{hint} Fix: pass state dicts of this model's architecture (model.state_dict() at each checkpoint)."
            )
        wrong = {
            k: (tuple(v.shape), tuple(reference[k].shape))
            for k, v in state.items()
            if v.shape != reference[k].shape
        }
        if wrong:
            detail = ", ".join(f"{k}: {got} instead of {want}" for k, (got, want) in list(wrong.items())[:6])
            raise ValueError(
                f"{name} has tensors of the wrong shape ({detail}). Fix: pass checkpoints of this model's "
                "architecture."
            )
        left_out = [k for k in reference if k not in state]
        if left_out:
            logger.warning(
                "%s does not hold %s (out of scope); they keep the model's current values at this checkpoint.",
                name,
                left_out[:10],
            )
        work: nn.Module = self._work_model_
        work.load_state_dict({**reference, **state}, strict=True)
        fmodel = FunctionalModel(work, self.task, self.params)
        check_finite(fmodel.theta, f"the parameters of {name}", "Fix: drop or repair that checkpoint.")
        return fmodel

    def _fits_itself(self) -> bool:
        """A datatrace Projector (fit per checkpoint, projected VJPs) rather than a plain fixed map."""
        return hasattr(self.projector, "fit") and hasattr(self.projector, "project_vjps")

    def _fit_projector(self, fmodel: FunctionalModel, c: int) -> None:
        """Fit the private copy of a datatrace projector to checkpoint ``c`` and check it is the same map."""
        if self.projector is None or not self._fits_itself():
            return
        projector = self.projector_.fit(fmodel, self.n_train_)
        fingerprint = projector.fingerprint() if hasattr(projector, "fingerprint") else None
        if c == 0 and not hasattr(self, "projection_fingerprint_"):
            self.projection_fingerprint_ = fingerprint
        elif fingerprint != self.projection_fingerprint_:
            raise RuntimeError(
                f"the projector drew a different projection at checkpoint {c} ({fingerprint}) than at checkpoint 0 "
                f"({self.projection_fingerprint_}); TracIn needs one fixed map for every checkpoint and query. Fix: "
                "use a projector whose matrix depends only on its settings and seed (datatrace's projectors do)."
            )

    def _project(self, rows: torch.Tensor) -> torch.Tensor:
        if self.projector is None:
            return rows
        project = getattr(self.projector, "project", self.projector)
        out = project(rows)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != rows.shape[0]:
            raise ValueError(
                f"projector returned {describe(out)} for {rows.shape[0]} gradient rows; it must return a tensor "
                f"of shape ({rows.shape[0]}, k). Fix: pass a projector whose project(grads) maps (b, p) to (b, k)."
            )
        return out

    @property
    def supports_measurement(self) -> bool:  # type: ignore[override]
        """``measurement=`` works on full gradient rows (no projector, or a plain linear map); a datatrace projector
        builds its backward passes on the task's own measurement."""
        return self.projector is None or not self._fits_itself()

    def _rows(
        self,
        fmodel: FunctionalModel,
        source: DataSource,
        which: str,
        c: int,
        measurement: Measurement | None = None,
    ) -> torch.Tensor:
        """Per-example gradients (projected) of ``source`` at checkpoint ``c``, sharded over ranks if any."""
        n_ckpt = len(self.checkpoints)
        self._fit_projector(fmodel, c)
        if self.projector is not None and self._fits_itself():
            projector, root = self.projector_, "loss" if which == "train" else "measurement"

            def fn(batch: tuple) -> torch.Tensor:  # projected gradients, never the full rows (LoGra)
                return projector.project_vjps(fmodel.prepare(batch), root)[:, 0]

            post = None
        else:
            if which == "train":
                fn = fmodel.per_example_grads
            else:

                def fn(batch: tuple) -> torch.Tensor:
                    return fmodel.per_example_measurement_grads(batch, measurement)

            post = self._project

        desc = f"{which} gradients, checkpoint {c + 1}/{n_ckpt}"
        return per_example_rows(
            fn,
            source,
            self.task,
            f"{which} data at checkpoint {c}",
            lambda i: f"gradient of {which} example {i} at checkpoint {c}",
            "check that example and that checkpoint.",
            progress=self.progress,
            desc=desc,
            batch_size=self.batch_size,
            post=post,
        )

    # -- fitting -----------------------------------------------------------------------------------------------
    def fit(self, train: DataLike) -> TracIn:
        """Compute and keep the training gradients at every checkpoint (projected if a projector was given)."""
        source = as_data_source(train, "train", self.batch_size)
        source.check_finite()
        for c, ckpt in enumerate(self.checkpoints):  # fail fast on a missing file, before any gradient work
            if isinstance(ckpt, (str, os.PathLike)) and not Path(ckpt).is_file():
                load_checkpoint(ckpt, f"checkpoints[{c}]")
        work = prepare_model(self.model, self.dtype)
        self._work_model_ = work
        self._reference_state_ = {k: v.detach().clone() for k, v in work.state_dict().items()}
        self._scope_names_ = list(select_parameters(work, self.params))
        n = len(source)
        b = n if self.batch_size_train == "full" else int(self.batch_size_train)
        self.n_train_ = n
        if self.projector is not None and self._fits_itself():
            self.projector_ = copy.deepcopy(self.projector)  # never fit the user's object in place
            self.__dict__.pop("projection_fingerprint_", None)
        grads = []
        for c in range(len(self.checkpoints)):
            fmodel = self._at_checkpoint(c)
            grads.append(self._rows(fmodel, source, "train", c))
        self.train_grads_ = torch.stack(grads)  # (n_checkpoints, n_train, p or k)
        self.step_weights_ = torch.tensor(
            [rate / b for rate in self.learning_rates],
            dtype=self.train_grads_.dtype,
            device=self.train_grads_.device,
        )
        self.effective_batch_size_ = b
        self.num_params_ = fmodel.num_params
        logger.info(
            "TracIn fitted on %d examples at %d checkpoint(s): %d parameters in scope, %d stored per gradient",
            n,
            len(self.checkpoints),
            fmodel.num_params,
            self.train_grads_.shape[-1],
        )
        return self

    @property
    def fitted_model(self) -> nn.Module:
        """The private working copy of the model, holding the last checkpoint loaded (the last one after ``fit``)."""
        self.check_is_fitted()
        return self._work_model_

    # -- queries -----------------------------------------------------------------------------------------------
    def query_gradients(self, query: DataLike, measurement: Measurement | None = None) -> torch.Tensor:
        """``grad f_q(theta_c)`` (projected if a projector was given), shape ``(n_checkpoints, n_query, p or k)``."""
        self.check_is_fitted()
        self.check_measurement(measurement)
        source = as_data_source(query, "query", self.batch_size)
        source.check_finite()
        return torch.stack(
            [
                self._rows(self._at_checkpoint(c), source, "query", c, measurement)
                for c in range(len(self.checkpoints))
            ]
        )

    def score(self, query: DataLike, measurement: Measurement | None = None) -> Scores:
        """TracInCP scores ``values[q, i] = sum_c (eta_c / B) grad f_q(theta_c) . grad l(z_i, theta_c)``.

        In datatrace's convention: the first-order rise of query ``q``'s measurement if example ``i``'s SGD updates
        were skipped (positive: proponent), in the measurement's units. ``measurement(model, batch) -> (batch_size,)``
        replaces the task's measurement for this call (on full gradients or a plain projection map; a datatrace
        projector is built on the task's own measurement and refuses it).
        """
        q_grads = self.query_gradients(query, measurement)
        weights = self.step_weights_.to(q_grads.dtype)
        values = torch.einsum("c,cqk,cik->qi", weights, q_grads, self.train_grads_.to(q_grads.dtype))
        return Scores(values, self.describe_measurement(measurement), self.metadata())

    def self_influence(self) -> torch.Tensor:
        """``sum_c (eta_c / B) ||grad l(z_i, theta_c)||^2`` for every training example, shape ``(n_train,)``.

        The score of each example on its own loss: the first-order rise of its loss if its own updates were
        skipped (Pruthi et al.'s self-influence; large for atypical or mislabelled examples).
        """
        self.check_is_fitted()
        return torch.einsum("c,cik->i", self.step_weights_, self.train_grads_.pow(2))

    def metadata(self) -> dict[str, Any]:
        """``Scores.metadata`` of this attributor (:meth:`Attributor.scores_metadata`)."""
        self.check_is_fitted()
        projected = None if self.projector is None else int(self.train_grads_.shape[-1])
        return self.scores_metadata(
            variant="TracInCP (Pruthi et al. 2020), first order, no propagation through later steps",
            n_checkpoints=len(self.checkpoints),
            learning_rates=list(self.learning_rates),
            batch_size_train=self.effective_batch_size_,
            step_weights=[float(w) for w in self.step_weights_],
            num_params=self.num_params_,
            projected_dim=projected,
            projector=None if self.projector is None else type(self.projector).__name__,
            projection=getattr(self, "projection_fingerprint_", None),
            dtype=str(self.train_grads_.dtype),
            task=repr(self.task),
        )

    def __repr__(self) -> str:
        return (
            f"TracIn(n_checkpoints={len(self.checkpoints)}, batch_size_train={self.batch_size_train!r}, "
            f"params={self.params!r}, projector={type(self.projector).__name__ if self.projector else None})"
        )
