"""Influence functions (Koh & Liang 2017) on any PyTorch model.

With the training objective ``L(theta) = (1/n) sum_i l(z_i, theta) + sum_b lambda_b/2 ||theta_b||^2`` of
:mod:`datatrace.tasks`, its minimiser ``theta_hat`` and (an approximation of) its Hessian ``H``:

* upweighting example ``i`` by ``eps`` moves the minimiser by ``d theta / d eps = -(1/n) H^{-1} g_i`` with
  ``g_i = grad l(z_i, theta_hat)``; removal is ``eps = -1``, so

      theta_{-i} - theta_hat  ~  (1/n) H^{-1} g_i                               (params_change)

* by the chain rule, a query measurement ``f_q`` changes by

      f_q(theta_{-i}) - f_q(theta_hat)  ~  (1/n) grad f_q^T H^{-1} g_i          (score)

  positive on a loss means removing ``i`` raises the query's loss: ``i`` is a proponent;
* self-influence is the score of an example on its own loss, ``(1/n) g_i^T H^{-1} g_i``: how much its loss would
  rise if it were left out (large for atypical, mislabelled or memorised examples).

Removing a set ``S`` is, to first order, the sum of the individual scores.

**Units, checked where it is cheap.** Every :class:`~datatrace.Scores` says whether its route keeps those units
(``metadata["units"]``, with ``metadata["units_reason"]`` in one sentence): ``"leave-one-out"`` for the routes that
solve with the Hessian or Gauss-Newton matrix itself (exact, gauss-newton, cg, lissa, arnoldi, a block-diagonal
route with one block), ``"rank-only"`` for those whose scale is known to differ from it (identity, diagonal,
K-FAC, EK-FAC, several blocks): an approximation that smears the curvature over directions the gradients do not
take underestimates it along the gradients and inflates the scores, so use their order, not their size.
``"unknown"`` for a route datatrace does not know. When the measurement is the task's loss (the default), removing
one example cannot take a query's loss below zero, so ``score[q, i] >= -loss_q`` holds for actual retraining
with a non-negative loss (every built-in task's). A first-order estimate with the exact curvature rarely breaks
it for cross-entropy (its first-order change is about ``(1 - p)`` times a logit change, its loss about
``1 - p``, so the logit must move by more than one); an inflated one often does. Near a perfect fit the
linearisation itself can overshoot (under a squared error ``2 r d + d^2`` becomes ``2 r d``, below ``-r^2`` once
``d < -r/2``), whatever the curvature. ``metadata["below_minus_loss"]`` counts the queries having a score below
``-loss_q`` (within :func:`count_below_minus_loss`'s tolerance, tiny against the largest score) and
``"below_minus_loss_fraction"`` their share; a warning names the likely cause when more than
:data:`BELOW_MINUS_LOSS_WARN` of the queries do.

**Under torch.distributed** (a process group the caller initialised, e.g. with ``torchrun``; every rank makes the
same calls) each rank computes and keeps only the training gradients of its own contiguous shard
(:func:`datatrace.distributed.shard_indices`): memory per rank is ``n / world_size`` rows. ``score`` multiplies the
(replicated) solved query gradients with the local rows and gathers the ``n_query x n`` scores, never the
``n x p`` gradients; ``self_influence`` solves the local rows when the curvature's ``solve`` is local (dense, K-FAC,
EK-FAC, diagonal, Arnoldi) and the gathered rows when it makes passes over the data itself (CG, LiSSA:
``Curvature.collective_solve``), because then every rank must solve the same rows; ``params_change`` and
``removal_params`` assemble the few rows they need with one all-reduce. ``train_grads_`` gathers all rows on
first use (a collective).

**Memory.** The ``n x p`` training gradients are kept when they fit ``max_bytes``; above it (or with
``keep_gradients=False``) they are streamed: never held, recomputed batch by batch in each ``score`` /
``self_influence`` call (memory: one batch of rows and the ``n_query x p`` solved queries, which ``query_rank``
compresses per layer, :mod:`datatrace.attributors.query_rank`), the same numbers at one gradient pass per call.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from datatrace.attributors.base import (
    Attributor,
    Measurement,
    check_candidates,
    check_index_set,
    check_stationary,
    default_memory_budget,
    json_scalars,
)
from datatrace.attributors.query_rank import LowRankQueries, compress_queries, layer_products
from datatrace.capture.engine import Layer, find_layers, per_example_gradient_sums, per_example_gradients
from datatrace.capture.scope import narrow_to_supported
from datatrace.curvature import Curvature, make_curvature
from datatrace.curvature.base import TrainingState, format_bytes, output_sizes
from datatrace.data import DataLike, DataSource, as_data_source, cast_batch
from datatrace.distributed import (
    all_gather_rows,
    all_reduce_sum,
    collective_part,
    raise_if_any_failed,
    shard_indices,
    world,
)
from datatrace.errors import (
    bad_value,
    check_bool,
    check_finite,
    check_indices,
    check_positive_int,
    is_out_of_memory,
)
from datatrace.gradients.functional import (
    FunctionalModel,
    check_model_and_task,
    checked_rows,
    per_example_rows,
    prepare_model,
)
from datatrace.scores import Scores
from datatrace.tasks import Task

logger = logging.getLogger(__name__)

__all__ = [
    "BELOW_MINUS_LOSS_WARN",
    "LEAVE_ONE_OUT",
    "RANK_ONLY",
    "ROUTE_UNITS",
    "InfluenceFunction",
    "Measurement",
    "count_below_minus_loss",
    "route_units",
]

#: what a training or query gradient row failing the finiteness check should prompt
_ROW_FIX = "check that example's inputs and label, and the model's outputs on it."

LEAVE_ONE_OUT = "leave-one-out"
RANK_ONLY = "rank-only"
#: per curvature route: whether its scores are in first-order leave-one-out units, and why (one sentence)
ROUTE_UNITS: dict[str, tuple[str, str]] = {
    "exact": (LEAVE_ONE_OUT, "the dense Hessian of the training objective, solved exactly"),
    "gauss-newton": (
        LEAVE_ONE_OUT,
        "the dense Gauss-Newton matrix of the training objective, solved exactly",
    ),
    "cg": (LEAVE_ONE_OUT, "conjugate gradient on the Hessian or Gauss-Newton matrix itself (at convergence)"),
    "lissa": (
        LEAVE_ONE_OUT,
        "a Neumann series of the Hessian or Gauss-Newton matrix itself (at convergence)",
    ),
    "arnoldi": (
        LEAVE_ONE_OUT,
        "the exact inverse on the top eigenpairs of the Hessian or Gauss-Newton matrix (at convergence)",
    ),
    "block-diagonal": (
        RANK_ONLY,
        "several dense blocks without the curvature between them: it underestimates the curvature along the "
        "gradients and inflates the scores",
    ),
    "diagonal": (
        RANK_ONLY,
        "a diagonal curvature ignores the correlations between parameters, so its scale is not that of "
        "leave-one-out",
    ),
    "kfac": (
        RANK_ONLY,
        "the Kronecker factorisation (and the blocks per layer) smears the curvature over directions the "
        "gradients do not take, which inflates the scores against the Gauss-Newton matrix",
    ),
    "ekfac": (
        RANK_ONLY,
        "the Kronecker eigenbasis (and the blocks per layer) smears the curvature over directions the gradients "
        "do not take, which inflates the scores against the Gauss-Newton matrix, even with exact eigenvalues",
    ),
    "identity": (RANK_ONLY, "H ~ I: gradient dot products, not in any loss units"),
}
#: score_candidates: above this share of the training set among all queries' candidates, every kept row is scored
#: and the candidates' columns kept (copying most rows costs more than the product; see ``projected``'s constant)
ALL_ROWS_FRACTION = 0.25
#: above this share of queries with a score below minus their own loss, score() logs a warning
BELOW_MINUS_LOSS_WARN = 0.05
#: relative tolerance of the bound score >= -loss (rounding of the loss and of the scores)
BELOW_MINUS_LOSS_RTOL = 1e-6
#: absolute tolerance of that bound, relative to the largest |score| of the matrix: a query fitted with a loss of
#: ~1e-8 can overshoot to a score of ~-2e-8 at first order, which is no statement about the scale of the scores
BELOW_MINUS_LOSS_ATOL = 1e-6


def route_units(route: str, info: dict[str, Any]) -> tuple[str, str]:
    """``(units, reason)`` of a fitted curvature route by its name and ``info``: ``"leave-one-out"``,
    ``"rank-only"`` or ``"unknown"`` (a route not in :data:`ROUTE_UNITS`), with one sentence why.

    ``"auto"`` takes its chosen route's; a block-diagonal route with a single block is the dense one.
    """
    if route == "auto" and isinstance(info.get("auto_choice"), str):
        return route_units(info["auto_choice"], info)
    if route == "block-diagonal" and info.get("num_blocks") == 1:
        return LEAVE_ONE_OUT, "one dense block covering every parameter in scope, solved exactly"
    if route == "arnoldi" and isinstance(info.get("captured_fraction"), float) and not info.get("exact"):
        units, reason = ROUTE_UNITS[route]
        share = info["captured_fraction"]
        return units, f"{reason}; the kept eigenpairs hold an estimated {share:.0%} of the spectrum's mass"
    if route in ROUTE_UNITS:
        return ROUTE_UNITS[route]
    return "unknown", f"datatrace does not know whether the route {route!r} keeps leave-one-out units"


def count_below_minus_loss(values: torch.Tensor, losses: torch.Tensor) -> int:
    """How many rows (queries) of ``values`` have a score below ``-losses[q]``: impossible for leave-one-out changes
    of a non-negative loss, since the retrained loss ``loss_q + score`` cannot be negative. Tolerance:
    :data:`BELOW_MINUS_LOSS_RTOL` of the loss plus :data:`BELOW_MINUS_LOSS_ATOL` of the largest ``|score|`` (so
    that first-order overshoots of losses near zero, far below the scale of the scores, do not count)."""
    v = values.to(torch.float64)
    loss = losses.to(torch.float64).reshape(-1, 1)
    scale = float(v.abs().max()) if v.numel() else 0.0
    floor = -loss * (1.0 + BELOW_MINUS_LOSS_RTOL) - BELOW_MINUS_LOSS_ATOL * scale
    return int((v < floor).any(dim=1).sum())


def _dot(queries: torch.Tensor | LowRankQueries, rows: torch.Tensor) -> torch.Tensor:
    """``(n_query, b)`` products of solved queries (dense rows, or compressed per layer) with gradient rows."""
    return queries.dot(rows) if isinstance(queries, LowRankQueries) else queries @ rows.T


class InfluenceFunction(Attributor):
    """Leave-one-out influence of training examples on queries, without retraining.

    Args:
        model: the trained ``nn.Module`` (never modified: datatrace works on a private copy).
        task: a :class:`~datatrace.Task` with the per-example loss, the query measurement and the weight decay
            the model was trained with.
        curvature: a route name (``"auto"``: exact when the dense matrix fits, else EK-FAC, else CG;
            ``"exact"``, ``"gauss-newton"``, ``"cg"``, ``"ekfac"``..., see :mod:`datatrace.curvature`) or a
            :class:`~datatrace.curvature.Curvature` instance.
        damping: added to the curvature's eigenvalues, or ``"auto"`` (the route's principled default).
        params: module or parameter name patterns in scope (``None``: every trainable parameter).
        dtype: working precision (float64 by default: influence differences are small numbers).
        batch_size: examples per batch for gradient computations (default: the data's own, or 256).
        progress: show tqdm progress bars.
        max_bytes: memory budget of the ``n x p`` training-gradient matrix this attributor keeps (under
            torch.distributed: each rank's ``n / world_size`` rows), checked before the gradient pass. ``None``:
            a share of the memory available now (:func:`~datatrace.attributors.base.default_memory_budget`);
            above it the gradients are streamed (``keep_gradients="auto"``). The curvature route's own need (e.g. the dense ``p x p`` matrix) is checked before the gradient pass
            too, against the route's ``max_bytes``. :meth:`self_influence` later solves all rows at once: a
            second matrix of the same size.
        keep_gradients: keep the ``n x p`` training gradients in memory (``True``: refuse above ``max_bytes``),
            or stream them (``False``: never held; each :meth:`score` and :meth:`self_influence` call recomputes
            them batch by batch, one pass of per-example gradients over the training data per call, so batch the
            queries). ``"auto"`` (default): keep them when they fit ``max_bytes``, stream otherwise, and say so.
        query_rank: compress each query's solved gradient ``H^{-1} grad f_q`` to this rank per supported layer
            (truncated SVD of its ``(out, in')`` block, :mod:`datatrace.attributors.query_rank`) before the
            products with the training gradients: ``r (out + in' + 1)`` numbers per query and layer instead of
            ``out * in'``. ``None`` (default): full rank. ``Scores.metadata`` reports the smallest share of a query
            block's squared norm kept (``query_rank_energy_min``).

    Example:
        >>> import torch, datatrace
        >>> X, y = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> w = torch.linalg.lstsq(torch.cat([X, torch.ones(50, 1, dtype=X.dtype)], 1), y).solution
        >>> with torch.no_grad(): _ = model.weight.copy_(w[:3].T); _ = model.bias.copy_(w[3])
        >>> inf = datatrace.InfluenceFunction(model, datatrace.RegressionTask(), progress=False).fit((X, y))
        >>> inf.score((X[:2], y[:2])).values.shape
        torch.Size([2, 50])
    """

    fitted_attribute = "curvature_"
    route = "influence function"
    supports_measurement = True

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        curvature: str | Curvature = "auto",
        damping: float | str = "auto",
        params: str | list[str] | None = None,
        dtype: torch.dtype | None = torch.float64,
        batch_size: int | None = None,
        progress: bool = True,
        max_bytes: int | None = None,
        keep_gradients: bool | str = "auto",
        query_rank: int | None = None,
    ) -> None:
        check_model_and_task(model, task, dtype)
        if max_bytes is not None:
            check_positive_int("max_bytes", max_bytes)
        if query_rank is not None:
            check_positive_int("query_rank", query_rank)
        if not (isinstance(keep_gradients, bool) or keep_gradients == "auto"):
            raise bad_value(
                "keep_gradients",
                keep_gradients,
                "expected True (keep the n x p training gradients in memory), False (recompute them in every "
                "score call) or 'auto' (keep them when they fit max_bytes)",
                "pass one of True, False, 'auto'",
            )
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        check_bool("progress", progress)
        self.model = model
        self.task = task
        self.curvature = curvature
        self.damping = damping
        self.params = params
        self.dtype = dtype
        self.batch_size = batch_size
        self.progress = progress
        self.max_bytes = max_bytes
        self.keep_gradients = keep_gradients
        self.query_rank = query_rank
        if isinstance(curvature, Curvature) and damping != "auto":
            raise bad_value(
                "damping",
                damping,
                f"a Curvature instance ({curvature!r}) carries its own damping, so this one would be ignored",
                "set it on the instance, e.g. curvature=ExactHessian(damping=...), and leave damping='auto'",
            )
        make_curvature(curvature, damping)  # validate the name and damping now, not after minutes of work

    # -- fitting -----------------------------------------------------------------------------------------------
    def fit(self, train: DataLike) -> InfluenceFunction:
        """Compute training gradients and the curvature on ``train`` (the data the model was trained on)."""
        source = as_data_source(train, "train", self.batch_size)
        source.check_finite()
        fmodel = FunctionalModel(prepare_model(self.model, self.dtype), self.task, self.params)
        check_finite(fmodel.theta, "the model's parameters", "Fix: pass a model whose weights are finite.")
        curvature = make_curvature(self.curvature, self.damping)
        check_size = getattr(curvature, "check_size", None)
        if callable(check_size):  # e.g. the dense routes' p x p matrix: refuse before minutes of gradients
            check_size(fmodel)
        choose = getattr(curvature, "choose", None)
        if callable(choose):  # curvature="auto": say which route and why before the long work
            route, reason = choose(fmodel, source)
            if self.progress and world()[0] == 0:
                tqdm.write(f"datatrace: curvature='auto' chose {route.name!r} ({reason})", file=sys.stderr)
            route_size = getattr(route, "check_size", None)
            if callable(route_size):
                route_size(fmodel)
        else:
            route = curvature
        fmodel = self._narrow_scope(fmodel, source, route)
        hook_layers = self._layers_for_products(fmodel)
        if (
            hook_layers is not None
        ):  # per-example gradients from the hooks where vmap fails (e.g. BERT's masks)
            fmodel.layer_rows = functools.partial(per_example_gradients, fmodel, hook_layers)
        streams = self._choose_streaming(fmodel, route, len(shard_indices(len(source))))
        self.fmodel_ = fmodel
        self.train_ = source
        self.streams_ = streams
        local_indices, local_grads, sums = self._local_training_gradients(
            fmodel, source, keep=not streams, layers=hook_layers
        )
        ratio = self._check_stationary(fmodel, sums, len(source))
        curvature.training_state = TrainingState(ratio, *output_sizes(fmodel, source))
        curvature.fit(fmodel, source, progress=self.progress)
        self.local_indices_ = local_indices
        self.local_grads_ = local_grads
        self._product_layers = hook_layers if streams else None
        self.world_size_ = world()[1]
        self._all_grads: torch.Tensor | None = None if world()[2] else local_grads
        self.curvature_ = curvature
        self.n_train_ = len(source)
        self._train_ihvp: torch.Tensor | None = None
        logger.info(
            "fitted %s on %d examples (%d on this rank), %d parameters: %s",
            curvature.name,
            len(source),
            len(local_indices),
            fmodel.num_params,
            curvature.info,
        )
        return self

    def _narrow_scope(self, fmodel: FunctionalModel, source: DataSource, route: Curvature) -> FunctionalModel:
        """``fmodel``, or, for a route that covers only supported layers (K-FAC, EK-FAC) with the default scope,
        the same model restricted to the parameters it covers (:func:`datatrace.capture.scope.narrow_to_supported`);
        ``params_left_out_`` names the others with the reason for each."""
        self.params_left_out_: dict[str, str] = {}
        if not (route.layers_only and fmodel.default_scope):
            return fmodel
        fmodel, self.params_left_out_ = narrow_to_supported(
            fmodel,
            source,
            f"curvature={route.name!r}",
            "use curvature='auto', 'cg' or 'arnoldi' (any parameters), or ProjectedInfluence",
            announce=self.progress and world()[0] == 0,
        )
        return fmodel

    def _training_batches(
        self, fmodel: FunctionalModel, source: DataSource, indices: torch.Tensor, desc: str
    ) -> Iterator[tuple[torch.Tensor, Any]]:
        """``(indices, batch)`` of ``indices``, each batch cast and checked by the task (a bad label named by its
        example index), with a progress bar."""
        show = self.progress and world()[0] == 0
        with tqdm(total=len(indices), desc=desc, disable=not show, leave=False) as bar:
            for idx, batch in source.batches(indices=indices):
                yield (
                    idx,
                    self.task.check_batch(fmodel.model, cast_batch(batch, fmodel.dtype, fmodel.device), idx),
                )
                bar.update(len(idx))

    def _rows(
        self,
        fmodel: FunctionalModel,
        idx: torch.Tensor,
        batch: Any,
        fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The per-example gradient rows of one checked batch (:func:`checked_rows`), or ``fn``'s per-example rows."""
        return checked_rows(
            fmodel.per_example_grads if fn is None else fn,
            self.task,
            "train",
            idx,
            batch,
            lambda i: f"gradient of train example {i}",
            _ROW_FIX,
        )

    def _training_rows(
        self, fmodel: FunctionalModel, source: DataSource, indices: torch.Tensor, desc: str
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(indices, per-example gradient rows)`` of ``indices``, batch by batch."""
        for idx, batch in self._training_batches(fmodel, source, indices, desc):
            yield idx, self._rows(fmodel, idx, batch)

    def _local_training_gradients(
        self, fmodel: FunctionalModel, source: DataSource, keep: bool, layers: list[Layer] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """This rank's shard of the training indices, their gradients (``None`` when streamed) and, for the
        stationarity check, ``[sum_i g_i, sum_i ||g_i||]`` over the shard (float64); a failure on one rank raises
        on every rank. Streamed, with supported ``layers`` holding every parameter in scope, the sums come from
        the layers' hooks without the batch's ``b x p`` rows (:func:`per_example_gradient_sums`)."""
        if not keep and layers is not None:
            sums = self._hooked_sums(fmodel, source, layers)
            if sums is not None:
                return shard_indices(len(source)), None, sums
        indices = shard_indices(len(source))
        error = None
        grads = None
        sums = torch.zeros(fmodel.num_params + 1, dtype=torch.float64, device=fmodel.device)
        try:
            if keep:
                grads = torch.empty(len(indices), fmodel.num_params, dtype=fmodel.dtype, device=fmodel.device)
            filled = 0
            for _, rows in self._training_rows(fmodel, source, indices, "training gradients"):
                if grads is not None:
                    grads[filled : filled + len(rows)] = rows  # in place: no second n x p copy
                filled += len(rows)
                sums[:-1] += rows.sum(dim=0).to(torch.float64)
                sums[-1] += rows.norm(dim=1).sum().to(torch.float64)
        except Exception as err:
            error = err
            if is_out_of_memory(err) and not isinstance(err, MemoryError):  # a size problem, named as one
                error = self._memory_error(fmodel, len(indices), str(err))
                if not world()[2]:
                    raise error from err
            if not world()[2]:
                raise
        raise_if_any_failed(error, "training gradients")
        return indices, grads, sums

    def _layers_for_products(self, fmodel: FunctionalModel) -> list[Layer] | None:
        """The supported layers when they hold every parameter in scope (then streamed scores come from their
        inputs and output gradients, :func:`layer_products`), else ``None`` (per-example gradient rows)."""
        try:
            layers, uncovered = find_layers(fmodel, "streamed scores", "use keep_gradients=True")
        except ValueError:  # a layer its kind cannot handle (a grouped convolution): rows instead
            return None
        return layers if layers and not uncovered else None

    def _choose_streaming(self, fmodel: FunctionalModel, route: Curvature, rows: int) -> bool:
        """Whether to stream the training gradients rather than keep the ``rows x p`` matrix (``keep_gradients``);
        the same answer on every rank."""
        need = rows * fmodel.num_params * fmodel.theta.element_size()
        budget, origin = self._budget(fmodel)
        if self.keep_gradients is True:
            if need > budget:
                raise self._memory_error(fmodel, rows)
            wanted = False
        else:
            wanted = self.keep_gradients is False or need > budget
        streams = bool(all_reduce_sum(torch.tensor([float(wanted)])).item() > 0)
        if streams and world()[2] and getattr(route, "collective_solve", False):
            raise bad_value(
                "keep_gradients",
                self.keep_gradients,
                f"streamed training gradients under torch.distributed need a curvature whose solve is local, and "
                f"{route.name!r} makes passes over the data in its solve",
                "use curvature='ekfac', 'kfac', 'arnoldi' or 'diagonal', keep_gradients=True with a larger "
                "max_bytes, or fewer parameters in scope (params=)",
            )
        if streams:
            why = (
                "keep_gradients=False"
                if self.keep_gradients is False
                else f"the {rows:,} x {fmodel.num_params:,} training gradients ({format_bytes(need)}) exceed "
                f"max_bytes={format_bytes(budget)} ({origin})"
            )
            message = (
                f"datatrace: streaming the training gradients ({why}): each score() and self_influence() call "
                "recomputes them, one pass over the training data per call; score many queries per call"
            )
            logger.info(message)
            if self.progress and world()[0] == 0 and self.keep_gradients == "auto":
                tqdm.write(message, file=sys.stderr)
        else:
            logger.debug("training gradients: %d x %d, %s of %s", rows, fmodel.num_params, need, budget)
        return streams

    def _memory_error(self, fmodel: FunctionalModel, rows: int, detail: str = "") -> MemoryError:
        """The error for an ``rows x p`` training-gradient matrix that does not fit, with the alternatives."""
        need = rows * fmodel.num_params * fmodel.theta.element_size()
        budget, origin = self._budget(fmodel)
        return MemoryError(
            f"InfluenceFunction keeps the training gradients as a {rows:,} x {fmodel.num_params:,} matrix "
            f"(examples x parameters in scope) in {fmodel.dtype}: {format_bytes(need)}, "
            + (f"and the allocation failed ({detail}). " if detail else "")
            + f"The budget is max_bytes={format_bytes(budget)} ({origin}), and keep_gradients="
            f"{self.keep_gradients!r} asks to keep the matrix. Fix: keep_gradients='auto' or False (stream the "
            "gradients: one pass over the training data per score call); use datatrace.ProjectedInfluence("
            "..., store_dir=...), which keeps low-dimensional projected gradients on disk; restrict the parameters "
            "with params= (e.g. the last layer); or raise max_bytes if the memory is there."
        )

    def _budget(self, fmodel: FunctionalModel) -> tuple[int, str]:
        if self.max_bytes is not None:
            return self.max_bytes, "given"
        return default_memory_budget(fmodel.device)

    @property
    def train_grads_(self) -> torch.Tensor:
        """All ``n x p`` training gradients in index order (under torch.distributed: gathered from the ranks on
        first use, a collective every rank must make)."""
        self.check_is_fitted()
        if self.streams_:
            raise RuntimeError(
                "this InfluenceFunction streams its training gradients (keep_gradients="
                f"{self.keep_gradients!r}: the n x p matrix was over max_bytes or not wanted), so there is no "
                "train_grads_ matrix. Fix: fit with keep_gradients=True (and a max_bytes the matrix fits), or use "
                "params_change(indices) / score() which compute what they need."
            )
        if self._all_grads is None:
            self._all_grads = all_gather_rows(self.local_grads_)
        return self._all_grads

    def _check_stationary(self, fmodel: FunctionalModel, local_sums: torch.Tensor, n: int) -> float:
        """Warn when far from a stationary point; return ``||grad L|| / mean_i ||grad l_i||``. ``local_sums``:
        ``[sum_i g_i, sum_i ||g_i||]`` over this rank's examples."""
        sums = all_reduce_sum(local_sums)
        full = (sums[:-1] / n).to(fmodel.dtype) + fmodel.regularizer * fmodel.theta
        self.gradient_norm_ = float(full.norm())
        typical = float(sums[-1]) / n or 1.0
        check_stationary(self.gradient_norm_, typical, "||grad L||", "per-example gradient norm")
        return self.gradient_norm_ / typical

    def check_is_fitted(self) -> None:
        """:class:`~datatrace.errors.NotFittedError` before ``fit``; a RuntimeError when used by another number of
        processes than it was fitted with (each holds only its share of the training gradients)."""
        super().check_is_fitted()
        size = world()[1]
        if size != self.world_size_:
            raise RuntimeError(
                f"this InfluenceFunction was fitted sharded over {self.world_size_} process(es), each holding only "
                f"its share of the training gradients, but it is now used by {size} (e.g. inside "
                "datatrace.distributed.local_only()). Fix: call it on every rank, outside local_only(), or fit it "
                "inside local_only() so that one process holds everything."
            )

    @property
    def fitted_model(self) -> nn.Module:
        """The private working copy of the model at ``theta_hat`` (working dtype, eval mode)."""
        self.check_is_fitted()
        return self.fmodel_.model

    @property
    def functional_model(self) -> FunctionalModel:
        """The fitted model and task as functions of the flat in-scope parameter vector ``theta``."""
        self.check_is_fitted()
        return self.fmodel_

    @property
    def training_data(self) -> DataSource:
        self.check_is_fitted()
        return self.train_

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H^{-1} v`` for each row of ``vectors`` (shape ``(m, p)``), with the fitted (damped) curvature."""
        self.check_is_fitted()
        return self.curvature_.solve(vectors)

    # -- queries -----------------------------------------------------------------------------------------------
    def query_gradients(self, query: DataLike, measurement: Measurement | None = None) -> torch.Tensor:
        """``grad f_q(theta_hat)`` for every query, shape ``(n_query, p)``."""
        self.check_is_fitted()
        self.check_measurement(measurement)
        source = as_data_source(query, "query", self.batch_size)
        source.check_finite()

        def rows(batch: tuple) -> torch.Tensor:
            return self.fmodel_.per_example_measurement_grads(batch, measurement)

        # each rank computes its shard's rows; all ranks get all rows in index order (datatrace.distributed)
        return per_example_rows(
            rows,
            source,
            self.task,
            "query",
            lambda i: f"gradient of query example {i}",
            _ROW_FIX,
            progress=self.progress,
            desc="query gradients",
        )

    def score(self, query: DataLike, measurement: Measurement | None = None) -> Scores:
        """Leave-one-out influence of every training example on every query's measurement.

        Returns :class:`~datatrace.Scores` with ``values[q, i] ~ f_q(theta_{-i}) - f_q(theta_hat)
        = (1/n) grad f_q^T H^{-1} g_i``. ``measurement(model, batch) -> (batch_size,)`` replaces the task's
        measurement for this call (e.g. a predicted probability, a margin, one term of a group metric); the
        training side (gradients, curvature) is reused as fitted.
        """
        queries = self._solved_queries(self.query_gradients(query, measurement))
        metadata = self.metadata()
        if isinstance(queries, LowRankQueries):
            metadata.update(
                query_rank=self.query_rank,
                query_rank_energy_min=queries.min_energy,
                query_values_stored_fraction=queries.stored_values / max(1, self.fmodel_.num_params),
            )
        values = self._products(queries) / self.n_train_
        if measurement is None and type(self.task).measurement is Task.measurement:
            losses = self._query_losses(self.prepare_data(query, "query"))
            metadata.update(self._loss_bound(values, losses, metadata))
        return Scores(values, self.describe_measurement(measurement), metadata)

    def score_candidates(
        self, query: DataLike, candidates: Any, measurement: Measurement | None = None
    ) -> torch.Tensor:
        """The scores of a shortlist of training examples per query, ``(n_query, m)``: ``values[q, j] =
        score[q, candidates[q, j]]`` (the same curvature, fitted on the whole training set), from the gradients of
        the candidates only: the kept rows of the union of all queries' candidates, or, when the gradients are
        streamed, only those examples' gradients recomputed (``candidates``: ``(n_query, m)`` training indices, no
        repeats in a row; :func:`datatrace.attributors.base.check_candidates`). Used by
        :func:`datatrace.apps.shortlist.score_shortlist`."""
        self.check_measurement(measurement)
        self.check_is_fitted()
        q_grads = self.query_gradients(query, measurement)
        cand = check_candidates("candidates", candidates, int(q_grads.shape[0]), self.n_train_)
        queries = self._solved_queries(q_grads)
        union, inverse = torch.unique(cand, return_inverse=True)
        if not self.streams_ and not world()[2] and len(union) > ALL_ROWS_FRACTION * self.n_train_:
            values = self._products(queries)  # one product with every kept row beats copying most of them
            return torch.gather(values, 1, cand.to(values.device)) / self.n_train_
        rows = self._selected_rows(union)  # (|U|, p): kept rows, all-reduced, or recomputed when streaming
        values = _dot(queries, rows)
        return torch.gather(values, 1, inverse.to(values.device)) / self.n_train_

    def _solved_queries(self, q_grads: torch.Tensor) -> torch.Tensor | LowRankQueries:
        """``H^{-1} grad f_q`` for every query row, compressed per layer when ``query_rank`` is set."""
        solved = self.curvature_.solve(q_grads)
        check_finite(solved, "H^{-1} grad f (the solved query gradients)", "Fix: raise damping.")
        if self.query_rank is None:
            return solved
        return compress_queries(solved, self.fmodel_, self.query_rank)

    def _products(self, queries: torch.Tensor | LowRankQueries) -> torch.Tensor:
        """``(n_query, n)`` products of the solved queries with every training gradient: from the kept rows, or
        recomputed batch by batch when streaming; under torch.distributed each rank's columns, gathered (never the
        ``n x p`` gradients)."""

        def dot(rows: torch.Tensor) -> torch.Tensor:
            return _dot(queries, rows)

        if not self.streams_:
            local = dot(self.local_grads_)
        else:

            def part() -> torch.Tensor:
                fmodel = self.fmodel_
                n_query = queries.num_queries if isinstance(queries, LowRankQueries) else len(queries)
                out = torch.empty(n_query, len(self.local_indices_), dtype=fmodel.dtype, device=fmodel.device)
                by_layer = None
                if self._product_layers is not None:
                    by_layer = (
                        queries
                        if isinstance(queries, LowRankQueries)
                        else compress_queries(queries, fmodel, None)
                    )
                filled = 0
                batches = self._training_batches(
                    fmodel, self.train_, self.local_indices_, "scores (streamed)"
                )
                for idx, batch in batches:
                    if by_layer is not None and self._product_layers is not None:
                        values = self._layer_products(by_layer, dot, idx, batch)
                    else:
                        values = dot(self._rows(fmodel, idx, batch))
                    out[:, filled : filled + len(idx)] = values
                    filled += len(idx)
                return out

            local = collective_part(part, "scores against the streamed training gradients")
        if world()[2]:
            return all_gather_rows(local.T.contiguous()).T.contiguous()
        return local

    def _hooked_sums(
        self, fmodel: FunctionalModel, source: DataSource, layers: list[Layer]
    ) -> torch.Tensor | None:
        """``[sum_i g_i, sum_i ||g_i||]`` over this rank's shard from the layers' hooks, or ``None`` when the
        hooks disagree with the rows (checked on the first batch)."""
        sums = torch.zeros(fmodel.num_params + 1, dtype=torch.float64, device=fmodel.device)
        error, agreed = None, True
        indices = shard_indices(len(source))
        total: list[torch.Tensor] = []  # the batch's summed gradient, set by norms()
        try:
            for idx, batch in self._training_batches(fmodel, source, indices, "training gradients"):
                total.clear()

                def norms(b: Any) -> torch.Tensor:
                    if not fmodel.layer_rows_agree(b):
                        return torch.zeros(0, 1, dtype=fmodel.dtype)
                    summed, lengths = per_example_gradient_sums(fmodel, layers, fmodel.loss_module, b)
                    total.append(summed)
                    return lengths[:, None]

                lengths = self._rows(fmodel, idx, batch, norms)
                if not total:
                    agreed = False
                    break
                sums[:-1] += total[0]
                sums[-1] += lengths.sum()
        except Exception as err:
            error = err
            if not world()[2]:
                raise
        raise_if_any_failed(error, "training gradients")
        agreed = bool(all_reduce_sum(torch.tensor([float(not agreed)])).item() == 0)
        return sums if agreed else None

    def _layer_products(
        self, queries: LowRankQueries, dot: Any, idx: torch.Tensor, batch: Any
    ) -> torch.Tensor:
        """``(n_query, b)`` products from the layers' inputs and output gradients (:func:`layer_products`), never
        forming the per-example gradients, once the hooks agree with the rows
        (:meth:`FunctionalModel.layer_rows_agree`; else the rows from then on)."""
        fmodel, layers = self.fmodel_, self._product_layers
        if layers is None or not fmodel.layer_rows_agree(
            batch
        ):  # the batch ran through the model in fit already
            self._product_layers = None
            return dot(self._rows(fmodel, idx, batch))
        return checked_rows(
            lambda b: layer_products(queries, fmodel, layers, b),
            self.task,
            "train",
            idx,
            batch,
            lambda i: f"scores of train example {i}",
            _ROW_FIX,
        ).T

    def _stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's training gradients again, batch by batch (streaming mode)."""
        return self._training_rows(
            self.fmodel_, self.train_, self.local_indices_, "training gradients (streamed)"
        )

    def _query_losses(self, query: DataLike) -> torch.Tensor:
        """Every query's own loss at ``theta_hat``, shape ``(n_query,)`` (one forward pass per batch)."""
        fmodel = self.fmodel_

        def rows(batch: tuple) -> torch.Tensor:
            with torch.no_grad():
                return fmodel.losses(fmodel.theta, fmodel.prepare(batch)).reshape(-1, 1)

        source = as_data_source(query, "query", self.batch_size)
        losses = per_example_rows(
            rows, source, self.task, "query", lambda i: f"loss of query example {i}", _ROW_FIX
        )
        return losses.reshape(-1)

    def _loss_bound(
        self, values: torch.Tensor, losses: torch.Tensor, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """``below_minus_loss`` (queries with a score below minus their own loss) and its fraction; a warning
        naming the likely cause above :data:`BELOW_MINUS_LOSS_WARN`. Nothing when a query loss is negative (a
        custom loss the bound does not hold for)."""
        if losses.numel() == 0 or bool((losses < 0).any()):
            return {"below_minus_loss": None, "below_minus_loss_fraction": None}
        count = count_below_minus_loss(values, losses)
        fraction = count / losses.numel()
        if fraction > BELOW_MINUS_LOSS_WARN:
            route = self.curvature_.info.get("auto_choice", metadata.get("route"))
            if metadata.get("units") == RANK_ONLY:
                cause = f"the {route!r} curvature underestimates the curvature along the gradients (rank-only scores)"
                fix = (
                    "for leave-one-out sizes use curvature='gauss-newton', 'exact' or 'cg' (or more damping, which "
                    "shrinks every score); the order of these scores can still be used"
                )
            else:
                cause = (
                    "the first-order estimate itself: a model far from a minimum of its objective, near-zero "
                    "eigenvalues without damping, or queries fitted almost exactly (a first-order change of a loss "
                    "near zero can overshoot it)"
                )
                fix = "raise damping (e.g. damping=1e-3), or train closer to a minimum"
            logger.warning(
                "%d of %d queries (%.0f%%) have a score below minus their own loss, which no retraining can "
                "give (a loss cannot fall below zero): the scores are too large. Likely cause: %s. Fix: %s.",
                count,
                losses.numel(),
                100 * fraction,
                cause,
                fix,
            )
        return {"below_minus_loss": count, "below_minus_loss_fraction": fraction}

    def metadata(self) -> dict[str, Any]:
        """``Scores.metadata`` of this attributor (:meth:`Attributor.scores_metadata`)."""
        self.check_is_fitted()
        info = {k: v for k, v in self.curvature_.info.items() if isinstance(v, (int, float, str, bool))}
        info = json_scalars(info)
        route = str(getattr(self.curvature_, "name", ""))
        units, reason = route_units(route, self.curvature_.info)
        return self.scores_metadata(
            damping=info.get("damping"),
            estimator="InfluenceFunction",
            route=route,
            units=units,
            units_reason=reason,
            curvature=info,
            num_params=self.fmodel_.num_params,
            params_left_out=sorted(getattr(self, "params_left_out_", {})),
            dtype=str(self.fmodel_.dtype),
            gradient_norm=self.gradient_norm_,
            task=repr(self.task),
        )

    def _solve_everywhere(self) -> bool:
        """Whether every rank must solve the same rows: the route's solve passes over the data (collectives)."""
        return world()[2] and bool(getattr(self.curvature_, "collective_solve", False))

    def _train_solved(self) -> torch.Tensor:
        """``H^{-1} g_i`` for the training rows this rank scores (its shard, or all rows if the solve is
        collective)."""
        if self._train_ihvp is None:
            if self._solve_everywhere():
                self._train_ihvp = self.curvature_.solve(self.train_grads_)
            else:  # a local solve can fail on one rank only (e.g. memory): tell every rank
                self._train_ihvp = collective_part(
                    lambda: self.curvature_.solve(self.local_grads_), "H^{-1} g of the training gradients"
                )
        return self._train_ihvp

    def self_influence(self) -> torch.Tensor:
        """``(1/n) g_i^T H^{-1} g_i`` for every training example, shape ``(n_train,)``: the estimated rise of
        example ``i``'s own loss if it were removed and the model retrained."""
        self.check_is_fitted()
        if self.streams_:  # the solve is local here (fit refuses a collective one with several processes)

            def part() -> torch.Tensor:
                parts = [(self.curvature_.solve(rows) * rows).sum(dim=1) for _, rows in self._stream()]
                return torch.cat(parts) if parts else torch.zeros(0, dtype=self.fmodel_.dtype)

            local = collective_part(part, "self-influence of the streamed training gradients") / self.n_train_
            return all_gather_rows(local)
        if self._solve_everywhere():
            return (self._train_solved() * self.train_grads_).sum(dim=1) / self.n_train_
        local = (self._train_solved() * self.local_grads_).sum(dim=1) / self.n_train_
        return all_gather_rows(local)

    def _selected_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The training gradients of ``idx`` (any order, repeats allowed), the same on every rank: each rank fills
        the rows it holds and one all-reduce assembles them; when streaming, every rank computes them."""
        if self.streams_:
            unique, inverse = torch.unique(idx, return_inverse=True)
            rows = torch.cat(
                [r for _, r in self._training_rows(self.fmodel_, self.train_, unique, "gradients")]
            )
            return rows[inverse]
        if not world()[2]:
            return self.local_grads_[idx]
        start = int(self.local_indices_[0]) if len(self.local_indices_) else 0
        mine = (idx >= start) & (idx < start + len(self.local_indices_))
        rows = torch.zeros(len(idx), self.fmodel_.num_params, dtype=self.local_grads_.dtype)
        rows = rows.to(self.local_grads_.device)
        rows[mine] = self.local_grads_[idx[mine] - start]
        return all_reduce_sum(rows)

    def params_change(self, indices: Any) -> dict[str, torch.Tensor]:
        """Estimated ``theta_{-i} - theta_hat = (1/n) H^{-1} g_i`` for each index ``i``, each on its own (a
        repeated index is a repeated row; for the removal of a set use :meth:`removal_params`).

        Returns a dict parameter name -> tensor of shape ``(len(indices), *param.shape)``.
        """
        self.check_is_fitted()
        idx = check_indices("indices", indices, self.n_train_)
        delta = self.curvature_.solve(self._selected_rows(idx)) / self.n_train_
        return self.fmodel_.space.unflatten(delta)

    def removal_params(self, indices: Any) -> dict[str, torch.Tensor]:
        """Estimated change of the parameters when the *set* ``indices`` is removed together (first order: the
        sum of the individual changes). Returns a dict parameter name -> tensor of the parameter's shape.

        Each example may appear once: a repeated index (also ``i`` and ``i - n``) raises a ValueError naming it,
        since counting an example twice is not a removal (upweighting by ``eps = -2`` is outside the
        leave-one-out meaning; sum rows of :meth:`params_change` for a weighted multiset)."""
        self.check_is_fitted()
        idx = check_index_set("indices", check_indices("indices", indices, self.n_train_), indices)
        delta = self.curvature_.solve(self._selected_rows(idx).sum(dim=0, keepdim=True)) / self.n_train_
        return {k: v[0] for k, v in self.fmodel_.space.unflatten(delta).items()}
