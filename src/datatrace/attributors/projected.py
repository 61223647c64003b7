"""Influence functions in a projected gradient space (TRAK / LoGra style), with an on-disk feature store.

A projector ``P`` (``p x k``, :mod:`datatrace.projection`) restricts the model to the affine subspace
``theta = theta_hat + P w``. The training objective of :mod:`datatrace.tasks` restricted to that subspace has, at
``w = 0``, the gradient ``P^T g_i`` per example and the Gauss-Newton matrix

    G_P = P^T G P = (1/n) sum_i sum_c psi_ic psi_ic^T + R,      psi_ic = P^T J_i^T L_ic,   R = P^T diag(lambda) P

where ``J_i`` is the Jacobian of example ``i``'s outputs, ``H_out,i = L_i L_i^T`` the Hessian of its loss in the
outputs (factored exactly per example, ``k_out`` columns) and ``lambda`` the task's weight decay (``R`` is rescaled
by default, see below). So the projected influence

    score[q, i] = (1/n) (P^T grad f_q)^T (G_P + damping I)^{-1} (P^T g_i)  ~  f_q(theta_{-i}) - f_q(theta_hat)

is an influence function of the projected model, in the same natural units and with the same sign as
:class:`~datatrace.InfluenceFunction` (positive on a loss: removing ``i`` raises the query's loss, a proponent),
not only a gradient dot product. When ``P`` is invertible on the parameter space (``k >= p``), it equals
``InfluenceFunction(curvature="gauss-newton")`` exactly.

The training features ``phi_i = P^T g_i`` and the sums ``sum_i sum_c psi_ic psi_ic^T`` are computed in *one* pass
over the training data (``1 + k_out`` backward passes per batch with the exact GGN, ``1 + ggn_samples`` with an
unbiased Rademacher sketch of the output Hessian, 1 with ``fisher="empirical"``), written to a
:class:`~datatrace.projection.store.GradientStore` when ``store_dir`` is given (resumable; refused if it belongs to another
model, data set or projection) or kept in memory. Queries then cost one backward pass per query batch and a
matrix product per store chunk: a second query set, or a new ``ProjectedInfluence`` pointed at the same
``store_dir``, runs no training-set forward or backward pass at all.

**The regulariser** (``regularizer=``). ``"projected"`` uses ``P^T diag(lambda) P``: literally the Gauss-Newton
matrix of the projected model. For ``k < p`` that matrix is ``~ mean(lambda) (p/k) I``: the projected model sees
only a ``k/p`` share of the data curvature along the gradients (``E[P P^T] = I`` spreads it over all ``p``
directions) but the full weight decay, so as an estimate of the *unprojected* influence it acts like a weight decay
``p/k`` times too strong. The default ``"rescaled"`` multiplies it by ``min(1, k/p)`` (per layer and side for
the factorised projection), which makes it ``~ mean(lambda) I``, the weight decay the projected gradients see in
the full space (the projection preserves their inner products, Johnson-Lindenstrauss). When nothing is projected
away (``k >= p``) both are the same, exact matrix. ``benchmarks/bench_store.py`` compares the two against
unprojected Gauss-Newton scores and retraining.

**Damping** (``damping="auto"``): 0 when the task's weight decay is positive for every parameter in scope, because
then ``P^T diag(lambda) P`` already bounds every eigenvalue of ``G_P`` away from zero and the undamped solve is the
influence function of the projected model; otherwise ``AUTO_DAMPING_FRACTION`` (1e-3) times the mean eigenvalue of
``G_P``, a Levenberg-Marquardt style floor against the noise of tiny eigenvalues. Zero eigenvalues (``k > p``)
are dropped, a pseudo-inverse. Away from a minimum (the projected gradient of the objective above
:data:`~datatrace.curvature.base.AT_MINIMUM_RTOL` of the typical projected per-example gradient), with the
Gauss-Newton Fisher, ``"auto"`` is the dense routes' rule instead: keep ten effective directions per model output
(:func:`datatrace.linalg.dof_damping` on the eigenvalues of ``G_P``). A float is used as given. The value is
reported in ``info`` and in ``Scores.metadata``.

**Solver.** ``G_P + damping I`` is factored by Cholesky when the regulariser or the damping bounds it away from
zero and ``k <= p``; otherwise (``k > p``, or neither weight decay nor damping) by an eigendecomposition with a
pseudo-inverse of the zero eigenvalues, as the dense routes do. ``info["solver"]`` says which.

**Cost.** The exact GGN backpropagates ``1 + k_out`` output-space columns per batch in one vmapped backward pass.
With :class:`~datatrace.projection.FactorizedProjector` every column is projected layer by layer from the hooks'
activations and output gradients; with :class:`~datatrace.projection.RandomProjector` each column is a full
per-example vector of length ``p`` multiplied by the ``p x k`` matrix, so for large models or many outputs prefer
the factorised projection, ``ggn_samples=1`` or ``fisher="empirical"``.

**Under torch.distributed** (a process group initialised by the caller, e.g. with ``torchrun``; datatrace never
starts one and never wraps the model in ``DistributedDataParallel``), :meth:`ProjectedInfluence.fit` shards the
training pass over the ranks and every rank ends with the same fitted state as a single process (up to the order of
floating-point additions). In memory, each rank computes the features and the curvature sums of a contiguous range
of whole batches (:func:`~datatrace.distributed.shard_bounds` over the batches, so every batch, and with
``ggn_samples`` its random signs, is the same as in one process); the rows are gathered in index order and the sums
added over the ranks. With ``store_dir`` the store's chunks are dealt out over the ranks and rank 0 alone writes
the manifest (:mod:`datatrace.projection.store`); ``store_dir`` must be on a file system that every rank sees. Query features
are sharded by query (:func:`~datatrace.distributed.distributed_per_example`), and scoring, top-k and
self-influence against a store by chunk; scoring against in-memory features is replicated (every rank does all of
it). So ``fit``, ``score``, ``top_k``, ``proponents_opponents``, ``query_features`` and ``self_influence`` are
collective: call them on every rank, or wrap a call made on one rank only in
:func:`~datatrace.distributed.local_only`. If one rank fails, every rank raises instead of waiting.
``info["train_examples_processed"]`` counts the examples *this rank* processed.

References: Park et al. 2023 (TRAK); Choe et al. 2024 (LoGra, "What is your data worth to GPT?"); Koh & Liang
2017; Martens 2020 (Gauss-Newton).

Example:
    >>> import torch, datatrace
    >>> from datatrace.attributors.projected import ProjectedInfluence
    >>> from datatrace.projection import RandomProjector
    >>> X, y = torch.randn(80, 5), torch.arange(80) % 3
    >>> model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> task = datatrace.ClassificationTask(weight_decay=1e-2)
    >>> inf = ProjectedInfluence(model, task, projector=RandomProjector(dim=32), progress=False).fit((X, y))
    >>> inf.score((X[:4], y[:4])).values.shape
    torch.Size([4, 80])
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import sys
import tempfile
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from datatrace.attributors.base import (
    Attributor,
    Measurement,
    check_candidates,
    check_stationary,
    default_memory_budget,
    json_scalars,
)
from datatrace.capture.engine import find_layers
from datatrace.capture.scope import narrow_to_supported
from datatrace.curvature.base import TrainingState, distribution_size, output_size
from datatrace.curvature.kfac import MAX_GGN_OUTPUTS, default_fisher
from datatrace.data import DataLike, DataSource, as_data_source
from datatrace.distributed import (
    all_gather_rows,
    all_reduce_sum,
    collective_part,
    is_main_process,
    raise_if_any_failed,
    shard_bounds,
    world,
)
from datatrace.errors import (
    bad_value,
    check_bool,
    check_choice,
    check_finite,
    check_folder,
    check_nonnegative_float,
    check_positive_int,
    check_random_state,
)
from datatrace.gradients.functional import (
    FunctionalModel,
    check_model_and_task,
    checked_rows,
    per_example_rows,
    prepare_model,
)
from datatrace.linalg import dof_damping, spectral_inverse
from datatrace.projection.chunks import dtype_name
from datatrace.projection.factorized import FactorizedProjector, supports_factorized
from datatrace.projection.features import FeatureSource, as_feature_source, my_chunks
from datatrace.projection.fingerprint import data_fingerprint, model_fingerprint
from datatrace.projection.random import (
    DEFAULT_EPS,
    DEFAULT_MAX_CACHED_BYTES,
    DEFAULT_MAX_DIM,
    Projector,
    RandomProjector,
    derive_seed,
    jl_dim,
)
from datatrace.projection.scoring import StreamingTopK, score_against_store, top_k_against_store
from datatrace.projection.store import GradientStore
from datatrace.scores import Scores, TopK
from datatrace.tasks import Task

logger = logging.getLogger(__name__)

FISHER_TYPES = ("auto", "ggn", "sampled", "empirical")
REGULARIZERS = ("rescaled", "projected")
#: damping="auto" without weight decay on every parameter: this fraction of the mean eigenvalue
AUTO_DAMPING_FRACTION = 1e-3
#: rows of in-memory features per block of self-influence
SELF_INFLUENCE_BLOCK_ROWS = 65536
#: score_candidates: above this share of the training set among the candidates of all queries together, the queries
#: are scored against every row (as score does) and the candidates' columns kept. Measured (one CPU core, warm page
#: cache, docs/examples/shortlist_docstrings.py): gathering scattered rows costs 2-4 times streaming them, per row
#: (5% of a store's rows: 2-6 times faster than all rows; 25%: about as slow)
ALL_ROWS_FRACTION = 0.25
#: rows_product copies and multiplies at most this many bytes of rows at a time
ROWS_BLOCK_BYTES = 16 * 2**20


# -- the attributor ------------------------------------------------------------------------------------------------


class ProjectedInfluence(Attributor):
    """Influence functions in a random projection of the gradient space, with a reusable feature store.

    Args:
        model: the trained ``nn.Module`` (never modified: a private copy in ``dtype`` is used, in eval mode).
        task: a :class:`~datatrace.Task` (loss, measurement, weight decay); ``fisher="ggn"`` needs its
            ``outputs``/``loss_from_outputs`` split.
        projector: a :class:`~datatrace.projection.RandomProjector` or
            :class:`~datatrace.projection.FactorizedProjector` (copied, then fitted), or ``"auto"``: the factorised
            LoGra projection when every parameter in scope belongs to a supported layer (no full per-example
            gradient is ever formed), or when the scope is the default one and a dense random projection of all of
            them would exceed the random projector's matrix cache (it covers the supported layers then, naming the
            rest: a fine-tuned transformer's LayerNorms); else a Gaussian ``RandomProjector``; both with ``"auto"``
            dimensions.
        damping: ``"auto"`` (module docstring) or a float added to every eigenvalue of the projected curvature.
        params: parameter name patterns in scope (``None``: all trainable parameters).
        store_dir: directory of the :class:`~datatrace.projection.store.GradientStore` for the training features (written
            once, resumable, reused by later fits with the same model, data and projection); ``None`` keeps them
            in memory.
        dtype: working precision of the model copy and the gradients (float32 by default; float64 for oracles).
        feature_dtype: storage precision of the training features (float32, float16 or bfloat16; ``None``: the
            working ``dtype``); products always accumulate in float32 or better, the curvature in float64.
        fisher: ``"ggn"`` (the Gauss-Newton matrix of the projected model, exact in the output space),
            ``"sampled"`` (the true Fisher: the projected gradients of the loss at targets drawn from the model,
            ``max(1, ggn_samples)`` draws per example, one backward pass each; the task's ``sample_targets``),
            ``"empirical"`` (``(1/n) sum_i phi_i phi_i^T`` + regulariser, one backward pass per batch, as TRAK), or
            ``"auto"`` (default): ``"ggn"``, or ``"sampled"`` above
            :data:`~datatrace.curvature.kfac.MAX_GGN_OUTPUTS` outputs per example when the task samples targets
            (a language model's positions x vocabulary); ``fisher_`` says which after ``fit``.
        ggn_samples: ``None`` (all ``k_out`` columns of each output-Hessian factor) or an int ``m``: ``m``
            Rademacher combinations of them per example, an unbiased estimate with ``m`` backward passes.
        regularizer: how the weight decay enters the projected curvature (module docstring): ``"rescaled"``
            (default, ``min(1, k/p) P^T diag(lambda) P``) or ``"projected"`` (``P^T diag(lambda) P``, the
            projected model's own Gauss-Newton matrix). Both are exact when ``k >= p``.
        batch_size: examples per batch (default: the data's own, or 256).
        chunk_size: training examples per store chunk (default: about 64 MiB of features per chunk).
        random_state: seed of ``ggn_samples``.
        progress: tqdm progress bars (on rank 0 only under torch.distributed).
        max_bytes: memory budget of the in-memory training features (``n x k`` in ``feature_dtype``; ``None``: a
            share of the memory available now, :func:`~datatrace.attributors.base.default_memory_budget`). Without
            ``store_dir``, features above it go to an on-disk store in a temporary folder (deleted with this
            object; said in one line); under torch.distributed that is refused, since the ranks need a shared
            ``store_dir``.

    After :meth:`fit`: ``projector_``, ``n_train_``, ``dim_``, ``store_`` (or ``None``), ``train_features_``
    (in-memory mode), ``curvature_matrix_`` (the projected curvature ``G_P``, float64, without damping),
    ``damping_``, ``info`` (including the solver: Cholesky, or an eigendecomposition with a pseudo-inverse when
    ``G_P`` can be singular, i.e. ``k > p`` or no regulariser and no damping).

    Under ``torch.distributed`` the training pass is sharded over the ranks and every rank ends with the same
    fitted state (module docstring); the query-side methods are collective.
    """

    fitted_attribute = "curvature_matrix_"
    route = "projected influence"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        projector: Projector | str = "auto",
        damping: float | str = "auto",
        params: str | list[str] | None = None,
        store_dir: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        feature_dtype: torch.dtype | None = None,
        fisher: str = "auto",
        ggn_samples: int | None = None,
        regularizer: str = "rescaled",
        batch_size: int | None = None,
        chunk_size: int | None = None,
        random_state: int = 0,
        progress: bool = True,
        max_bytes: int | None = None,
    ) -> None:
        check_model_and_task(model, task)
        if max_bytes is not None:
            check_positive_int("max_bytes", max_bytes)
        if not (projector == "auto" or isinstance(projector, Projector)):
            raise bad_value(
                "projector",
                projector,
                "expected 'auto', a RandomProjector or a FactorizedProjector",
                "pass e.g. RandomProjector(dim=2048)",
            )
        if damping != "auto":
            damping = check_nonnegative_float("damping", damping)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise bad_value(
                "dtype", dtype, "expected a floating torch dtype", "pass torch.float32 or torch.float64"
            )
        if feature_dtype is not None:
            if not isinstance(feature_dtype, torch.dtype):
                raise bad_value(
                    "feature_dtype",
                    feature_dtype,
                    "expected a torch dtype or None",
                    "pass e.g. torch.float16",
                )
            dtype_name(feature_dtype)  # validates the storage dtypes
        if ggn_samples is not None:
            check_positive_int("ggn_samples", ggn_samples)
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        check_random_state(random_state)
        check_folder("store_dir", store_dir)
        check_bool("progress", progress)
        self.model = model
        self.task = task
        self.projector = projector
        self.damping = damping
        self.params = params
        self.store_dir = store_dir
        self.dtype = dtype
        self.feature_dtype = feature_dtype
        self._feature_dtype = feature_dtype if feature_dtype is not None else dtype
        self.fisher = check_choice("fisher", fisher, FISHER_TYPES)
        self.ggn_samples = ggn_samples
        self.regularizer = check_choice("regularizer", regularizer, REGULARIZERS)
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.random_state = random_state
        self.progress = progress
        self.max_bytes = max_bytes
        if self.fisher in ("ggn", "sampled", "auto") and not task.has_outputs:
            raise bad_value(
                "fisher",
                "ggn",
                f"{type(task).__name__} does not split its loss into outputs(model, batch) and "
                "loss_from_outputs(outputs, batch), which the Gauss-Newton matrix needs",
                "define both methods on the task, or pass fisher='empirical'",
            )

    # -- fitting ---------------------------------------------------------------------------------------------------
    def _make_projector(self, fmodel: FunctionalModel, n: int) -> Projector:
        if isinstance(self.projector, Projector):
            return copy.deepcopy(self.projector)
        if supports_factorized(fmodel):
            logger.info(
                "projector='auto': every parameter in scope is in a supported layer -> FactorizedProjector."
            )
            return FactorizedProjector()
        # a dense p x k Gaussian matrix above the random projector's cache is regenerated block by block for every
        # product (hours for millions of parameters): with the default scope, the factorised projection of the
        # supported layers (the others held fixed and named, as curvature='auto' does with EK-FAC) instead
        k = min(jl_dim(n, DEFAULT_EPS), DEFAULT_MAX_DIM, fmodel.num_params)
        matrix = fmodel.num_params * k * torch.empty((), dtype=fmodel.dtype).element_size()
        if fmodel.default_scope and matrix > DEFAULT_MAX_CACHED_BYTES and self._has_supported_layers(fmodel):
            logger.info(
                "projector='auto': some parameters are outside supported layers, and a random projection of all "
                "%d would be a %.1f GiB matrix (above max_cached_bytes %.1f GiB) -> FactorizedProjector on the "
                "supported layers.",
                fmodel.num_params,
                matrix / 2**30,
                DEFAULT_MAX_CACHED_BYTES / 2**30,
            )
            return FactorizedProjector()
        logger.info("projector='auto': some parameters are outside supported layers -> RandomProjector.")
        return RandomProjector()

    @staticmethod
    def _has_supported_layers(fmodel: FunctionalModel) -> bool:
        try:
            return bool(find_layers(fmodel, "FactorizedProjector", "use RandomProjector")[0])
        except ValueError:  # a supported type it cannot handle (a grouped convolution)
            return False

    def fit(self, train: DataLike) -> ProjectedInfluence:
        """Project the training gradients once (into the store, or memory) and fit the projected curvature."""
        source = as_data_source(train, "train", self.batch_size)
        source.check_finite()
        fmodel = FunctionalModel(prepare_model(self.model, self.dtype), self.task, self.params)
        check_finite(fmodel.theta, "the model's parameters", "Fix: pass a model whose weights are finite.")
        n = len(source)
        projector = self._make_projector(fmodel, n)
        self.fisher_ = self._resolve_fisher(fmodel, source)
        self.params_left_out_: dict[str, str] = {}
        if isinstance(projector, FactorizedProjector) and fmodel.default_scope:
            fmodel, self.params_left_out_ = narrow_to_supported(
                fmodel,
                source,
                "FactorizedProjector",
                "use RandomProjector (any parameters)",
                announce=self.progress and world()[0] == 0,
            )
        projector = projector.fit(fmodel, n)
        k = projector.dim_
        self.fmodel_ = fmodel
        self.projector_ = projector
        self.n_train_ = n
        self.dim_ = k
        self.train_examples_processed_ = 0
        compute = self._chunk_computer(source)
        store_dir = self.store_dir if self.store_dir is not None else self._spill_folder(n, k)

        if store_dir is not None:
            # the parameters projected: the covered ones when the default scope was narrowed, else as given
            scope = self.params if self.params is None or isinstance(self.params, str) else list(self.params)
            if self.params_left_out_:
                scope = list(fmodel.space.names)
            fingerprints = {
                "model": model_fingerprint(self.model),
                "data": data_fingerprint(source),
                "projection": projector.fingerprint(),
                "task": f"{type(self.task).__module__}.{type(self.task).__qualname__}: {self.task!r}",
                "config": {
                    "params": scope,
                    "dtype": str(self.dtype),
                    "fisher": self.fisher_,
                    "ggn_samples": self.ggn_samples,
                    "random_state": self.random_state if self.ggn_samples else None,
                    "batch_size": source.batch_size if self.ggn_samples else None,
                },
            }
            store = GradientStore.create(
                store_dir,
                n=n,
                dim=k,
                dtype=self._feature_dtype,
                chunk_size=self.chunk_size,
                chunk_multiple=source.batch_size,  # chunks start where a single process's batches start
                fingerprints=fingerprints,
                metadata={
                    "estimator": "ProjectedInfluence",
                    "meaning": "rows: P^T grad l(z_i) per training example",
                },
            )
            store.fill(compute, progress=self.progress)
            acc = {name: store.accumulator(name) for name in ("ggn", "grad", "norm")}
            self.store_ = store
            self.train_features_ = None
        else:
            features, acc = self._compute_in_memory(compute, source)
            self.store_ = None
            self.train_features_ = features
        if (
            self.fisher_ == "sampled"
        ):  # the curvature sees its draws: one per predictive distribution and sample
            self._fit_curvature(
                acc, lambda: max(1, self.ggn_samples or 1) * distribution_size(self.fmodel_, source)
            )
        else:
            self._fit_curvature(acc, lambda: output_size(self.fmodel_, source))
        logger.info("fitted ProjectedInfluence on %d examples, dim %d: %s", n, k, self.info)
        return self

    def _spill_folder(self, n: int, k: int) -> str | None:
        """A temporary store folder when the ``n x k`` features exceed ``max_bytes`` (removed with this object),
        else ``None`` (features in memory)."""
        need = n * k * torch.empty(0, dtype=self._feature_dtype).element_size()
        budget, origin = (
            (self.max_bytes, "given")
            if self.max_bytes is not None
            else default_memory_budget(self.fmodel_.device)
        )
        if need <= budget:
            return None
        if world()[2]:
            raise MemoryError(
                f"the {n:,} x {k:,} projected training features ({need:,} bytes) exceed max_bytes={budget:,} "
                f"({origin}), and under torch.distributed the ranks need one on-disk store that all of them see. "
                "Fix: pass store_dir= on a shared file system, a smaller projection dimension, or a larger max_bytes."
            )
        folder = tempfile.mkdtemp(prefix="datatrace-features-")
        weakref.finalize(self, shutil.rmtree, folder, True)
        message = (
            f"datatrace: the {n:,} x {k:,} projected training features ({need / 2**20:,.0f} MiB) exceed max_bytes="
            f"{budget / 2**20:,.0f} MiB ({origin}): writing them to a temporary on-disk store in {folder}, deleted "
            "with this ProjectedInfluence (pass store_dir= to keep and reuse it)"
        )
        logger.warning(message)
        if self.progress and is_main_process():
            tqdm.write(message, file=sys.stderr)
        return folder

    def _resolve_fisher(self, fmodel: FunctionalModel, source: DataSource) -> str:
        """``fisher``, with ``"auto"`` resolved: ``"sampled"`` when the exact output Hessian would be refused (more
        than ``MAX_GGN_OUTPUTS`` outputs per example) and the task samples targets, else ``"ggn"``."""
        if self.fisher != "auto":
            return self.fisher
        if default_fisher(self.task, MAX_GGN_OUTPUTS + 1) == "ggn" or len(source) == 0:
            return "ggn"  # a task that cannot sample targets: no forward pass needed to decide
        with torch.no_grad():  # one forward pass of one example: the output size decides
            first = fmodel.prepare(source.get([0]))
            outputs = int(self.task.output_counts(self.task.outputs(fmodel.model, first), first).sum())
        if default_fisher(self.task, outputs) == "sampled":
            logger.info(
                "ProjectedInfluence: fisher='auto' takes the sampled Fisher (more than %d outputs per example)",
                MAX_GGN_OUTPUTS,
            )
            return "sampled"
        return "ggn"

    def _compute_in_memory(
        self, compute: Any, source: DataSource
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """All training features and curvature sums; under torch.distributed each rank computes a contiguous range
        of whole batches, then the rows are gathered in index order and the sums added."""
        n = len(source)
        rank, size, distributed = world()
        if not distributed:
            return compute(0, n)
        bs = source.batch_size
        lo, hi = shard_bounds(-(-n // bs), size)[rank]
        start, stop = min(n, lo * bs), min(n, hi * bs)
        features: torch.Tensor | None = None
        acc: dict[str, torch.Tensor] = {}
        error: BaseException | None = None
        try:
            features, acc = compute(start, stop)
        except Exception as err:
            logger.error("rank %d failed while computing training features %d:%d: %s", rank, start, stop, err)
            error = err
        raise_if_any_failed(error, "the projected training features")
        if features is None:  # pragma: no cover - an invariant of the code above
            raise RuntimeError("internal error: features is missing")
        # 16-bit rows travel as float32 (exact both ways), whatever the backend supports
        wire = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
        gathered = all_gather_rows(wire)
        if gathered is None:  # pragma: no cover - an invariant of the code above
            raise RuntimeError("internal error: gathered is missing")
        k = acc["grad"].shape[0]
        packed = all_reduce_sum(torch.cat([acc["ggn"].reshape(-1), acc["grad"], acc["norm"]]))
        sums = {"ggn": packed[: k * k].reshape(k, k), "grad": packed[k * k : k * k + k], "norm": packed[-1:]}
        return gathered.to(features.dtype), sums

    def _chunk_computer(self, source: DataSource) -> Any:
        def compute(start: int, stop: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            k = self.projector_.dim_
            device = self.fmodel_.device
            ggn = torch.zeros(k, k, dtype=torch.float64, device=device)
            grad = torch.zeros(k, dtype=torch.float64, device=device)
            norm = torch.zeros(1, dtype=torch.float64, device=device)
            rows = []
            indices = torch.arange(start, stop)
            with tqdm(
                total=stop - start,
                desc="training features",
                disable=not self.progress or not is_main_process(),
                leave=False,
            ) as bar:
                for idx, batch in source.batches(indices=indices):
                    g, pseudo = self._train_batch(idx, batch)
                    flat = pseudo.reshape(-1, k)
                    ggn += (flat.T @ flat).to(torch.float64)
                    grad += g.sum(dim=0, dtype=torch.float64)
                    norm += g.to(torch.float64).norm(dim=1).sum()
                    rows.append(g.to(self._feature_dtype, copy=True))  # not a view of (b, c, k)
                    self.train_examples_processed_ += len(idx)
                    bar.update(len(idx))
            features = (
                torch.cat(rows) if rows else torch.empty(0, k, dtype=self._feature_dtype, device=device)
            )
            return features, {"ggn": ggn.cpu(), "grad": grad.cpu(), "norm": norm.cpu()}

        return compute

    def _train_batch(self, idx: torch.Tensor, raw: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected gradients ``(b, k)`` and curvature pseudo-gradients ``(b, c, k)`` of one training batch."""
        pseudo: list[torch.Tensor] = []

        def gradients(batch: tuple) -> torch.Tensor:
            g, p = self._project_train_batch(idx, self.fmodel_.prepare(batch, idx))
            pseudo.append(p)
            return g

        g = checked_rows(
            gradients,
            self.task,
            "training data",
            idx,
            raw,
            lambda i: f"projected gradient of training example {i}",
            "check that example's inputs and label, and the model's outputs on it.",
        )
        return g, pseudo[0]

    def _project_train_batch(self, idx: torch.Tensor, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        fmodel, projector, task = self.fmodel_, self.projector_, self.task
        if self.fisher_ == "empirical":
            g = projector.project_vjps(batch, "loss")[:, 0]
            return g, g[:, None]
        if (
            self.fisher_ == "sampled"
        ):  # the true Fisher: gradients of the loss at targets drawn from the model
            g = projector.project_vjps(batch, "loss")[:, 0]
            generator = torch.Generator(device=fmodel.device)
            generator.manual_seed(derive_seed(self.random_state, "sampled", int(idx[0])))
            with torch.no_grad():
                outputs = task.outputs(fmodel.model, batch)
            draws = max(1, self.ggn_samples or 1)
            pseudo = [
                projector.project_vjps(task.sample_targets(outputs, batch, generator), "loss")[:, 0]
                for _ in range(draws)
            ]
            return g, torch.stack(pseudo, dim=1) / math.sqrt(draws)
        # loss = loss_from_outputs(outputs): one pass gives the gradient and the pseudo-gradients
        composed = type(task).loss is Task.loss
        generator = None
        if self.ggn_samples:
            generator = torch.Generator(device=fmodel.device)
            generator.manual_seed(derive_seed(self.random_state, "ggn", int(idx[0])))

        def cotangents(outputs: torch.Tensor) -> torch.Tensor:
            L = task.output_hessian_factors(outputs, batch)  # (b, K, K), columns = pseudo-gradients
            if self.ggn_samples:
                m = self.ggn_samples
                signs = torch.randint(0, 2, (L.shape[0], L.shape[2], m), generator=generator, device=L.device)
                L = L @ ((signs.to(L.dtype) * 2 - 1) / math.sqrt(m))
            cols = L.transpose(1, 2)
            cols = cols[:, cols.abs().amax(dim=(0, 2)) > 0]
            if composed:
                cols = torch.cat([task.output_gradient(outputs, batch)[:, None].to(cols.dtype), cols], 1)
            return cols

        out = projector.project_vjps(batch, "outputs", cotangents)
        if composed:
            return out[:, 0], out[:, 1:]
        return projector.project_vjps(batch, "loss")[:, 0], out

    def _fit_curvature(self, acc: dict[str, torch.Tensor], outputs: Callable[[], int]) -> None:
        """The projected curvature and its damping; ``outputs()`` (one forward pass of one example) gives the model
        outputs per example, asked only when the damping rule needs it."""
        n, fmodel, projector = self.n_train_, self.fmodel_, self.projector_
        device = fmodel.device
        reg = projector.regularizer_matrix(rescaled=self.regularizer == "rescaled").to(device)
        matrix = acc["ggn"].to(device=device, dtype=torch.float64, copy=True)
        matrix /= n
        matrix += reg
        matrix += matrix.T.clone()
        matrix *= 0.5
        check_finite(
            matrix,
            "the projected Gauss-Newton matrix",
            "Fix: check the model's outputs and loss for NaN/inf on the training data, or fit in float64.",
        )
        lam = fmodel.regularizer
        k = self.dim_
        # stationarity in the projected space: P^T grad L = mean phi_i + P^T (lambda * theta)
        reg_grad = projector.project((lam * fmodel.theta)[None])[0].to(torch.float64).to(device)
        full = acc["grad"].to(device) / n + reg_grad
        self.gradient_norm_ = float(full.norm())
        typical = float(acc["norm"]) / n or 1.0
        check_stationary(
            self.gradient_norm_,
            typical,
            "the projected ||P^T grad L||",
            "projected per-example gradient norm",
        )
        at_minimum = TrainingState(self.gradient_norm_ / typical).at_minimum
        use_rule = self.damping == "auto" and not at_minimum and self.fisher_ in ("ggn", "sampled")
        target = TrainingState(self.gradient_norm_ / typical, outputs()).dof_target(k) if use_rule else None
        rule = "given"
        if target is not None:
            # away from a minimum: the dense routes' rule on the projected curvature's eigenvalues
            damping, rule = dof_damping(torch.linalg.eigvalsh(matrix), target), f"dof={target:g}"
        elif self.damping == "auto":
            rule = "at-minimum"
            all_penalised = bool((lam > 0).all())
            mean_eigenvalue = float(torch.diagonal(matrix).sum()) / k  # trace / k, no decomposition needed
            damping = 0.0 if all_penalised else AUTO_DAMPING_FRACTION * mean_eigenvalue
        else:
            damping = float(self.damping)
        self.curvature_matrix_ = matrix
        self.damping_ = damping
        self._chol: torch.Tensor | None = None
        self.evals_ = self.evecs_ = self.inv_evals_ = None
        # Cholesky (fast, also on GPUs) when the regulariser or the damping bounds the spectrum away from zero and
        # nothing can be exactly singular (k <= p); otherwise an eigendecomposition with a pseudo-inverse.
        bounded = damping > 0 or bool((lam > 0).all())
        solver = "eigh"
        if bounded and k <= fmodel.num_params:
            eye = torch.eye(k, dtype=matrix.dtype, device=device)
            chol, failed = torch.linalg.cholesky_ex(matrix + damping * eye)
            if int(failed) == 0:
                self._chol, solver = chol, "cholesky"
            else:
                logger.info(
                    "the projected curvature is not numerically positive definite; using eigh instead."
                )
        extra: dict[str, Any] = {"solver": solver, "trace": float(torch.diagonal(matrix).sum())}
        if solver == "eigh":
            evals, evecs = torch.linalg.eigh(matrix)
            inv, _, facts = spectral_inverse(evals, damping, "clip", None, "projected")
            self.evals_, self.evecs_, self.inv_evals_ = evals, evecs, inv
            extra |= {key: facts[key] for key in ("eigenvalue_max", "eigenvalue_min", "num_zero_dropped")}
        else:
            extra |= {"num_zero_dropped": 0}

        self.info_ = {
            "estimator": "ProjectedInfluence",
            "projector": projector.fingerprint(),
            "dim": self.dim_,
            "num_params": fmodel.num_params,
            "n_train": n,
            "fisher": self.fisher_,
            "ggn_samples": self.ggn_samples,
            "damping": damping,
            "damping_policy": self.damping if self.damping != "auto" else "auto",
            "damping_rule": rule,
            "regularizer": self.regularizer,
            "regularizer_trace": float(torch.diagonal(reg).sum()),
            **extra,
            "dtype": str(self.dtype),
            "feature_dtype": str(self._feature_dtype),
            "store": str(self.store_.path) if self.store_ is not None else None,
            "projected_gradient_norm": self.gradient_norm_,
            "train_examples_processed": self.train_examples_processed_,
        }

    # -- queries ---------------------------------------------------------------------------------------------------
    @property
    def fitted_model(self) -> nn.Module:
        """The private working copy of the model at ``theta_hat`` (working dtype, eval mode)."""
        self.check_is_fitted()
        return self.fmodel_.model

    @property
    def info(self) -> dict[str, Any]:
        """What was done: projection, dimension, damping, eigenvalue range, store, examples processed."""
        self.check_is_fitted()
        return dict(self.info_, train_examples_processed=self.train_examples_processed_)

    @property
    def features_(self) -> GradientStore | torch.Tensor:
        """The training features: the :class:`~datatrace.projection.store.GradientStore`, or the in-memory ``(n, k)`` tensor."""
        self.check_is_fitted()
        return self.store_ if self.store_ is not None else self.train_features_

    def query_features(self, query: DataLike) -> torch.Tensor:
        """``P^T grad f_q(theta_hat)`` for every query, shape ``(n_query, k)`` (working dtype, model's device).

        Under torch.distributed each rank computes the rows of its share of the queries and every rank gets all of
        them (:func:`~datatrace.distributed.distributed_per_example`)."""
        self.check_is_fitted()
        source = as_data_source(query, "query", self.batch_size)
        source.check_finite()

        def rows(raw: tuple) -> torch.Tensor:
            return self.projector_.project_vjps(self.fmodel_.prepare(raw), "measurement")[:, 0]

        return per_example_rows(
            rows,
            source,
            self.task,
            "queries",
            lambda i: f"projected measurement gradient of query {i}",
            "check that query.",
            progress=self.progress,
            desc="query features",
        )

    def _compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def solve(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(G_P + damping I)^{+} v`` for each row of ``vectors`` (shape ``(m, k)``), in float64."""
        self.check_is_fitted()
        v = vectors.to(device=self.curvature_matrix_.device, dtype=torch.float64)
        if self._chol is not None:
            return torch.cholesky_solve(v.T, self._chol).T
        return ((v @ self.evecs_) * self.inv_evals_) @ self.evecs_.T

    def _transform(self, query_features: torch.Tensor) -> torch.Tensor:
        return (self.solve(query_features) / self.n_train_).to(self._compute_dtype())

    def score(self, query: DataLike, measurement: Measurement | None = None) -> Scores:
        """Leave-one-out influence of every training example on every query's measurement, ``(n_query, n_train)``:
        ``values[q, i] = (1/n) (P^T grad f_q)^T (G_P + damping I)^{-1} (P^T g_i) ~ f_q(theta_{-i}) - f_q(theta_hat)``.
        The measurement is the task's own (``measurement=`` is refused: the projector's backward passes are built
        on the task).
        """
        self.check_measurement(measurement)
        return self.score_features(self.query_features(query))

    def score_features(self, query_features: torch.Tensor) -> Scores:
        """:meth:`score` for query features already computed by :meth:`query_features` (shape ``(n_query, k)``)."""
        self.check_is_fitted()
        values = score_against_store(query_features, self.features_, self._transform, progress=self.progress)
        return Scores(values.cpu(), self.task.describe_measurement(), self.metadata())

    def score_candidates(
        self, query: DataLike, candidates: Any, measurement: Measurement | None = None
    ) -> torch.Tensor:
        """The scores of a shortlist of training examples per query, ``(n_query, m)``:
        ``values[q, j] = score[q, candidates[q, j]]``, the same number :meth:`score` gives at that column (same
        curvature, fitted on the whole training set), computed from the candidates' feature rows only.

        ``candidates``: ``(n_query, m)`` training indices, a row per query without repeats
        (:func:`datatrace.attributors.base.check_candidates`). Only the union ``U`` of the rows is read (from a
        store: those rows of the chunks that hold them, memory-mapped) and the product costs ``n_query |U| k``
        instead of ``n_query n k``; it saves most when ``|U|`` is far below ``n`` (few queries, or queries whose
        candidates overlap). With ``|U|`` above :data:`ALL_ROWS_FRACTION` of ``n`` every row is scored (as
        :meth:`score`) and the candidates' columns kept. Under torch.distributed, call it on every rank (the query
        features and, in that case, the scoring against a store are collective). Used by
        :func:`datatrace.apps.shortlist.score_shortlist`.
        """
        self.check_measurement(measurement)
        self.check_is_fitted()
        n_query = len(as_data_source(query, "query", self.batch_size))
        cand = check_candidates("candidates", candidates, n_query, self.n_train)
        return self.score_candidates_features(self.query_features(query), cand)

    def score_candidates_features(self, query_features: torch.Tensor, candidates: Any) -> torch.Tensor:
        """:meth:`score_candidates` for query features already computed by :meth:`query_features`."""
        self.check_is_fitted()
        if not isinstance(query_features, torch.Tensor) or query_features.dim() != 2:
            raise bad_value(
                "query_features",
                query_features,
                "expected a 2-D tensor (n_query, dim) from query_features(query)",
                "pass one row per query",
            )
        cand = check_candidates("candidates", candidates, int(query_features.shape[0]), self.n_train)
        union, inverse = torch.unique(cand, return_inverse=True)
        if len(union) > ALL_ROWS_FRACTION * self.n_train:
            # most rows are candidates of some query: one pass over all of them beats gathering most of them
            values = score_against_store(query_features, self.features_, self._transform)
            return torch.gather(values, 1, cand.to(values.device)).cpu()
        q = self._transform(query_features)
        values = rows_product(q, self.features_, union)  # (n_query, |U|)
        return torch.gather(values, 1, inverse.to(values.device)).cpu()

    def top_k(self, query: DataLike, k: int, measurement: Measurement | None = None) -> TopK:
        """Per query, the ``k`` training examples with the largest ``|score|`` (as :meth:`datatrace.Scores.top_k`),
        streamed over the store without forming the ``(n_query, n_train)`` matrix."""
        check_positive_int("k", k)
        self.check_measurement(measurement)
        return self.top_k_features(self.query_features(query), k)

    def top_k_features(self, query_features: torch.Tensor, k: int) -> TopK:
        """:meth:`top_k` for query features already computed by :meth:`query_features`."""
        k = min(check_positive_int("k", k), self.n_train)
        return largest_magnitude(self.proponents_opponents_features(query_features, k), k)

    def proponents_opponents(self, query: DataLike, k: int) -> StreamingTopK:
        """Per query, the ``k`` largest scores (proponents) and the ``k`` most negative (opponents), streamed over
        the store without forming the ``(n_query, n_train)`` matrix."""
        check_positive_int("k", k)
        return self.proponents_opponents_features(self.query_features(query), k)

    def proponents_opponents_features(self, query_features: torch.Tensor, k: int) -> StreamingTopK:
        """:meth:`proponents_opponents` for query features already computed by :meth:`query_features`."""
        self.check_is_fitted()
        return top_k_against_store(query_features, self.features_, k, self._transform, progress=self.progress)

    def self_influence(self) -> torch.Tensor:
        """``(1/n) phi_i^T (G_P + damping I)^{-1} phi_i`` for every training example, shape ``(n_train,)``: the
        estimated rise of example ``i``'s own loss if it were removed and the model retrained (streamed)."""
        self.check_is_fitted()
        source = as_feature_source(self.features_, SELF_INFLUENCE_BLOCK_ROWS)
        mine = my_chunks(source)
        if mine is None:
            return self._self_influence(source, None)
        # under torch.distributed: each rank a contiguous range of chunks, gathered in order
        local = collective_part(
            lambda: self._self_influence(source, mine), "self-influence against the GradientStore"
        )
        out = all_gather_rows(local)
        if out is None:  # pragma: no cover - an invariant of the code above
            raise RuntimeError("internal error: out is missing")
        return out

    def _self_influence(self, source: FeatureSource, chunks: range | None) -> torch.Tensor:
        dtype = self._compute_dtype()
        out = [torch.zeros(0, dtype=dtype)]
        blocks = ((b.start, b.values) for b in source.blocks(chunks))
        device = self.curvature_matrix_.device
        if self._chol is not None:  # phi^T C^{-1} phi = ||L^{-1} phi||^2
            chol = self._chol.to(dtype)
            for _, values in blocks:
                z = torch.linalg.solve_triangular(chol, values.to(device=device, dtype=dtype).T, upper=False)
                out.append((z * z).sum(dim=0) / self.n_train_)
        else:
            evecs, inv = self.evecs_.to(dtype), self.inv_evals_.to(dtype)
            for _, values in blocks:
                rotated = values.to(device=device, dtype=dtype) @ evecs
                out.append((rotated * rotated * inv).sum(dim=1) / self.n_train_)
        return torch.cat([o.cpu() for o in out])

    def metadata(self) -> dict[str, Any]:
        """``Scores.metadata`` of this attributor (:meth:`Attributor.scores_metadata`): :attr:`info`'s entries."""
        info = self.info
        flat = json_scalars(info)
        flat["projector"] = info["projector"]
        fisher = getattr(self, "fisher_", self.fisher)
        route = {
            "ggn": "projected Gauss-Newton",
            "sampled": "projected sampled Fisher",
        }.get(fisher, "projected empirical Fisher")
        if fisher == "ggn":
            units = "leave-one-out"
            reason = "the influence function of the projected model with its exact Gauss-Newton matrix"
        elif fisher == "sampled":
            units = "leave-one-out"
            reason = (
                "the projected model's Fisher estimated from targets drawn from the model: the Gauss-Newton matrix "
                "in expectation (a sampling error remains)"
            )
        else:
            units = "rank-only"
            reason = (
                "the empirical Fisher (gradients of the labels) is the Gauss-Newton matrix only at a perfect fit, "
                "so its scale is not that of leave-one-out"
            )
        left_out = sorted(getattr(self, "params_left_out_", {}))
        return self.scores_metadata(
            route=route, **flat, params_left_out=left_out, units=units, units_reason=reason
        )


def rows_product(
    queries: torch.Tensor,
    features: FeatureSource | torch.Tensor,
    indices: torch.Tensor,
    block_bytes: int = ROWS_BLOCK_BYTES,
) -> torch.Tensor:
    """``queries @ F[indices]^T``, shape ``(n_query, len(indices))``, for rows ``indices`` (in range, any order)
    of the features ``F`` (an ``(n, dim)`` tensor or a :class:`~datatrace.projection.features.FeatureSource`).

    Only the chunks of a store that hold the rows are opened, each once (memory-mapped: the other rows are not read
    from disk). The rows are copied and multiplied a block of at most ``block_bytes`` at a time, cast to the
    queries' dtype and device: one large copy of scattered rows costs more than the product itself (a fresh
    allocation of tens of MiB is page-faulted in), while blocks of a few MiB reuse memory and keep the product a
    matrix product."""
    out = torch.empty(queries.shape[0], len(indices), dtype=queries.dtype, device=queries.device)
    if isinstance(features, torch.Tensor):
        dim, chunk_of, blocks = int(features.shape[1]), torch.zeros_like(indices), [(0, 0, features)]
    else:
        source = as_feature_source(features)
        dim = source.dim
        chunk_of = torch.div(indices, source.chunk_rows, rounding_mode="floor")
        blocks = ((b.chunk, b.start, b.values) for b in source.blocks(torch.unique(chunk_of).tolist()))
    step = max(1, block_bytes // max(1, dim * max(queries.element_size(), 4)))
    for chunk, start, values in blocks:
        positions = torch.nonzero(chunk_of == chunk).reshape(-1)  # this chunk's rows: a run of the output
        for s in range(0, len(positions), step):
            where = positions[s : s + step]
            rows = values[(indices[where] - start).to(values.device)]
            out[:, where.to(out.device)] = queries @ rows.to(device=queries.device, dtype=queries.dtype).T
    return out


def largest_magnitude(extremes: StreamingTopK, k: int) -> TopK:
    """Per row, the ``k`` entries of largest ``|score|`` among the proponents and opponents of ``extremes``
    (each index once), largest first: the ``k`` largest ``|score|`` overall when each list holds ``k``."""
    indices = torch.cat([extremes.proponents.indices, extremes.opponents.indices], dim=1)
    values = torch.cat([extremes.proponents.values, extremes.opponents.values], dim=1)
    # an index in both lists (ties, or fewer than 2k training examples) counts once
    ordered, perm = torch.sort(indices, dim=1, stable=True)
    repeated = torch.zeros_like(indices, dtype=torch.bool)
    repeated.scatter_(1, perm[:, 1:], ordered[:, 1:] == ordered[:, :-1])
    key = torch.where(repeated, torch.full_like(values, -1.0), values.abs())
    _, pick = torch.topk(key, min(k, indices.shape[1]), dim=1)
    return TopK(torch.gather(indices, 1, pick), torch.gather(values, 1, pick))


__all__ = [
    "ALL_ROWS_FRACTION",
    "FISHER_TYPES",
    "ROWS_BLOCK_BYTES",
    "ProjectedInfluence",
    "largest_magnitude",
    "rows_product",
]
