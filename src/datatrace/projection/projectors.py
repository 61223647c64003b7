"""Seeded random projections of per-example gradients: flat (Johnson-Lindenstrauss) and factorised per layer (LoGra).

A projector maps a parameter-space vector ``g`` (length ``p``, the flat layout of
:class:`~datatrace.params.ParamSpace`) to ``P^T g`` (length ``k << p``). Projected-gradient attributors store
``phi_i = P^T grad l_i`` once per training example and answer queries with products in the ``k``-dimensional space
(:mod:`datatrace.projection.store`, :mod:`datatrace.attributors.projected`).

:class:`RandomProjector` (``kind=``)
    A dense ``p x k`` matrix with i.i.d. entries, scaled so that ``E ||P^T g||^2 = ||g||^2`` for every ``g``:

    * ``"gaussian"``: ``N(0, 1/k)`` (Johnson & Lindenstrauss 1984; Dasgupta & Gupta 2003);
    * ``"rademacher"``: ``+-1/sqrt(k)`` with probability 1/2 each (Achlioptas 2003);
    * ``"sparse"``: ``+-sqrt(1/(s k))`` with probability ``s/2`` each and 0 otherwise, ``s = density`` (Achlioptas
      2003 uses ``s = 1/3``; the "very sparse" projections of Li, Hastie & Church 2006 use ``s = 1/sqrt(p)``, the
      default ``density="auto"``). Kept as a sparse matrix: memory and work ``O(sqrt(p) k)`` instead of ``O(p k)``.

    ``P`` is generated from the seed in blocks of :data:`ROWS_PER_SEED` rows, block ``j`` from its own derived seed
    (sha256 of ``(random_state, j)``) with torch's CPU generator in float32, so the same ``(random_state, kind,
    dim, density)`` gives the same matrix on every machine and device, and a ``p x k`` matrix never has to be held
    at once: when it is larger than ``max_cached_bytes`` it is regenerated block by block for every product
    (correct but slow; prefer ``kind="sparse"`` or :class:`FactorizedProjector` for large models).

    ``dim="auto"`` uses the Johnson-Lindenstrauss bound for ``n`` points (the training set) and distortion ``eps``
    (Dasgupta & Gupta 2003, the bound scikit-learn's ``johnson_lindenstrauss_min_dim`` uses)::

        k >= 4 ln(n) / (eps^2 / 2 - eps^3 / 3)

    capped at ``max_dim`` (default 4096) and at ``p``; when the bound reaches ``p`` no projection is made (the
    identity, exact). The choice is logged.

:class:`FactorizedProjector` (LoGra; Choe et al. 2024, "What is your data worth to GPT?")
    For a linear layer ``y = W a + b`` the per-example gradient is ``G_i = sum_t s_it a_it^T`` (``s = dl/dy``,
    ``t`` over tokens / positions / pixels; the bias is an extra input column fixed at 1). With one projection per
    side, ``P_in`` (``d_in x k_in``) and ``P_out`` (``d_out x k_out``),

        P_out^T G_i P_in = sum_t (P_out^T s_it) (P_in^T a_it)^T          (k_out x k_in)

    which equals the Kronecker projection ``(P_out (x) P_in)^T vec(G_i)`` (row-major ``vec``) of the full
    per-example gradient, but is computed from the layer's input activations and output gradients, caught by
    forward hooks and autograd, without ever forming ``G_i``. Supported: ``nn.Linear``, ``nn.Conv2d``
    (``groups=1``, on ``unfold`` patches) and the transposed dense ``Conv1D`` of Hugging Face transformers. A side
    whose width is at most the requested dimension is not projected (the identity, exact). ``dim_in`` /
    ``dim_out="auto"`` choose one width for both sides so that the total dimension meets the same
    Johnson-Lindenstrauss bound.

Both compute *projected vector-Jacobian products* (:meth:`Projector.project_vjps`): rows ``P^T J_i^T c`` for
output-space cotangents ``c`` of each example (``c = dl/do`` gives the projected gradient; the columns of a factor
of the output Hessian give the projected Gauss-Newton pseudo-gradients), and project any flat parameter-space
vector (:meth:`Projector.project`) and the regulariser ``P^T diag(lambda) P`` (:meth:`Projector.regularizer_matrix`).

Example:
    >>> import torch, datatrace
    >>> from datatrace.projection.projectors import RandomProjector
    >>> from datatrace.gradients.functional import FunctionalModel
    >>> fmodel = FunctionalModel(torch.nn.Linear(20, 3), datatrace.ClassificationTask())
    >>> proj = RandomProjector(dim=8, random_state=0).fit(fmodel, n_points=100)
    >>> proj.project(torch.randn(5, 63)).shape
    torch.Size([5, 8])
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import hessian, vjp, vmap

from datatrace.capture.kinds import (
    SUPPORTED_LAYERS,
    input_rows,
    output_rows,
    scan_layers,
    weight_decay_per_tensor,
)
from datatrace.errors import bad_value, check_choice, check_positive_int
from datatrace.gradients.functional import FunctionalModel, _Bound
from datatrace.tasks import ClassificationTask, RegressionTask, Task

logger = logging.getLogger(__name__)

PROJECTION_KINDS = ("gaussian", "rademacher", "sparse")
ROOTS = ("outputs", "loss", "measurement")
#: default distortion of dim="auto"
DEFAULT_EPS = 0.1
#: default cap of dim="auto"
DEFAULT_MAX_DIM = 4096
#: rows of a flat projection matrix generated from one derived seed
ROWS_PER_SEED = 1024
#: a flat projection matrix up to this size is generated once and kept (on the model's device)
DEFAULT_MAX_CACHED_BYTES = 2**30
#: RandomProjector: per-example vjp rows x p elements computed at once
_VJP_ELEMENTS = 2**25

Cotangents = Callable[[torch.Tensor], torch.Tensor]


# -- helpers -------------------------------------------------------------------------------------------------------


def jl_dim(n_points: int, eps: float = DEFAULT_EPS) -> int:
    """The Johnson-Lindenstrauss dimension ``ceil(4 ln(n) / (eps^2/2 - eps^3/3))`` (Dasgupta & Gupta 2003) that
    preserves all pairwise distances of ``n`` points within a factor ``1 +- eps`` with high probability."""
    n_points = check_positive_int("n_points", n_points)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0.0 < eps < 1.0:
        raise bad_value("eps", eps, "expected a distortion strictly between 0 and 1", "pass e.g. eps=0.1")
    return max(1, math.ceil(4.0 * math.log(max(n_points, 2)) / (eps**2 / 2.0 - eps**3 / 3.0)))


def derive_seed(random_state: int, *keys: Any) -> int:
    """A 63-bit seed derived from ``random_state`` and ``keys`` (stable across runs, platforms and versions)."""
    text = json.dumps([int(random_state), *[str(k) for k in keys]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def random_matrix(rows: int, cols: int, kind: str, seed: int, density: float = 1.0) -> torch.Tensor:
    """A ``rows x cols`` float32 CPU matrix of i.i.d. entries with ``E[x^2] = 1/cols`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    if kind == "rademacher":
        return (torch.randint(0, 2, (rows, cols), generator=g, dtype=torch.float32) * 2.0 - 1.0) / math.sqrt(
            cols
        )
    if kind == "sparse":
        u = torch.rand(rows, cols, generator=g)
        scale = math.sqrt(1.0 / (density * cols))
        return ((u < density / 2).float() - (u >= 1.0 - density / 2).float()) * scale
    raise bad_value("kind", kind, f"expected one of {list(PROJECTION_KINDS)}", "pass kind='gaussian'")


def _check_density(density: Any) -> float | str:
    if density == "auto":
        return "auto"
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise bad_value("density", density, "expected 'auto' or a number in (0, 1]", "pass e.g. density=1/3")
    return float(density)


def _check_dim(name: str, dim: Any) -> int | str:
    if dim == "auto":
        return "auto"
    return check_positive_int(name, dim)


def _check_seed(random_state: Any) -> int:
    if isinstance(random_state, bool) or not isinstance(random_state, int) or random_state < 0:
        raise bad_value(
            "random_state", random_state, "expected a non-negative int", "pass e.g. random_state=0"
        )
    return random_state


def output_hessian_factors(task: Task, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
    """``L_i`` with ``L_i L_i^T = d^2 l_i / d o^2`` for every example (negative curvature clipped to zero).

    Shape ``(b, K, K)`` with ``K`` the number of outputs per example; column ``c`` of ``L_i`` is the output-space
    cotangent of the ``c``-th Gauss-Newton pseudo-gradient ``J_i^T L_i[:, c]``, so that
    ``sum_c (J_i^T L_ic)(J_i^T L_ic)^T = J_i^T H_i J_i``. Closed forms for the built-in tasks (softmax
    cross-entropy: ``L = diag(sqrt p) - p sqrt(p)^T``; logistic: ``sqrt(s(1-s))``; squared error: ``sqrt(2) I``);
    otherwise ``torch.func.hessian`` of ``task.loss_from_outputs`` and an eigendecomposition.
    """
    shape = outputs.shape[1:]
    flat = outputs.detach().reshape(outputs.shape[0], -1)
    b, K = flat.shape
    loss_impl = type(task).loss_from_outputs
    if isinstance(task, ClassificationTask) and loss_impl is ClassificationTask.loss_from_outputs:
        if K == 1:  # one logit, logistic loss: H = s (1 - s)
            s = torch.sigmoid(flat)
            return (s * (1 - s)).sqrt().reshape(b, 1, 1)
        # softmax cross-entropy: H = diag(p) - p p^T = L L^T with L = diag(sqrt p) - p sqrt(p)^T
        p = torch.softmax(flat, dim=1)
        sq = p.sqrt()
        return torch.diag_embed(sq) - p[:, :, None] * sq[:, None, :]
    if isinstance(task, RegressionTask) and loss_impl is RegressionTask.loss_from_outputs:
        eye = torch.eye(K, dtype=flat.dtype, device=flat.device)
        return (math.sqrt(2.0) * eye).expand(b, K, K)  # (o - y)^2 summed: H = 2 I

    def single(o: torch.Tensor, *example: torch.Tensor) -> torch.Tensor:
        return task.loss_from_outputs(o.reshape(1, *shape), tuple(t.unsqueeze(0) for t in example))[0]

    hess = vmap(hessian(single), in_dims=(0, *(0 for _ in batch)))(flat, *batch)
    hess = 0.5 * (hess + hess.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(hess)
    top = evals.abs().amax(dim=1, keepdim=True)
    tol = max(evals.shape[1], 10) * torch.finfo(evals.dtype).eps * 10 * top
    evals = torch.where(evals > tol, evals, torch.zeros_like(evals))
    return evecs * evals.sqrt().unsqueeze(1)


def output_gradient(task: Task, outputs: torch.Tensor, batch: tuple) -> torch.Tensor:
    """``dl_i / do_i`` for every example, shape ``(b, K)``."""
    o = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(task.loss_from_outputs(o, batch).sum(), o)
    return g.reshape(o.shape[0], -1)


def _root_module(fmodel: FunctionalModel, root: str) -> nn.Module:
    check_choice("root", root, ROOTS)
    if root == "loss":
        return fmodel._loss
    if root == "measurement":
        return fmodel._measure
    return _Bound(fmodel.model, fmodel.task.outputs)


def _cotangents_for(root: str, outputs: torch.Tensor, cotangents: Cotangents | None) -> torch.Tensor:
    b = outputs.shape[0]
    if root == "outputs":
        if cotangents is None:
            raise bad_value(
                "cotangents", None, "root='outputs' needs output-space cotangents", "pass a callable"
            )
        cot = cotangents(outputs.detach())
        width = outputs[0].numel()
        if cot.dim() != 3 or cot.shape[0] != b or cot.shape[2] != width:
            raise bad_value(
                "cotangents", cot, f"expected shape (batch={b}, columns, outputs={width})", "return (b, c, K)"
            )
        return cot.to(outputs.dtype)
    if outputs.shape != (b,) and outputs.numel() != b:
        raise ValueError(
            f"the task's {root} returned shape {tuple(outputs.shape)} for a batch of {b}; it must return one value "
            "per example, shape (batch_size,). Fix: use reduction='none' and do not average over the batch."
        )
    return torch.ones(b, 1, 1, dtype=outputs.dtype, device=outputs.device)


def _batched_vjps(
    root: torch.Tensor, targets: list[torch.Tensor], cot: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """``d <root, cot[:, c]> / d target`` for every column ``c`` of ``cot`` (``(b, c, K)``), stacked on a leading
    axis of length ``c``: one vmapped backward pass (``is_grads_batched``), or a loop where an operation of the
    model has no batching rule."""
    columns = cot.transpose(0, 1).contiguous()
    try:
        return torch.autograd.grad(
            root, targets, grad_outputs=columns, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError:
        per_column = [
            torch.autograd.grad(root, targets, grad_outputs=col, retain_graph=True, allow_unused=True)
            for col in columns
        ]
        return tuple(
            None if per_column[0][j] is None else torch.stack([g[j] for g in per_column])
            for j in range(len(targets))
        )


# -- the interface -------------------------------------------------------------------------------------------------


class Projector(ABC):
    """Base class. Constructors only store settings; :meth:`fit` binds the projector to a model's parameter space
    and a number of points (for ``"auto"`` dimensions); learned state ends in ``_`` (``dim_``...)."""

    @abstractmethod
    def fit(self, fmodel: FunctionalModel, n_points: int) -> Projector:
        """Choose dimensions and draw the projection for the parameters in scope of ``fmodel``; return ``self``."""

    @abstractmethod
    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """``P^T v`` for each row ``v`` of ``vectors`` (shape ``(m, p)`` in the flat parameter layout) -> ``(m, k)``."""

    @abstractmethod
    def project_vjps(
        self, batch: tuple, root: str = "loss", cotangents: Cotangents | None = None
    ) -> torch.Tensor:
        """Projected per-example vector-Jacobian products, shape ``(b, c, k)``.

        ``root="loss"`` / ``"measurement"``: ``P^T grad l_i`` (``c = 1``). ``root="outputs"``: ``P^T J_i^T C_i[c]``
        for the cotangents ``C = cotangents(outputs)`` of shape ``(b, c, K)`` (``K`` outputs per example), with
        ``J_i`` the Jacobian of example ``i``'s outputs. ``batch`` must already be cast to the model's dtype/device.
        """

    @abstractmethod
    def regularizer_matrix(self, rescaled: bool = False) -> torch.Tensor:
        """``P^T diag(lambda) P`` (``k x k``, float64), ``lambda`` the task's weight decay per parameter.

        ``rescaled=True`` multiplies it by the fraction of dimensions kept, ``min(1, k/p)`` (per layer and side
        for the factorised projection): with ``E[P P^T] = I``, ``P^T diag(lambda) P ~ mean(lambda) (p/k) I`` for
        ``k < p``, ``p/k`` times the regulariser that the projected gradients (whose inner products the
        projection preserves) see in the full space; the rescaled matrix is ``~ mean(lambda) I``. Identical to
        the unscaled one when nothing is projected away (``k >= p``).
        """

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """JSON facts that identify the fitted projection (for stores): same fingerprint, same matrix."""

    def _check_fitted(self) -> None:
        if not hasattr(self, "dim_"):
            raise RuntimeError(
                f"this {type(self).__name__} is not fitted. Fix: call .fit(fmodel, n_points) first (attributors "
                "do this in their own fit)."
            )


# -- flat projections ----------------------------------------------------------------------------------------------


class RandomProjector(Projector):
    """A seeded ``p x k`` random projection of flat per-example gradients (see the module docstring).

    Args:
        dim: ``k``, or ``"auto"`` (Johnson-Lindenstrauss bound for the number of training examples, capped).
        kind: ``"gaussian"`` (default), ``"rademacher"``, ``"sparse"``, or ``"identity"`` (no projection,
            ``k = p``: projected influence is then exactly the unprojected Gauss-Newton influence, with the store
            and a Cholesky solve; ``dim`` must be ``"auto"``).
        random_state: non-negative int seed; the matrix is a function of it (and of ``kind``, ``dim``,
            ``density`` and ``p``) only.
        eps: distortion for ``dim="auto"``.
        max_dim: cap of ``dim="auto"``.
        density: non-zero fraction for ``kind="sparse"``; ``"auto"`` is ``1/sqrt(p)`` (Li et al. 2006).
        max_cached_bytes: keep the generated matrix (on the model's device) if it is at most this large.

    After :meth:`fit`: ``dim_``, ``kind_`` (``"identity"`` when ``dim="auto"`` reached ``p``), ``density_``,
    ``num_params_``.
    """

    def __init__(
        self,
        dim: int | str = "auto",
        kind: str = "gaussian",
        random_state: int = 0,
        *,
        eps: float = DEFAULT_EPS,
        max_dim: int = DEFAULT_MAX_DIM,
        density: float | str = "auto",
        max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES,
    ) -> None:
        self.dim = _check_dim("dim", dim)
        self.kind = check_choice("kind", kind, (*PROJECTION_KINDS, "identity"))
        if self.kind == "identity" and self.dim != "auto":
            raise bad_value(
                "dim", dim, "kind='identity' keeps all p dimensions", "leave dim='auto' with kind='identity'"
            )
        self.random_state = _check_seed(random_state)
        jl_dim(2, eps)  # validates eps
        self.eps = eps
        self.max_dim = check_positive_int("max_dim", max_dim)
        self.density = _check_density(density)
        self.max_cached_bytes = max_cached_bytes

    def __repr__(self) -> str:
        return (
            f"RandomProjector(dim={self.dim!r}, kind={self.kind!r}, random_state={self.random_state!r}, "
            f"eps={self.eps!r}, max_dim={self.max_dim!r}, density={self.density!r})"
        )

    def fit(self, fmodel: FunctionalModel, n_points: int) -> RandomProjector:
        p = fmodel.num_params
        self.fmodel_ = fmodel
        self.num_params_ = p
        self.kind_ = self.kind
        if self.kind == "identity":
            k = p
        elif self.dim == "auto":
            bound = jl_dim(n_points, self.eps)
            k = min(bound, self.max_dim, p)
            if k >= p:
                self.kind_ = "identity"
            logger.info(
                "RandomProjector(dim='auto'): Johnson-Lindenstrauss bound 4 ln(n)/(eps^2/2 - eps^3/3) = %d for "
                "n=%d, eps=%g; capped at max_dim=%d and p=%d -> dim=%d%s.",
                bound,
                n_points,
                self.eps,
                self.max_dim,
                p,
                k,
                " (no projection: identity)" if self.kind_ == "identity" else "",
            )
        else:
            k = int(self.dim)
            if k >= p:
                logger.info(
                    "RandomProjector: dim=%d >= p=%d parameters; the projection is invertible on its range, so "
                    "projected influence is exact, but the projection saves nothing.",
                    k,
                    p,
                )
        self.dim_ = k
        self.density_ = (
            (1.0 / math.sqrt(p) if self.density == "auto" else float(self.density))
            if self.kind_ == "sparse"
            else 1.0
        )
        self.dtype_ = fmodel.dtype
        self.device_ = fmodel.device
        self._cached: torch.Tensor | None = None
        self._cached_sparse_t: torch.Tensor | None = None
        if self.kind_ == "identity":
            return self
        itemsize = torch.empty((), dtype=self.dtype_).element_size()
        if self.kind_ == "sparse":
            nnz = p * k * self.density_
            if nnz * (itemsize + 8) <= self.max_cached_bytes:
                self._cached_sparse_t = self._build_sparse_t()
        elif p * k * itemsize <= self.max_cached_bytes:
            self._cached = torch.cat([block for _, _, block in self._blocks()])
        if self._cached is None and self._cached_sparse_t is None:
            logger.warning(
                "RandomProjector: the %d x %d projection matrix (%.1f GiB) exceeds max_cached_bytes=%d, so it is "
                "regenerated block by block for every product: correct but slow. Fix: kind='sparse', a smaller dim, "
                "FactorizedProjector (no p x k matrix at all), or a larger max_cached_bytes.",
                p,
                k,
                p * k * itemsize / 1024**3,
                self.max_cached_bytes,
            )
        return self

    def _blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(row_start, row_stop, dense block)`` of ``P`` in the working dtype, on the model's device."""
        p, k = self.num_params_, self.dim_
        for j, start in enumerate(range(0, p, ROWS_PER_SEED)):
            stop = min(p, start + ROWS_PER_SEED)
            seed = derive_seed(self.random_state, "flat", self.kind_, k, j)
            block = random_matrix(stop - start, k, self.kind_, seed, self.density_)
            yield start, stop, block.to(device=self.device_, dtype=self.dtype_)

    def _build_sparse_t(self) -> torch.Tensor:
        rows, cols, vals = [], [], []
        for start, _, block in self._blocks():
            nz = block.nonzero()
            rows.append(nz[:, 0] + start)
            cols.append(nz[:, 1])
            vals.append(block[nz[:, 0], nz[:, 1]])
        index = torch.stack([torch.cat(cols), torch.cat(rows)])  # (k, p) = P^T
        coo = torch.sparse_coo_tensor(
            index, torch.cat(vals), (self.dim_, self.num_params_), check_invariants=True
        )
        return coo.coalesce()

    def matrix(self) -> torch.Tensor:
        """The dense ``p x k`` matrix ``P`` (for tests and small models)."""
        self._check_fitted()
        if self.kind_ == "identity":
            return torch.eye(self.num_params_, dtype=self.dtype_, device=self.device_)
        if self._cached is not None:
            return self._cached
        return torch.cat([block for _, _, block in self._blocks()])

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        if vectors.dim() != 2 or vectors.shape[1] != self.num_params_:
            raise bad_value(
                "vectors",
                vectors,
                f"expected shape (m, {self.num_params_}) in the flat parameter layout",
                "reshape",
            )
        v = vectors.to(device=self.device_, dtype=self.dtype_)
        if self.kind_ == "identity":
            return v.clone()
        if self._cached is not None:
            return v @ self._cached
        if self._cached_sparse_t is not None:
            return torch.sparse.mm(self._cached_sparse_t, v.T.contiguous()).T
        out = torch.zeros(v.shape[0], self.dim_, dtype=v.dtype, device=v.device)
        for start, stop, block in self._blocks():
            out += v[:, start:stop] @ block
        return out

    def project_vjps(
        self, batch: tuple, root: str = "loss", cotangents: Cotangents | None = None
    ) -> torch.Tensor:
        self._check_fitted()
        fmodel = self.fmodel_
        module = _root_module(fmodel, root)
        with torch.no_grad():
            outputs = fmodel._call(module, fmodel.theta, batch)
        cot = _cotangents_for(root, outputs, cotangents)  # (b, c, K)
        b, c = cot.shape[0], cot.shape[1]
        scalar = root != "outputs"

        def single(theta: torch.Tensor, cot_i: torch.Tensor, *example: torch.Tensor) -> torch.Tensor:
            ex = tuple(t.unsqueeze(0) for t in example)

            def f(t: torch.Tensor) -> torch.Tensor:
                out = fmodel._call(module, t, ex)
                if scalar and out.shape != (1,):
                    raise ValueError(
                        f"the task's {root} returned shape {tuple(out.shape)} for a batch of one example; it must "
                        "return one value per example, shape (batch_size,). Fix: use reduction='none'."
                    )
                return out.reshape(-1)

            _, pullback = vjp(f, theta)
            return vmap(lambda v: pullback(v)[0])(cot_i)

        per = max(1, _VJP_ELEMENTS // max(1, c * self.num_params_))
        parts = []
        for start in range(0, b, per):
            sl = slice(start, start + per)
            grads = vmap(single, in_dims=(None, 0, *(0 for _ in batch)))(
                fmodel.theta, cot[sl], *(t[sl] for t in batch)
            )  # (b', c, p)
            parts.append(
                self.project(grads.reshape(-1, self.num_params_)).reshape(grads.shape[0], c, self.dim_)
            )
        return torch.cat(parts)

    def regularizer_matrix(self, rescaled: bool = False) -> torch.Tensor:
        self._check_fitted()
        lam = self.fmodel_.regularizer.to(torch.float64)
        k = self.dim_
        if self.kind_ == "identity":
            return torch.diag(lam)
        out = torch.zeros(k, k, dtype=torch.float64, device=self.device_)
        if not bool((lam != 0).any()):
            return out
        if self._cached is not None:
            P = self._cached.to(torch.float64)
            out = (P * lam[:, None]).T @ P
        else:
            for start, stop, block in self._blocks():
                B = block.to(torch.float64)
                out += (B * lam[start:stop, None]).T @ B
        return out * min(1.0, k / self.num_params_) if rescaled else out

    def fingerprint(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "type": "RandomProjector",
            "kind": self.kind_,
            "dim": self.dim_,
            "random_state": self.random_state,
            "density": self.density_,
            "num_params": self.num_params_,
            "rows_per_seed": ROWS_PER_SEED,
            "generator": "torch.Generator(cpu) float32, seeds derive_seed(random_state, 'flat', kind, dim, block)",
        }


# -- factorised (LoGra) projections ----------------------------------------------------------------------------------


@dataclass
class ProjectedLayer:
    """A supported module with parameters in scope, and its two side projections (``None``: identity)."""

    name: str
    module: nn.Module
    kind: str
    weight: str | None
    bias: str | None
    d_in: int  # input width without the bias column
    d_out: int
    k_in: int = 0
    k_out: int = 0
    P_in: torch.Tensor | None = None  # (d_in', k_in)
    P_out: torch.Tensor | None = None  # (d_out, k_out)
    offset: int = 0  # first feature of this layer in the projected vector

    @property
    def a_dim(self) -> int:
        return (self.d_in if self.weight is not None else 0) + (1 if self.bias is not None else 0)

    @property
    def dim(self) -> int:
        return self.k_in * self.k_out

    @property
    def params(self) -> list[str]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def gather(self, blocks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Named parameter-shaped tensors with one leading axis -> ``(m, d_out, d_in')``."""
        parts = []
        if self.weight is not None:
            w = blocks[self.weight]
            parts.append(
                w.transpose(-1, -2) if self.kind == "conv1d" else w.reshape(w.shape[0], self.d_out, -1)
            )
        if self.bias is not None:
            parts.append(blocks[self.bias].unsqueeze(-1))
        return torch.cat(parts, dim=-1)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as rows ``a``, shape ``(b, T, d_in')`` (a 1 appended when the bias is in scope)."""
        return input_rows(
            self.name,
            self.module,
            self.kind,
            x,
            self.weight is not None,
            self.bias is not None,
            "FactorizedProjector",
        )

    def output_rows(self, g: torch.Tensor) -> torch.Tensor:
        """An output-shaped gradient as rows ``s``, shape ``(b, T, d_out)``."""
        return output_rows(self.kind, self.d_out, g)

    def project_matrix(self, M: torch.Tensor) -> torch.Tensor:
        """``P_out^T M P_in`` for ``M`` of shape ``(..., d_out, d_in')``."""
        if self.P_out is not None:
            M = self.P_out.T @ M
        if self.P_in is not None:
            M = M @ self.P_in
        return M


def find_layers(fmodel: FunctionalModel) -> list[ProjectedLayer]:
    """The supported modules owning the parameters in scope, in model order; a ValueError names any parameter in
    scope that no supported module owns (or that two modules share)."""
    specs, missing = scan_layers(fmodel, "FactorizedProjector", "RandomProjector")
    layers = [ProjectedLayer(s.name, s.module, s.kind, s.weight, s.bias, s.in_dim, s.out_dim) for s in specs]
    if missing:
        raise bad_value(
            "projector",
            "FactorizedProjector",
            f"it projects parameters of {SUPPORTED_LAYERS} only, each owned by one module, but these parameters in "
            f"scope are not: {missing[:12]}{' ...' if len(missing) > 12 else ''}",
            "exclude them with params= (e.g. params="
            f"{[layer.name for layer in layers][:4] or ['<layer name>']}), or use RandomProjector",
        )
    return layers


@contextmanager
def _recording(layers: list[ProjectedLayer]) -> Iterator[list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Forward hooks recording each call of every layer as ``(input rows a, output tensor)``; always removed."""
    records: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]
    handles = []
    try:
        for i, layer in enumerate(layers):

            def hook(module, inputs, output, i=i, layer=layer):
                records[i].append((layer.patches(inputs[0].detach()), output))

            handles.append(layer.module.register_forward_hook(hook))
        yield records
    finally:
        for h in handles:
            h.remove()


class FactorizedProjector(Projector):
    """LoGra: per supported layer, project input activations (``d_in -> k_in``) and output gradients
    (``d_out -> k_out``) separately; the projected per-example gradient ``P_out^T G_i P_in`` is never formed in full.

    Args:
        dim_in: ``k_in`` per layer, or ``"auto"``. dim_out: ``k_out`` per layer, or ``"auto"`` (with ``"auto"`` both
            sides get the largest common width whose total dimension stays within the Johnson-Lindenstrauss bound
            for the training set, capped at ``max_dim``). A side no wider than its dimension is not projected.
        kind, random_state, eps, max_dim: as :class:`RandomProjector`; ``density="auto"`` is ``1/sqrt(d)`` per side.

    After :meth:`fit`: ``layers_`` (:class:`ProjectedLayer` with ``P_in``, ``P_out``, ``k_in``, ``k_out``), ``dim_``.
    The projected vector is the concatenation over layers (model order) of the row-major ``(k_out, k_in)`` matrices.
    """

    def __init__(
        self,
        dim_in: int | str = "auto",
        dim_out: int | str = "auto",
        kind: str = "gaussian",
        random_state: int = 0,
        *,
        eps: float = DEFAULT_EPS,
        max_dim: int = DEFAULT_MAX_DIM,
        density: float | str = "auto",
    ) -> None:
        self.dim_in = _check_dim("dim_in", dim_in)
        self.dim_out = _check_dim("dim_out", dim_out)
        self.kind = check_choice("kind", kind, PROJECTION_KINDS)
        self.random_state = _check_seed(random_state)
        jl_dim(2, eps)
        self.eps = eps
        self.max_dim = check_positive_int("max_dim", max_dim)
        self.density = _check_density(density)

    def __repr__(self) -> str:
        return (
            f"FactorizedProjector(dim_in={self.dim_in!r}, dim_out={self.dim_out!r}, kind={self.kind!r}, "
            f"random_state={self.random_state!r})"
        )

    def fit(self, fmodel: FunctionalModel, n_points: int) -> FactorizedProjector:
        layers = find_layers(fmodel)
        if "auto" in (self.dim_in, self.dim_out):
            full = sum(layer.a_dim * layer.d_out for layer in layers)
            bound = jl_dim(n_points, self.eps)
            target = min(bound, self.max_dim, full)
            widest = max(max(layer.a_dim, layer.d_out) for layer in layers)

            def total(width: int) -> int:
                ki = width if self.dim_in == "auto" else self.dim_in
                ko = width if self.dim_out == "auto" else self.dim_out
                return sum(min(ki, layer.a_dim) * min(ko, layer.d_out) for layer in layers)

            lo, hi = 1, widest
            while lo < hi:  # largest width with total(width) <= target (total is non-decreasing)
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if total(mid) <= target else (lo, mid - 1)
            width = lo
            dims = (
                width if self.dim_in == "auto" else self.dim_in,
                width if self.dim_out == "auto" else self.dim_out,
            )
            logger.info(
                "FactorizedProjector('auto'): Johnson-Lindenstrauss bound %d for n=%d, eps=%g, capped at max_dim=%d "
                "and the %d unprojected features -> side width %d, total dimension %d.",
                bound,
                n_points,
                self.eps,
                self.max_dim,
                full,
                width,
                total(width),
            )
        else:
            dims = (int(self.dim_in), int(self.dim_out))
        offset = 0
        for layer in layers:
            layer.k_in = min(dims[0], layer.a_dim)
            layer.k_out = min(dims[1], layer.d_out)
            for side, d, k in (("in", layer.a_dim, layer.k_in), ("out", layer.d_out, layer.k_out)):
                if k >= d:
                    mat = None
                else:
                    density = (
                        (1.0 / math.sqrt(d) if self.density == "auto" else float(self.density))
                        if self.kind == "sparse"
                        else 1.0
                    )
                    seed = derive_seed(self.random_state, "factorized", self.kind, layer.name, side, d, k)
                    mat = random_matrix(d, k, self.kind, seed, density).to(
                        device=fmodel.device, dtype=fmodel.dtype
                    )
                setattr(layer, f"P_{side}", mat)
            layer.offset = offset
            offset += layer.dim
        self.fmodel_ = fmodel
        self.layers_ = layers
        self.dim_ = offset
        self._checked = False
        return self

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        space = self.fmodel_.space
        if vectors.dim() != 2 or vectors.shape[1] != space.numel:
            raise bad_value(
                "vectors",
                vectors,
                f"expected shape (m, {space.numel}) in the flat parameter layout",
                "reshape",
            )
        v = vectors.to(device=self.fmodel_.device, dtype=self.fmodel_.dtype)
        blocks = space.unflatten(v)
        parts = [layer.project_matrix(layer.gather(blocks)).reshape(v.shape[0], -1) for layer in self.layers_]
        return torch.cat(parts, dim=1)

    def project_vjps(
        self, batch: tuple, root: str = "loss", cotangents: Cotangents | None = None
    ) -> torch.Tensor:
        self._check_fitted()
        check_choice("root", root, ROOTS)
        fmodel, layers = self.fmodel_, self.layers_
        task = fmodel.task
        fn = {"outputs": task.outputs, "loss": task.loss, "measurement": task.measurement}[root]
        with torch.enable_grad(), _recording(layers) as records:
            outputs = fn(fmodel.model, batch)
        b = outputs.shape[0]
        cot = _cotangents_for(root, outputs, cotangents)  # (b, c, K)
        flat = outputs.reshape(b, -1)
        targets = [out for calls in records for _, out in calls]
        live = [t for t in targets if t.requires_grad]
        n_cols = cot.shape[1]
        result = torch.zeros(b, n_cols, self.dim_, dtype=fmodel.dtype, device=fmodel.device)
        if not flat.requires_grad or not live:
            return result
        grads = _batched_vjps(flat, live, cot)  # per live output: (c, *output shape) or None
        it = iter(grads)
        s_rows: list[torch.Tensor | None] = []  # per layer: (c, b, T, d_out)
        for calls_i, layer in zip(records, layers):
            rows = []
            for _, out in calls_i:
                g = next(it) if out.requires_grad else None
                g = torch.zeros(n_cols, *out.shape, dtype=out.dtype, device=out.device) if g is None else g
                rows.append(
                    layer.output_rows(g.reshape(n_cols * b, *g.shape[2:])).reshape(n_cols, b, -1, layer.d_out)
                )
            s_rows.append(torch.cat(rows, dim=2) if rows else None)
        for calls_i, layer, s in zip(records, layers, s_rows):
            if s is None:
                continue
            a = torch.cat([a_call for a_call, _ in calls_i], dim=1)  # (b, T, d_in')
            if a.shape[0] != b:
                raise ValueError(
                    f"layer {layer.name!r} saw {a.shape[0]} rows for a batch of {b} examples: the "
                    "FactorizedProjector needs the batch axis first in every supported layer's input. Fix: "
                    "exclude this layer with params=, or use RandomProjector."
                )
            a_p = a @ layer.P_in if layer.P_in is not None else a
            s_p = s @ layer.P_out if layer.P_out is not None else s
            feat = torch.einsum("cbto,bti->bcoi", s_p, a_p).reshape(b, n_cols, -1)
            result[:, :, layer.offset : layer.offset + layer.dim] = feat
        if not self._checked:
            params = dict(fmodel.model.named_parameters())
            names = [n for layer in layers for n in layer.params]
            true = torch.autograd.grad(
                flat, [params[n] for n in names], grad_outputs=cot[:, 0], allow_unused=True
            )
            self._check_gradients(
                records, [None if s is None else s[0] for s in s_rows], dict(zip(names, true))
            )
            self._checked = True
        return result

    def _check_gradients(
        self,
        records: list[list[tuple[torch.Tensor, torch.Tensor]]],
        s_rows: list[torch.Tensor | None],
        param_grads: dict[str, torch.Tensor | None],
    ) -> None:
        """The batch gradient rebuilt from the hooks must equal autograd's (first batch only): catches weights used
        outside their module's forward (tying, functional calls) and layers whose input is not batch-first."""
        eps = torch.finfo(self.fmodel_.dtype).eps
        rtol = min(0.1, max(1e-10, 1e3 * eps))
        params = dict(self.fmodel_.model.named_parameters())
        for calls_i, layer, s in zip(records, self.layers_, s_rows):
            blocks = {
                n: (g if g is not None else torch.zeros_like(params[n])).detach().unsqueeze(0)
                for n, g in param_grads.items()
                if n in layer.params
            }
            true = layer.gather(blocks)[0].to(torch.float64)
            if s is not None and calls_i:
                a = torch.cat([a_call for a_call, _ in calls_i], dim=1).to(torch.float64)
                rebuilt = torch.einsum("bto,bti->oi", s.to(torch.float64), a)
                scale = float((s.to(torch.float64).norm(dim=-1) * a.norm(dim=-1)).sum())
            else:
                rebuilt, scale = torch.zeros_like(true), 0.0
            error = float((rebuilt - true).norm())
            if not error <= rtol * max(scale, float(true.norm())) + 1e-300:
                raise ValueError(
                    f"the FactorizedProjector's hooks on layer {layer.name!r} do not reproduce the gradient of its "
                    f"parameters {layer.params} (error {error:.3g} relative to {max(scale, float(true.norm())):.3g}): "
                    "they are used outside the module's own forward (weight tying, a functional call, a "
                    "parametrisation), or the layer's input is not batch-first. Fix: exclude them with params=, or "
                    "use RandomProjector."
                )

    def regularizer_matrix(self, rescaled: bool = False) -> torch.Tensor:
        self._check_fitted()
        fmodel = self.fmodel_
        out = torch.zeros(self.dim_, self.dim_, dtype=torch.float64, device=fmodel.device)
        for layer in self.layers_:
            lam = weight_decay_per_tensor(fmodel, layer.params, "FactorizedProjector")
            diag_in = torch.cat(
                ([torch.full((layer.d_in,), lam[layer.weight], dtype=torch.float64)] if layer.weight else [])
                + ([torch.full((1,), lam[layer.bias], dtype=torch.float64)] if layer.bias else [])
            ).to(fmodel.device)
            if not bool((diag_in != 0).any()):
                continue
            P_in = (
                layer.P_in.to(torch.float64)
                if layer.P_in is not None
                else torch.eye(layer.a_dim, dtype=torch.float64, device=fmodel.device)
            )
            P_out = (
                layer.P_out.to(torch.float64)
                if layer.P_out is not None
                else torch.eye(layer.d_out, dtype=torch.float64, device=fmodel.device)
            )
            block = torch.kron(P_out.T @ P_out, (P_in * diag_in[:, None]).T @ P_in)
            if rescaled:
                block = block * (layer.k_in / layer.a_dim) * (layer.k_out / layer.d_out)
            sl = slice(layer.offset, layer.offset + layer.dim)
            out[sl, sl] = block
        return out

    def fingerprint(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "type": "FactorizedProjector",
            "kind": self.kind,
            "random_state": self.random_state,
            "density": self.density,
            "dim": self.dim_,
            "layers": [
                [layer.name, layer.kind, layer.params, layer.a_dim, layer.d_out, layer.k_in, layer.k_out]
                for layer in self.layers_
            ],
            "generator": "torch.Generator(cpu) float32, seeds derive_seed(random_state, 'factorized', kind, layer, side)",
        }


def supports_factorized(fmodel: FunctionalModel) -> bool:
    """Whether every parameter in scope belongs to a layer the :class:`FactorizedProjector` supports."""
    try:
        find_layers(fmodel)
    except ValueError:
        return False
    return True


__all__ = [
    "PROJECTION_KINDS",
    "FactorizedProjector",
    "ProjectedLayer",
    "Projector",
    "RandomProjector",
    "derive_seed",
    "find_layers",
    "jl_dim",
    "output_gradient",
    "output_hessian_factors",
    "random_matrix",
    "supports_factorized",
]
